"""FID harness: closed forms, agreement with torch-fidelity's own numbers, the CLI and its errors."""
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_fidelity
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

from diffsampler.cli import main
from diffsampler.metrics import CLASSIFIER
from diffsampler.metrics import fid, pipeline
from diffsampler.metrics.classifier import ClassifierConfig, FashionClassifier


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """A randomly initialised classifier in the bundled checkpoint format (the tests need no trained one)."""
    folder = tmp_path_factory.mktemp("classifier")
    torch.manual_seed(0)
    net = FashionClassifier(ClassifierConfig())
    for module in net.modules():          # give BatchNorm non-trivial running statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    state = {k: v.contiguous() for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"classifier": asdict(net.config)}))
    return folder


@pytest.fixture
def use_classifier(classifier_dir, monkeypatch):
    monkeypatch.setenv("DIFFSAMPLER_CLASSIFIER", str(classifier_dir))
    return classifier_dir


def write_images(folder, count, seed, size=28, brightness=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 200, (size, size)) + brightness
    for k in range(count):
        image = np.clip(base + rng.normal(0, 40, (size, size)), 0, 255).astype(np.uint8)
        Image.fromarray(image, mode="L").save(folder / f"{k:05d}.png")
    return folder


def test_frechet_distance_of_gaussians_equals_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    var1, var2 = rng.uniform(0.5, 2, 6), rng.uniform(0.5, 2, 6)
    rotation, _ = np.linalg.qr(rng.normal(size=(6, 6)))           # commuting covariances, not diagonal
    s1, s2 = rotation @ np.diag(var1) @ rotation.T, rotation @ np.diag(var2) @ rotation.T
    closed = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert fid.frechet_distance({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}) == pytest.approx(closed, rel=1e-9)


def test_a_set_against_itself_is_zero_and_sizes_must_match():
    features = torch.randn(500, 16)
    stats = fid.statistics(features)
    assert abs(fid.frechet_distance(stats, stats)) < 1e-8
    with pytest.raises(ValueError, match="different dimensionality: 16 vs 8"):
        fid.frechet_distance(stats, fid.statistics(torch.randn(50, 8)))


def test_our_numbers_equal_torch_fidelitys_own(tmp_path, use_classifier):
    a, b = write_images(tmp_path / "a", 120, seed=1), write_images(tmp_path / "b", 100, seed=2, brightness=60)
    theirs = torch_fidelity.calculate_metrics(
        input1=str(a), input2=str(b), cuda=False, fid=True, kid=True, kid_subset_size=50, kid_subsets=20,
        feature_extractor=CLASSIFIER, classifier_path=str(use_classifier), verbose=False, save_cpu_ram=True)
    from diffsampler.metrics.sources import open_images
    fa = pipeline.features(open_images(a), CLASSIFIER)
    fb = pipeline.features(open_images(b), CLASSIFIER)
    ours_fid = fid.frechet_distance(fid.statistics(fa), fid.statistics(fb))
    ours_kid = fid.kid(fa, fb, subsets=20, subset_size=50)
    assert ours_fid == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)
    assert ours_kid["kid_mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-6)
    assert ours_fid > 1e-5, ours_fid       # a random network's features have a small scale; the sets differ


def json_line(output):
    return json.loads(re.search(r'\{".*\}', output).group(0))      # progress bars share the output


def test_cli_ref_then_calc(tmp_path, use_classifier):
    a, b = write_images(tmp_path / "a", 60, seed=1), write_images(tmp_path / "b", 60, seed=2, brightness=60)
    runner = CliRunner()
    made = runner.invoke(main, ["fid", "ref", "--data", str(a), "--dest", str(tmp_path / "ref.npz")])
    assert made.exit_code == 0, made.output
    self_score = json_line(runner.invoke(main, ["fid", "calc", "--images", str(a), "--ref", str(tmp_path / "ref.npz"),
                                                "--kid", "--prc"]).output)
    assert abs(self_score["fid"]) < 1e-6 and self_score["extractor"] == CLASSIFIER
    assert self_score["precision"] == pytest.approx(1.0) and self_score["recall"] == pytest.approx(1.0)
    other = json_line(runner.invoke(main, ["fid", "calc", "--images", str(b), "--ref", str(tmp_path / "ref.npz")]).output)
    assert other["fid"] > 1e-5
    stored = np.load(tmp_path / "ref.npz")
    assert stored["mu"].shape == (128,) and str(stored["extractor"]) == CLASSIFIER


def test_torchrun_feature_extraction_equals_one_process(tmp_path, use_classifier):
    a = write_images(tmp_path / "a", 45, seed=3)
    CliRunner().invoke(main, ["fid", "ref", "--data", str(a), "--dest", str(tmp_path / "one.npz")])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29534", "-m", "diffsampler", "fid", "ref", "--data", str(a), "--dest",
                          str(tmp_path / "two.npz")], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert np.array_equal(one["mu"], two["mu"]) and np.array_equal(one["sigma"], two["sigma"])
    assert np.array_equal(one["features"], two["features"])


