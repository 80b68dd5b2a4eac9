"""EDM network snapshots (pickles carrying their class sources) load without EDM's repository."""
import importlib.util
import io
import pickle
import sys
import types

import pytest
import torch

import diffsampler
from diffsampler.models.base import Denoiser
from diffsampler.models.edm_pickle import (FORMAT_VERSION, EasyDict, META_KEYS, SHIMS, SOURCE_MODULE_PREFIX,
                                           EDMSnapshotError, UntrustedPickleError, load_edm_pickle,
                                           load_edm_snapshot)
from edm_snapshot_format import (dumps_edm_snapshot, module_from_source, save_edm_snapshot,
                                                    tiny_edm_loss, tiny_edm_network)

CHANNELS, RES, LABELS = 2, 8, 3


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    net = tiny_edm_network(img_resolution=RES, img_channels=CHANNELS, label_dim=LABELS, seed=1)
    path = tmp_path_factory.mktemp("edm") / "network-snapshot-000000.pkl"
    save_edm_snapshot(path, {"ema": net, "loss_fn": tiny_edm_loss(), "augment_pipe": None,
                             "dataset_kwargs": {"resolution": RES, "use_labels": True}})
    return path, net


def _leftover_modules():
    return sorted(k for k in sys.modules if k.split(".")[0] in ("torch_utils", "dnnlib")
                  or k.startswith(SOURCE_MODULE_PREFIX))


class _Recorder(pickle.Unpickler):
    """Reads the stream without running any pickled source: persistent objects come back as their meta."""
    found = None

    def find_class(self, module, name):
        self.found.add((module, name))
        if (module, name) == ("torch_utils.persistence", "_reconstruct_persistent_obj"):
            return lambda meta: ("persistent", meta)
        assert module.split(".")[0] in ("torch", "collections"), (module, name)
        return super().find_class(module, name)


def test_stream_is_edms_format(snapshot):
    path, _ = snapshot
    data = path.read_bytes()
    assert data[:2] == b"\x80\x04"                      # protocol 4, as EDM's pickle.dump wrote
    rec = _Recorder(io.BytesIO(data))
    rec.found = set()
    snap = rec.load()
    assert ("torch_utils.persistence", "_reconstruct_persistent_obj") in rec.found
    assert not any(m.startswith(("diffsampler", "dnnlib", SOURCE_MODULE_PREFIX)) for m, _ in rec.found)
    kind, meta = snap["ema"]
    assert kind == "persistent" and tuple(meta) == META_KEYS
    assert meta["type"] == "class" and meta["version"] == FORMAT_VERSION == 6
    assert meta["class_name"] == "EDMPrecond" and "class EDMPrecond(torch.nn.Module)" in meta["module_src"]
    assert "from torch_utils import persistence" in meta["module_src"]
    assert meta["state"]["label_dim"] == LABELS
    assert meta["state"]["_init_args"] == (RES, CHANNELS) and meta["state"]["_init_kwargs"]["label_dim"] == LABELS
    inner_kind, inner = meta["state"]["_modules"]["model"]      # nested persistent object
    assert inner_kind == "persistent" and inner["class_name"] == "TinyNet"
    assert inner["module_src"] is meta["module_src"]            # one source, memoized in the stream
    assert snap["loss_fn"][1]["class_name"] == "EDMLoss" and snap["augment_pipe"] is None


def test_refuses_without_trust_and_runs_nothing(tmp_path):
    marker = tmp_path / "source-ran"
    source = (f"import pathlib\nfrom torch_utils import persistence\npathlib.Path({str(marker)!r}).touch()\n\n"
              "@persistence.persistent_class\nclass Thing:\n    pass\n")
    thing = module_from_source(source).Thing()
    thing.value, thing.options = 41, EasyDict(scale=2)     # EasyDict: pickled as dnnlib.util.EasyDict
    path = save_edm_snapshot(tmp_path / "thing.pkl", {"ema": thing})
    marker.unlink()
    for load in (load_edm_pickle, load_edm_snapshot):
        with pytest.raises(UntrustedPickleError, match=r"executes that code.*trust=True.*--trust-pickle"):
            load(path)
    assert not marker.exists()
    loaded = load_edm_pickle(path, trust=True)["ema"]                # trusted: the pickled source did run
    assert loaded.value == 41 and loaded.options.scale == 2 and type(loaded.options).__name__ == "EasyDict"
    assert marker.exists()
    with pytest.raises(EDMSnapshotError, match=r"'ema' is a Thing, not a torch network"):
        load_edm_snapshot(path, trust=True)


