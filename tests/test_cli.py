"""The command line on the bundled default model: real PNGs, batch independence, clear errors."""
import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from diffsampler import SOLVERS, schedules
from diffsampler.solvers import ALIASES
from diffsampler.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


DIGITS = ("--model", "digits")      # the analytic 8x8 model: fast, and its images are exact data points


def pngs(folder):
    return sorted(p for p in folder.rglob("*.png") if p.name != "grid.png")


def test_sample_writes_one_real_png_per_seed_plus_grid(tmp_path):
    result = run("sample", *DIGITS, "--solver", "ipndm", "--nfe", 5, "--seeds", "0-11", "--outdir", tmp_path)
    assert result.exit_code == 0, result.output
    files = pngs(tmp_path)
    assert [p.name for p in files] == [f"{s:06d}.png" for s in range(12)]
    assert all(p.parent.name == "000000" for p in files)
    images = [np.array(Image.open(p)) for p in files]
    assert all(im.shape == (8, 8) and im.dtype == np.uint8 for im in images)
    assert len({im.tobytes() for im in images}) == 12 and max(im.std() for im in images) > 20   # real, distinct
    assert Image.open(tmp_path / "grid.png").size[0] >= 256
    settings = json.loads((tmp_path / "settings.json").read_text())
    assert settings["nfe"] == 5 and settings["solver"]["name"] == "ipndm" and len(settings["sigmas"]) == 6
    assert "NFE per image 5" in result.output


def test_same_seed_same_image_whatever_the_batch(tmp_path):
    run("sample", *DIGITS, "--seeds", "0-9", "--batch", 10, "--outdir", tmp_path / "a", "--no-grid")
    run("sample", *DIGITS, "--seeds", "0-9", "--batch", 3, "--outdir", tmp_path / "b", "--no-grid")
    run("sample", *DIGITS, "--seeds", "7,3", "--batch", 1, "--outdir", tmp_path / "c", "--no-grid")
    a, b = pngs(tmp_path / "a"), pngs(tmp_path / "b")
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    for p in pngs(tmp_path / "c"):
        assert p.read_bytes() == (tmp_path / "a" / "000000" / p.name).read_bytes()


def test_rerun_skips_finished_seeds(tmp_path):
    run("sample", *DIGITS, "--seeds", "0-3", "--outdir", tmp_path, "--no-grid")
    result = run("sample", *DIGITS, "--seeds", "0-5", "--outdir", tmp_path, "--no-grid")
    assert "(2 new, 4 already there)" in result.output
    assert len(pngs(tmp_path)) == 6


@pytest.mark.parametrize("args,message", [
    (["--solver", "heun", "--nfe", 5], "nfe must be one of 2, 4, 6"),
    (["--schedule", "nope"], "unknown schedule 'nope'"),
    (["--seeds", "10-5"], "seed range '10-5' is empty"),
    (["--nfe", 0], "0 is not in the range x>=1"),
    (["--solver", "nope"], "unknown solver 'nope': valid solvers are euler, heun"),
    (["--model", "nope"], "unknown model 'nope'"),
    (["--sigmas", "1,2,0.5"], "strictly descending"),
    (["--option", "bogus=1"], "has no option 'bogus'"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    result = run("sample", *DIGITS, *args, "--outdir", out) if "--model" not in args else run("sample", *args, "--outdir", out)
    assert result.exit_code == 2
    assert message in result.output
    assert not out.exists()


def test_list_and_help_read_the_registry():
    listing = run("list").output
    for name, cls in SOLVERS.items():
        assert name in listing and cls.nfe_rule() in listing
    for name in schedules.SCHEDULES:
        assert name in listing
    for alias in ALIASES:
        assert alias in listing
    assert "diffsampler list" in run("sample", "--help").output


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "diffsampler", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "sample" in out.stdout and "list" in out.stdout


def test_default_model_is_the_bundled_network_and_follows_class_and_guidance(tmp_path):
    """No --model: the bundled Fashion-MNIST U-Net; --class and --guidance steer it (checked by the
    bundled classifier, not by eye)."""
    import torch
    from diffsampler.metrics.classifier import load_classifier
    result = run("sample", "--class", 7, "--guidance", 2, "--nfe", 10, "--seeds", "0-19", "--outdir", tmp_path)
    assert result.exit_code == 0, result.output
    files = pngs(tmp_path)
    images = np.stack([np.array(Image.open(p)) for p in files])
    assert images.shape == (20, 28, 28)
    x = torch.from_numpy(images).float().unsqueeze(1) / 127.5 - 1
    with torch.no_grad():
        predicted = load_classifier()(x).argmax(1)
    assert (predicted == 7).float().mean() >= 0.7, predicted.tolist()
    settings = json.loads((tmp_path / "settings.json").read_text())
    assert settings["model"] == "fashion-mnist" and settings["conditioning"]["class"] == 7
    assert settings["conditioning"]["guidance"] == 2.0 and settings["class_labels"] == [7] * 20
    bad = run("sample", "--class", 10, "--outdir", tmp_path / "bad")
    assert bad.exit_code == 2 and "classes 0..9" in bad.output