def bad_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    mixed = write_images(tmp_path / "mixed", 2, seed=1)
    Image.fromarray(np.zeros((32, 32), np.uint8), mode="L").save(mixed / "big.png")
    broken = write_images(tmp_path / "broken", 2, seed=1)
    (broken / "bad.png").write_bytes(b"not a png")
    np.savez(tmp_path / "ref8.npz", mu=np.zeros(8), sigma=np.eye(8), extractor=np.array(CLASSIFIER))
    return {
        "empty": (["fid", "ref", "--data", str(tmp_path / "empty"), "--dest", str(tmp_path / "x.npz")], "no images in"),
        "mixed": (["fid", "ref", "--data", str(mixed), "--dest", str(tmp_path / "x.npz")], "images of mixed sizes"),
        "broken": (["fid", "ref", "--data", str(broken), "--dest", str(tmp_path / "x.npz")], "cannot read image"),
        "missing": (["fid", "ref", "--data", str(tmp_path / "nope"), "--dest", str(tmp_path / "x.npz")], "no such folder"),
    }


@pytest.mark.parametrize("case", ["empty", "mixed", "broken", "missing"])
def test_bad_image_sets_are_clear_errors_and_write_nothing(tmp_path, use_classifier, case):
    args, message = bad_inputs(tmp_path)[case]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "x.npz").exists()


def test_reference_of_another_dimensionality_is_refused(tmp_path, use_classifier):
    a = write_images(tmp_path / "a", 10, seed=1)
    np.savez(tmp_path / "ref8.npz", mu=np.zeros(8), sigma=np.eye(8), extractor=np.array(CLASSIFIER))
    result = CliRunner().invoke(main, ["fid", "calc", "--images", str(a), "--ref", str(tmp_path / "ref8.npz")])
    assert result.exit_code == 2 and "the reference has 8 features per image" in result.output
    (tmp_path / "junk.npz").write_bytes(b"junk")
    result = CliRunner().invoke(main, ["fid", "calc", "--images", str(a), "--ref", str(tmp_path / "junk.npz")])
    assert result.exit_code == 2 and "cannot read reference statistics" in result.output


def test_missing_inception_weights_say_where_to_put_them(tmp_path, monkeypatch):
    a = write_images(tmp_path / "a", 4, seed=1)
    result = CliRunner().invoke(main, ["fid", "ref", "--data", str(a), "--extractor", "inception-v3-compat",
                                       "--inception-weights", str(tmp_path / "none.pth"), "--dest", str(tmp_path / "x.npz")])
    assert result.exit_code == 2 and "Inception weights file not found" in result.output
    import urllib.error
    import torch_fidelity.feature_extractor_inceptionv3 as inception
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv("DIFFSAMPLER_INCEPTION_WEIGHTS", raising=False)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(inception, "load_state_dict_from_url", offline)
    result = CliRunner().invoke(main, ["fid", "ref", "--data", str(a), "--extractor", "inception-v3-compat",
                                       "--dest", str(tmp_path / "x.npz")])
    assert result.exit_code == 2 and "not available offline" in result.output
    assert str(Path(tmp_path / "hub" / "checkpoints")) in result.output and not (tmp_path / "x.npz").exists()