def test_loads_without_edm_and_restores_sys_modules(snapshot, monkeypatch):
    path, _ = snapshot
    assert importlib.util.find_spec("torch_utils") is None and importlib.util.find_spec("dnnlib") is None
    assert _leftover_modules() == []
    denoiser = load_edm_snapshot(path, trust=True)
    assert isinstance(denoiser, Denoiser) and type(denoiser.net).__name__ == "EDMPrecond"
    assert _leftover_modules() == []
    # A torch_utils already imported (say a real EDM checkout) is put back, not removed.
    theirs = types.ModuleType("torch_utils")
    monkeypatch.setitem(sys.modules, "torch_utils", theirs)
    load_edm_snapshot(path, trust=True)
    assert sys.modules["torch_utils"] is theirs and "torch_utils.persistence" not in sys.modules
    assert all(name not in sys.modules or sys.modules[name] is not shim for name, shim in SHIMS.items())


def test_denoiser_equals_original_network(snapshot):
    path, net = snapshot
    denoiser = load_edm_snapshot(path, trust=True)
    assert denoiser.shape == (CHANNELS, RES, RES) and denoiser.num_classes == LABELS
    # EDMPrecond declares sigma in [0, inf); sampling uses EDM's [0.002, 80] within it.
    assert (denoiser.sigma_min, denoiser.sigma_max) == (0.002, 80.0)
    assert not denoiser.net.training and not any(p.requires_grad for p in denoiser.parameters())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, CHANNELS, RES, RES, generator=gen)
    sigma = torch.tensor([0.01, 0.5, 3.0, 70.0])
    labels = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 1]), LABELS).float()
    out = denoiser(x, sigma, class_labels=labels)
    assert out.dtype == x.dtype and torch.equal(out, net(x, sigma, class_labels=labels))
    # Integer labels are one-hot encoded; float64 input comes back as float64.
    assert torch.equal(denoiser(x, sigma, class_labels=torch.tensor([0, 1, 2, 1])), out)
    assert denoiser(x.double(), sigma.double(), class_labels=labels).dtype == torch.float64


def test_class_labels_reach_the_network(snapshot):
    denoiser = load_edm_snapshot(snapshot[0], trust=True)
    x = torch.randn(1, CHANNELS, RES, RES).expand(3, -1, -1, -1)
    sigma = torch.full((3,), 1.0)
    outs = denoiser(x, sigma, class_labels=torch.eye(LABELS))
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])
    uncond = denoiser(x, sigma)                       # no labels = all-zero rows = unconditional
    assert torch.equal(uncond, denoiser(x, sigma, class_labels=torch.zeros(3, LABELS)))
    assert not torch.equal(uncond[0], outs[0])
    with pytest.raises(ValueError, match="one-hot rows of shape"):
        denoiser(x, sigma, class_labels=torch.ones(3, LABELS + 1))


def test_sampling_is_deterministic(snapshot):
    denoiser = load_edm_snapshot(snapshot[0], trust=True)
    noise = torch.randn(2, CHANNELS, RES, RES, generator=torch.Generator().manual_seed(3))
    onehot = torch.eye(LABELS)[[0, 2]]
    runs = [diffsampler.sample(denoiser, noise, solver="heun", nfe=10, cond={"class_labels": onehot})
            for _ in range(2)]
    assert runs[0].nfe == 10 and runs[0].samples.shape == noise.shape
    assert torch.isfinite(runs[0].samples).all() and torch.equal(runs[0].samples, runs[1].samples)
    assert not torch.equal(runs[0].samples, noise * 80.0)


def test_reloaded_network_can_be_written_again(snapshot, tmp_path):
    path, net = snapshot
    first = load_edm_snapshot(path, trust=True)
    again = load_edm_snapshot(save_edm_snapshot(tmp_path / "again.pkl", {"ema": first.net}), trust=True)
    x, sigma = torch.randn(2, CHANNELS, RES, RES), torch.tensor([0.3, 5.0])
    assert torch.equal(again(x, sigma), net(x, sigma))


