"""The bundled model and its pieces: data loaders, U-Net, EDM preconditioning, training,
checkpoint loading and the classifier-based quality metric.  CPU only, a few seconds in all."""
from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from diffsampler.datasets import (
    DatasetNotFoundError, load_digits, load_fashion_mnist, read_idx,
)
from diffsampler.models.base import Denoiser
from diffsampler.models.bundled import BundledModelError, available_models, load_bundled
from diffsampler.models.edm import EDMDenoiser, VPPrecond, loss_weight, make_precond
from diffsampler.tools.train_unet import TrainConfig, denoising_loss, export_model, train
from diffsampler.models.unet import UNet, UNetConfig
from diffsampler.metrics import fid
from diffsampler.metrics.classifier import FashionClassifier, load_classifier


def frechet_distance(mu1, sigma1, mu2, sigma2):
    as_stats = lambda mu, sigma: {"mu": np.atleast_1d(np.asarray(mu, np.float64)),
                                  "sigma": np.atleast_2d(np.asarray(sigma, np.float64))}
    return fid.frechet_distance(as_stats(mu1, sigma1), as_stats(mu2, sigma2))

REPO = Path(__file__).resolve().parents[1]
FMNIST_AVAILABLE = Path("/usr/share/datasets/fashion-mnist").is_dir()


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _tiny_cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(
        dataset="digits", out=str(tmp_path / "run"), steps=40, batch=32, lr=2e-3, warmup_steps=5,
        ema_decay=0.9, base_channels=8, channel_mult=(1, 2), groups=4, attention_mid=True,
        save_every=0, log_every=1000, export_dtype="float32", channels_last=False, seed=0,
    )
    base.update(kw)
    return TrainConfig(**base)


def _randomize(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values (the zero-initialised output conv hides everything)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return net


# ------------------------------------------------------------------------------------------
# datasets
# ------------------------------------------------------------------------------------------
def _write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_loader_reads_idx_gz_or_plain_and_scales_to_unit_range(tmp_path, gz):
    imgs = np.zeros((3, 28, 28), np.uint8)
    imgs[0, 0, 0], imgs[1, 5, 7], imgs[2] = 255, 51, 128
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", imgs, gz)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([9, 0, 3]), gz)
    x, y = load_fashion_mnist("test", root=tmp_path)
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.tolist() == [9, 0, 3]
    assert x[0, 0, 0, 0] == 1.0 and x[0, 0, 0, 1] == -1.0
    assert x[1, 0, 5, 7] == pytest.approx(51 / 127.5 - 1)
    assert np.array_equal(read_idx(next(tmp_path.glob("t10k-images*"))), imgs)


def test_fashion_loader_missing_files_names_the_debian_package(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)
    with pytest.raises(ValueError, match="unknown split"):
        load_fashion_mnist("validation", root=tmp_path)


def test_idx_reader_rejects_non_idx_and_truncated_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x89PNG....")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x01\x02")
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short")


@pytest.mark.skipif(not FMNIST_AVAILABLE, reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_test_split():
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 1, 28, 28)
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert torch.bincount(y).tolist() == [1000] * 10


def test_digits_loader_range_shape_and_split():
    x, y = load_digits()
    assert x.shape == (1797, 1, 8, 8) and y.shape == (1797,)
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    xtr, _ = load_digits("train")
    xte, _ = load_digits("test")
    assert xtr.shape[0] + xte.shape[0] == 1797
    assert torch.equal(torch.cat([xtr, xte]), x)