def _damaged(snapshot, kind, tmp_path):
    path, net = snapshot
    target = tmp_path / "bad.pkl"
    if kind == "missing":
        return tmp_path / "nope.pkl"
    if kind == "text":
        target.write_text("not a pickle\n")
    elif kind == "zip":
        torch.save({"ema": net.state_dict()}, target)
    elif kind == "truncated":
        target.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    elif kind == "list":
        save_edm_snapshot(target, [net])
    elif kind == "no-ema":
        save_edm_snapshot(target, {"net": net})
    elif kind == "source-import":
        # The pickled source needs a module that is not here (same-length edit keeps the pickle valid).
        target.write_bytes(dumps_edm_snapshot({"ema": net}).replace(b"import torch\n", b"import t0rch\n", 1))
    return target


@pytest.mark.parametrize("kind, error, match", [
    ("missing", FileNotFoundError, r"nope\.pkl does not exist"),
    ("text", EDMSnapshotError, r"bad\.pkl is not a pickle file"),
    ("zip", EDMSnapshotError, r"bad\.pkl is a zip archive \(a torch\.save checkpoint\?\)"),
    ("truncated", EDMSnapshotError, r"bad\.pkl could not be unpickled \(corrupt or truncated"),
    ("list", EDMSnapshotError, r"bad\.pkl holds a list, not an EDM network snapshot"),
    ("no-ema", EDMSnapshotError, r"bad\.pkl has no 'ema' entry \(keys: 'net'\)"),
    ("source-import", EDMSnapshotError, r"class EDMPrecond in 'ema' could not be rebuilt.*No module named 't0rch'"),
])
def test_clear_errors(snapshot, tmp_path, kind, error, match):
    with pytest.raises(error, match=match):
        load_edm_snapshot(_damaged(snapshot, kind, tmp_path), trust=True)
    assert _leftover_modules() == []


def test_unloadable_side_entries_do_not_block_the_network(snapshot, tmp_path):
    path, net = snapshot
    source = ("import math\nfrom torch_utils import persistence\n\n"
              "@persistence.persistent_class\nclass Pipe:\n    pass\n")
    data = dumps_edm_snapshot({"ema": net, "augment_pipe": module_from_source(source).Pipe()})
    target = tmp_path / "side.pkl"
    target.write_bytes(data.replace(b"import math\n", b"import m4th\n", 1))
    x, sigma = torch.randn(1, CHANNELS, RES, RES), torch.tensor([2.0])
    assert torch.equal(load_edm_snapshot(target, trust=True)(x, sigma), net(x, sigma))
    with pytest.raises(EDMSnapshotError, match=r"class Pipe in 'augment_pipe' could not be rebuilt.*m4th"):
        load_edm_snapshot(target, trust=True, key="augment_pipe")


def test_cli_samples_an_edm_snapshot_only_with_trust(snapshot, tmp_path):
    from click.testing import CliRunner
    from diffsampler.cli import main
    two_channels = snapshot[0]
    bad = CliRunner().invoke(main, ["sample", "--model", f"edm:{two_channels}", "--trust-pickle", "--outdir",
                                    str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "2 channels" in bad.output and not (tmp_path / "bad").exists()
    path = save_edm_snapshot(tmp_path / "gray.pkl", {"ema": tiny_edm_network(img_resolution=RES, img_channels=1,
                                                                             label_dim=LABELS, seed=2)})
    refused = CliRunner().invoke(main, ["sample", "--model", f"edm:{path}", "--outdir", str(tmp_path / "no")])
    assert refused.exit_code == 2 and "--trust-pickle" in refused.output and not (tmp_path / "no").exists()
    ok = CliRunner().invoke(main, ["sample", "--model", f"edm:{path}", "--trust-pickle", "--solver", "heun",
                                   "--nfe", "6", "--seeds", "0-3", "--outdir", str(tmp_path / "yes")])
    assert ok.exit_code == 0, ok.output
    assert len(list((tmp_path / "yes" / "000000").glob("*.png"))) == 4 and "NFE per image 6" in ok.output