# ------------------------------------------------------------------------------------------
# preconditioning
# ------------------------------------------------------------------------------------------
class _RecordingNet(torch.nn.Module):
    """F(x_in, c_noise) = x_in^2 + c_noise (per sample); remembers its inputs."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.seen = None

    def forward(self, x_in, c_noise, class_labels=None):
        self.seen = (x_in.clone(), c_noise.clone(), class_labels)
        return x_in ** 2 + c_noise.reshape(-1, 1, 1, 1)


SIGMAS = torch.tensor([0.002, 0.05, 0.5, 2.0, 80.0], dtype=torch.float64)


@pytest.mark.parametrize("family", ["edm", "ve", "vp"])
def test_preconditioning_matches_the_written_formulas(family):
    sd = 0.5
    s = SIGMAS
    if family == "edm":
        c_skip, c_out = sd ** 2 / (s ** 2 + sd ** 2), s * sd / torch.sqrt(s ** 2 + sd ** 2)
        c_in, c_noise = 1 / torch.sqrt(s ** 2 + sd ** 2), torch.log(s) / 4
    elif family == "ve":
        c_skip, c_out, c_in, c_noise = torch.ones_like(s), s, torch.ones_like(s), torch.log(s / 2)
    else:
        beta_d, beta_min = 19.9, 0.1
        t = (torch.sqrt(beta_min ** 2 + 2 * beta_d * torch.log(1 + s ** 2)) - beta_min) / beta_d
        c_skip, c_out, c_in, c_noise = torch.ones_like(s), -s, 1 / torch.sqrt(1 + s ** 2), 999 * t

    got = make_precond(family, sigma_data=sd).coefficients(s)
    for g, e in zip(got, (c_skip, c_out, c_in, c_noise)):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)

    net = _RecordingNet().double()
    den = EDMDenoiser(net, precond=family, sigma_data=sd)
    assert isinstance(den, Denoiser)
    x = torch.randn(len(s), 1, 3, 3, dtype=torch.float64)
    out = den(x, s)
    b = (-1, 1, 1, 1)
    torch.testing.assert_close(net.seen[0], c_in.reshape(b) * x)
    torch.testing.assert_close(net.seen[1], c_noise)
    expected = c_skip.reshape(b) * x + c_out.reshape(b) * ((c_in.reshape(b) * x) ** 2 + c_noise.reshape(b))
    torch.testing.assert_close(out, expected)
    # the training weight is 1 / c_out^2 -- for EDM (sigma^2 + sd^2) / (sigma sd)^2
    torch.testing.assert_close(loss_weight(den.precond, s), 1 / c_out ** 2)
    if family == "edm":
        torch.testing.assert_close(loss_weight(den.precond, s), (s ** 2 + sd ** 2) / (s * sd) ** 2)


def test_vp_noise_level_inverse_and_edm_limits():
    vp = VPPrecond()
    t = torch.linspace(1e-5, 1, 50, dtype=torch.float64)
    torch.testing.assert_close(vp.sigma_to_t(vp.t_to_sigma(t)), t)
    # EDM: D -> x as sigma -> 0 (c_skip -> 1, c_out -> 0), D -> the network's output scaled by
    # sigma_data as sigma -> infinity (c_skip -> 0, c_out -> sigma_data).
    c_skip, c_out, _, _ = make_precond("edm").coefficients(torch.tensor([1e-8, 1e8], dtype=torch.float64))
    torch.testing.assert_close(c_skip, torch.tensor([1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(c_out, torch.tensor([0.0, 0.5], dtype=torch.float64), atol=1e-8, rtol=0)


def test_denoiser_accepts_scalar_sigma_int_labels_and_keeps_dtype():
    net = _randomize(UNet(UNetConfig(image_size=8, base_channels=8, channel_mult=(1, 2), groups=4)))
    den = EDMDenoiser(net, num_classes=10, shape=(1, 8, 8))
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    labels = torch.tensor([1, 4, 7])
    a = den(x, torch.full((3,), 0.7), class_labels=labels)
    b = den(x, torch.tensor(0.7), class_labels=torch.nn.functional.one_hot(labels, 10).float())
    assert a.dtype == torch.float64 and a.shape == x.shape
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="class_labels must have shape"):
        den(x, torch.full((3,), 0.7), class_labels=torch.zeros(3, 5))
    with pytest.raises(TypeError, match="unexpected conditioning"):
        den(x, torch.full((3,), 0.7), prompt="a shoe")


# ------------------------------------------------------------------------------------------
# the U-Net
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,mult", [(28, (1, 2, 2)), (8, (1, 2)), (13, (1, 1, 2))])
def test_unet_output_shape_and_mid_hook(size, mult):
    net = UNet(UNetConfig(image_size=size, base_channels=8, channel_mult=mult, groups=4))
    seen = {}

    def hook(module, inputs, output):
        seen["mid"] = output.shape

    net.mid.register_forward_hook(hook)
    x = torch.randn(2, 1, size, size)
    out = net(x, torch.zeros(2), torch.zeros(2, 10))
    assert out.shape == x.shape
    low = size
    for _ in mult[1:]:
        low = (low + 1) // 2
    assert seen["mid"] == (2, 8 * mult[-1], low, low)
    # zero-initialised output layer: a fresh network predicts exactly 0
    assert torch.count_nonzero(out) == 0


def test_class_labels_reach_the_network_and_zero_row_is_unconditional():
    net = _randomize(UNet(UNetConfig(image_size=8, base_channels=8, channel_mult=(1, 2), groups=4)))
    den = EDMDenoiser(net, num_classes=10)
    x = torch.randn(1, 1, 8, 8).expand(3, -1, -1, -1)
    sigma = torch.full((3,), 1.0)
    onehot = torch.zeros(3, 10)
    onehot[0, 2] = 1
    onehot[1, 5] = 1  # row 2 stays zero
    out = den(x, sigma, class_labels=onehot)
    assert (out[0] - out[1]).abs().max() > 1e-3          # class changes the output
    assert (out[0] - out[2]).abs().max() > 1e-3          # conditional != unconditional
    uncond = den(x[:1], sigma[:1])                        # no labels = zeros row
    torch.testing.assert_close(uncond, out[2:3])
    # linear class embedding: a zeros row contributes nothing at all
    emb_zero = net.embedding(torch.zeros(1), torch.zeros(1, 10))
    emb_none = net.embedding(torch.zeros(1), None)
    torch.testing.assert_close(emb_zero, emb_none)


def test_unet_config_round_trips_through_json():
    cfg = UNetConfig(image_size=8, base_channels=8, channel_mult=(1, 2), groups=4, attention_mid=False)
    again = UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(ValueError, match="unknown UNetConfig keys"):
        UNetConfig.from_dict({**cfg.to_dict(), "depth": 3})


# ------------------------------------------------------------------------------------------
# training, checkpoints, resume
# ------------------------------------------------------------------------------------------
def _fixed_eval_batch(n=256, seed=123):
    x, y = load_digits("train")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(x.shape[0], (n,), generator=g)
    sigma = (-1.2 + 1.2 * torch.randn(n, generator=g)).exp()
    noise = torch.randn(n, 1, 8, 8, generator=g)
    return x[idx], torch.nn.functional.one_hot(y[idx], 10).float(), sigma, noise


def test_training_reduces_loss_and_checkpoint_reloads_identically(tmp_path):
    cfg = _tiny_cfg(tmp_path, steps=60, log_every=20)
    res = train(cfg, quiet=True)
    assert res["steps"] == 60 and not res["stopped_by_budget"]
    out = Path(res["out"])
    assert (out / "model.safetensors").is_file() and not (out / "train_state.pt").exists()
    meta = json.loads((out / "config.json").read_text())
    assert meta["steps"] == 60 and meta["dataset"] == "digits" and meta["shape"] == [1, 8, 8]
    # the card's loss curve: the mean of each log interval's batch losses
    every = cfg.log_every
    assert [s for s, _ in meta["loss_curve"]] == list(range(every, 61, every))
    assert meta["loss_curve"][-1][1] == pytest.approx(np.mean(res["losses"][-every:]), abs=1e-4)

    x0, y, sigma, noise = _fixed_eval_batch()
    fresh = EDMDenoiser(UNet(UNetConfig.from_dict(meta["unet"])), num_classes=10)
    loaded = load_bundled("run", root=tmp_path)
    with torch.no_grad():
        loss_before = float(denoising_loss(fresh, x0, sigma, noise, y))
        loss_after = float(denoising_loss(loaded, x0, sigma, noise, y))
    assert loss_after < 0.75 * loss_before, (loss_before, loss_after)
    # training-batch losses went down too (average of the last 10 vs the first 10)
    assert np.mean(res["losses"][-10:]) < np.mean(res["losses"][:10])

    # the reloaded network is the EMA network, output for output
    ema_den = EDMDenoiser(res["ema"], num_classes=10)
    xs = x0[:8] + sigma[:8].reshape(-1, 1, 1, 1) * noise[:8]
    with torch.no_grad():
        assert torch.equal(loaded(xs, sigma[:8], class_labels=y[:8]), ema_den(xs, sigma[:8], class_labels=y[:8]))
    assert loaded.shape == (1, 8, 8) and loaded.num_classes == 10
    assert (loaded.sigma_min, loaded.sigma_max) == (0.002, 80.0)

    # float16 export: same network up to fp16 rounding of the weights
    export_model(res["ema"], tmp_path / "half", meta, dtype="float16")
    half = load_bundled("half", root=tmp_path)
    assert next(half.parameters()).dtype == torch.float32
    rounded = UNet(UNetConfig.from_dict(meta["unet"]))
    rounded.load_state_dict({k: v.half().float() for k, v in res["ema"].state_dict().items()})
    with torch.no_grad():
        torch.testing.assert_close(half(xs, sigma[:8], class_labels=y[:8]),
                                   EDMDenoiser(rounded, num_classes=10)(xs, sigma[:8], class_labels=y[:8]))


def test_interrupted_training_resumes_to_the_same_weights(tmp_path):
    straight = train(_tiny_cfg(tmp_path, out=str(tmp_path / "a"), steps=12), quiet=True)
    first = train(_tiny_cfg(tmp_path, out=str(tmp_path / "b"), steps=5, keep_state=True), quiet=True)
    assert (tmp_path / "b" / "train_state.pt").exists()
    assert first["steps"] == 5
    resumed = train(_tiny_cfg(tmp_path, out=str(tmp_path / "b"), steps=12), quiet=True)
    assert resumed["steps"] == 12 and not (tmp_path / "b" / "train_state.pt").exists()
    assert resumed["losses"][:5] == first["losses"]
    for (k, a), (_, b) in zip(straight["ema"].state_dict().items(), resumed["ema"].state_dict().items()):
        assert torch.equal(a, b), k


def test_a_finished_run_is_not_retrained_or_overwritten(tmp_path):
    first = train(_tiny_cfg(tmp_path, steps=4), quiet=True)
    weights = (tmp_path / "run" / "model.safetensors").read_bytes()
    # the same run again, on more threads: nothing to do, the weights file untouched
    again = train(_tiny_cfg(tmp_path, steps=4, threads=2), quiet=True)
    assert again["already_done"] and again["net"] is None and again["steps"] == 4
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == weights
    for (k, a), (_, b) in zip(first["ema"].state_dict().items(), again["ema"].state_dict().items()):
        assert torch.equal(a, b), k
    # other settings in the same folder are refused, naming what differs
    with pytest.raises(ValueError, match=r"lr 0\.002 there, 0\.0005 asked"):
        train(_tiny_cfg(tmp_path, steps=4, lr=5e-4), quiet=True)
    with pytest.raises(ValueError, match="cannot become a 8-step run"):
        train(_tiny_cfg(tmp_path, steps=8), quiet=True)
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == weights
    # --no-resume starts over on purpose
    over = train(_tiny_cfg(tmp_path, steps=4, lr=5e-4, resume=False), quiet=True)
    assert not over.get("already_done") and (tmp_path / "run" / "model.safetensors").read_bytes() != weights


def test_an_unfinished_run_is_continued_only_with_its_own_settings(tmp_path):
    train(_tiny_cfg(tmp_path, steps=3, keep_state=True), quiet=True)
    with pytest.raises(ValueError, match=r"unfinished run .*batch 32 there, 16 asked"):
        train(_tiny_cfg(tmp_path, steps=6, batch=16), quiet=True)
    with pytest.raises(ValueError, match="3 are already trained, more than the 2 asked"):
        train(_tiny_cfg(tmp_path, steps=2), quiet=True)
    # a cosine schedule is a function of the total steps: a longer run is another run
    train(_tiny_cfg(tmp_path, out=str(tmp_path / "cos"), steps=3, keep_state=True, lr_schedule="cosine"), quiet=True)
    with pytest.raises(ValueError, match="schedule depends on the total number of steps"):
        train(_tiny_cfg(tmp_path, out=str(tmp_path / "cos"), steps=6, lr_schedule="cosine"), quiet=True)


def test_fine_tuning_starts_from_the_given_model_and_is_tied_to_its_weights(tmp_path):
    import hashlib

    from safetensors.torch import load_file

    train(_tiny_cfg(tmp_path, out=str(tmp_path / "start"), steps=4), quiet=True)
    start_weights = load_file(tmp_path / "start" / "model.safetensors")
    # lr 0: nothing moves, so the fine-tuned export is the starting model bit for bit
    still = train(_tiny_cfg(tmp_path, out=str(tmp_path / "still"), steps=2, lr=0.0,
                            init_from=str(tmp_path / "start")), quiet=True)
    assert still["steps"] == 2
    for k, v in load_file(tmp_path / "still" / "model.safetensors").items():
        assert torch.equal(v, start_weights[k]), k
    # the EMA starts at the starting weights with the full decay: decay 1 keeps them while the net
    # moves (a run from scratch ramps its decay up from 0.1, so there the EMA follows the net)
    moved = train(_tiny_cfg(tmp_path, out=str(tmp_path / "moved"), steps=2, ema_decay=1.0,
                            init_from=str(tmp_path / "start")), quiet=True)
    assert any(not torch.equal(v, start_weights[k]) for k, v in moved["net"].state_dict().items())
    for k, v in moved["ema"].state_dict().items():
        assert torch.equal(v, start_weights[k]), k
    meta = json.loads((tmp_path / "moved" / "config.json").read_text())
    sha = hashlib.sha256((tmp_path / "start" / "model.safetensors").read_bytes()).hexdigest()
    assert meta["init"]["weights_sha256"] == sha and meta["init"]["steps"] == 4
    assert meta["images_seen"] == 4 * 32 + 2 * 32
    # the same command is a finished run; after the starting model changes, it is another run
    assert train(_tiny_cfg(tmp_path, out=str(tmp_path / "moved"), steps=2, ema_decay=1.0,
                           init_from=str(tmp_path / "start")), quiet=True)["already_done"]
    train(_tiny_cfg(tmp_path, out=str(tmp_path / "start"), steps=4, lr=1e-3, resume=False), quiet=True)
    with pytest.raises(ValueError, match=r"init_weights_sha256 '%s' there" % sha):
        train(_tiny_cfg(tmp_path, out=str(tmp_path / "moved"), steps=2, ema_decay=1.0,
                        init_from=str(tmp_path / "start")), quiet=True)
    # another architecture, or a folder without a model, is refused with what differs
    with pytest.raises(ValueError, match=r"another kind of model \(base_channels 8 there, 12 here"):
        train(_tiny_cfg(tmp_path, out=str(tmp_path / "wide"), steps=2, base_channels=12,
                        init_from=str(tmp_path / "start")), quiet=True)
    with pytest.raises(ValueError, match="not a model folder written by `train model`"):
        train(_tiny_cfg(tmp_path, out=str(tmp_path / "none"), steps=2, init_from=str(tmp_path)), quiet=True)


def test_train_command_reports_a_settings_clash_in_one_line(tmp_path):
    from click.testing import CliRunner
    from diffsampler.cli import main

    args = ["train", "model", "--dataset", "digits", "--steps", "2", "--batch", "8", "--base-channels", "8",
            "--channel-mult", "1,2", "--groups", "4", "--log-every", "1", "--out", str(tmp_path / "m")]
    assert CliRunner().invoke(main, args).exit_code == 0
    res = CliRunner().invoke(main, args + ["--lr", "3e-4"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "lr 0.001 there, 0.0003 asked" in res.output and "--no-resume" in res.output
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0 and "nothing to do" in res.output


def test_torchrun_training_is_the_one_process_run(tmp_path):
    """DDP over two gloo processes, each training on half of every batch: the same run up to
    rounding, and a run interrupted under torchrun resumes in one process to the same weights."""
    import os
    import socket
    import subprocess
    import sys

    from safetensors.torch import load_file

    args = ["train", "model", "--dataset", "digits", "--steps", "6", "--batch", "16", "--base-channels", "8",
            "--channel-mult", "1,2", "--groups", "4", "--lr", "2e-3", "--warmup-steps", "2",
            "--export-dtype", "float32", "--no-channels-last", "--log-every", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(*extra):
        with socket.socket() as probe:              # a free port (another job may hold the usual ones)
            probe.bind(("127.0.0.1", 0))
            port = str(probe.getsockname()[1])
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", port, "-m", "diffsampler", *args, *extra],
                              env=env, capture_output=True, text=True)

    one = subprocess.run([sys.executable, "-m", "diffsampler", *args, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True)
    two = torchrun("--out", str(tmp_path / "two"))
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    assert json.loads((tmp_path / "two" / "config.json").read_text())["processes"] == 2
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    # 3 steps under torchrun with the state kept, then the other 3 in one process
    part = torchrun("--out", str(tmp_path / "part"), "--steps", "3", "--keep-state")
    assert part.returncode == 0, part.stderr[-2000:]
    assert (tmp_path / "part" / "train_state.pt").exists()
    rest = subprocess.run([sys.executable, "-m", "diffsampler", *args, "--out", str(tmp_path / "part")],
                          env=env, capture_output=True, text=True)
    assert rest.returncode == 0, rest.stderr[-2000:]
    c = load_file(tmp_path / "part" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(c[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def test_wall_clock_budget_stops_and_keeps_state(tmp_path):
    res = train(_tiny_cfg(tmp_path, steps=1000, minutes=1e-9), quiet=True)
    assert res["stopped_by_budget"] and res["steps"] == 0
    assert (tmp_path / "run" / "train_state.pt").exists()
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_label_dropout_zeroes_rows():
    from diffsampler.tools.train_unet import one_hot_with_dropout

    labels = torch.randint(10, (4000,), generator=torch.Generator().manual_seed(0))
    oh = one_hot_with_dropout(labels, 10, 0.1, torch.Generator().manual_seed(1))
    dropped = (oh.sum(1) == 0).float().mean()
    assert 0.08 < dropped < 0.12
    kept = oh.sum(1) == 1
    assert torch.equal(oh[kept].argmax(1), labels[kept])


# ------------------------------------------------------------------------------------------
# bundled model loading
# ------------------------------------------------------------------------------------------
def test_bundled_fashion_mnist_model_loads_with_declared_shape():
    assert "fashion-mnist" in available_models()
    den = load_bundled()
    assert isinstance(den, Denoiser) and isinstance(den, EDMDenoiser)
    assert den.shape == (1, 28, 28) and den.num_classes == 10
    assert (den.sigma_min, den.sigma_max) == (0.002, 80.0)
    assert next(den.parameters()).dtype == torch.float32
    x = 80.0 * torch.randn(4, *den.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = den(x, torch.full((4,), 80.0), class_labels=torch.eye(10)[:4])
    assert out.shape == x.shape and torch.isfinite(out).all()
    size = (REPO / "checkpoints" / "fashion-mnist" / "model.safetensors").stat().st_size
    assert size < 5e6


@pytest.mark.skipif(not FMNIST_AVAILABLE, reason="dataset-fashion-mnist not installed")
def test_bundled_model_denoises_real_images_and_uses_labels():
    den = load_bundled()
    x0, y = load_fashion_mnist("test", limit=64)
    g = torch.Generator().manual_seed(0)
    sigma = torch.full((64,), 0.5)
    xn = x0 + 0.5 * torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        cond = den(xn, sigma, class_labels=torch.nn.functional.one_hot(y, 10).float())
        wrong = den(xn, sigma, class_labels=torch.nn.functional.one_hot((y + 5) % 10, 10).float())
    mse_noisy = (xn - x0).square().mean()
    mse_cond = (cond - x0).square().mean()
    assert mse_cond < 0.25 * mse_noisy
    # the right label helps more than a wrong one
    assert mse_cond < (wrong - x0).square().mean()


def test_bundled_loader_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFSAMPLER_CHECKPOINTS", str(tmp_path))
    export_model(UNet(UNetConfig(image_size=8, base_channels=8, channel_mult=(1, 2), groups=4)),
                 tmp_path / "tiny", {"architecture": "unet",
                                     "unet": UNetConfig(image_size=8, base_channels=8, channel_mult=(1, 2),
                                                        groups=4).to_dict(),
                                     "shape": [1, 8, 8], "num_classes": 10})
    assert available_models() == ["tiny"]
    assert load_bundled("tiny").shape == (1, 8, 8)
    with pytest.raises(BundledModelError, match=r"unknown bundled model 'nope'.*available: tiny"):
        load_bundled("nope")

    w = tmp_path / "tiny" / "model.safetensors"
    blob = w.read_bytes()
    w.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(BundledModelError, match="corrupt .*model.safetensors"):
        load_bundled("tiny")
    with pytest.raises(BundledModelError, match="corrupt"):
        load_bundled("tiny", verify=False)
    w.unlink()
    with pytest.raises(BundledModelError, match="missing model.safetensors"):
        load_bundled("tiny")
    w.write_bytes(blob)
    (tmp_path / "tiny" / "config.json").write_text("{not json")
    with pytest.raises(BundledModelError, match="corrupt .*config.json"):
        load_bundled("tiny")


# ------------------------------------------------------------------------------------------
# the quality metric
# ------------------------------------------------------------------------------------------
def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    v1, v2 = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    got = frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert frechet_distance(mu1, np.diag(v1), mu1, np.diag(v1)) == pytest.approx(0.0, abs=1e-9)
    # 1-d: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)
    # full covariance, rotated: invariant under a common rotation
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    rot = frechet_distance(q @ mu1, q @ np.diag(v1) @ q.T, q @ mu2, q @ np.diag(v2) @ q.T)
    assert rot == pytest.approx(expected, rel=1e-6)


def test_feature_stats_and_classifier_feature_shape():
    f = torch.randn(500, 4, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 2.0, 3.0, 4.0])
    stats = fid.statistics(f)
    mu, cov = stats["mu"], stats["sigma"]
    assert mu.shape == (4,) and cov.shape == (4, 4)
    np.testing.assert_allclose(np.diag(cov), np.var(f.numpy(), axis=0, ddof=1), rtol=1e-5)
    model = FashionClassifier().eval()
    assert model.features(torch.zeros(3, 1, 28, 28)).shape == (3, model.feature_dim)


@pytest.mark.skipif(not FMNIST_AVAILABLE, reason="dataset-fashion-mnist not installed")
def test_bundled_classifier_is_accurate():
    from diffsampler.metrics.classifier import accuracy

    meta = json.loads((REPO / "checkpoints" / "fashion-mnist-classifier" / "config.json").read_text())
    assert meta["test_accuracy"] > 0.88
    model = load_classifier()
    x, y = load_fashion_mnist("test", limit=500)
    assert accuracy(model, x, y) > 0.85
