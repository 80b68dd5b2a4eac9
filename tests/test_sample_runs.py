"""Sampling runs for real: resume after a kill, torchrun with 2 processes, labels, npz."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from diffsampler.cli import main
from diffsampler.generate import image_path, seed_labels

MODEL = "gmm:synthetic:6:1x8x8:0"


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob("*.png")) if p.name != "grid.png"}


def test_killed_run_resumes_to_the_identical_set_without_temporary_files(tmp_path):
    reference = tmp_path / "reference"
    assert run_cli("sample", "--model", MODEL, "--seeds", "0-399", "--batch", 8, "--outdir", reference,
                   "--no-grid").exit_code == 0
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "diffsampler", "sample", "--model", MODEL, "--seeds", "0-399", "--batch", "8",
           "--outdir", str(killed), "--no-grid"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while len(list(killed.rglob("*.png"))) < 40 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(files(killed))
    assert 0 < partial < 400, f"the run should have been killed midway, it wrote {partial} images"
    (killed / "000000" / ".000399.png.abc.tmp").write_bytes(b"half")   # what a kill mid-write leaves
    result = run_cli("sample", "--model", MODEL, "--seeds", "0-399", "--batch", 8, "--outdir", killed, "--no-grid")
    assert f"({400 - partial} new, {partial} already there)" in result.output
    assert files(killed) == files(reference)
    assert not list(killed.rglob("*.tmp"))


def test_torchrun_two_processes_write_the_same_bytes_as_one(tmp_path):
    single = tmp_path / "one"
    run_cli("sample", "--model", MODEL, "--seeds", "0-19", "--batch", 4, "--outdir", single, "--npz", tmp_path / "one.npz")
    double = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29533", "-m", "diffsampler", "sample", "--model", MODEL, "--seeds", "0-19", "--batch", "3",
                          "--outdir", str(double), "--npz", str(tmp_path / "two.npz")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert files(double) == files(single) and len(files(single)) == 20
    assert (double / "grid.png").read_bytes() == (single / "grid.png").read_bytes()
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert np.array_equal(one["samples"], two["samples"]) and one["samples"].shape == (20, 8, 8, 1)
    assert one["seeds"].tolist() == list(range(20))


def test_random_labels_depend_only_on_the_seed():
    assert seed_labels([5, 1, 9], 10).tolist() == [seed_labels([s], 10).item() for s in (5, 1, 9)]
    labels = seed_labels(range(200), 10)
    assert set(labels.tolist()) == set(range(10))


def test_class_for_an_unconditional_model_is_refused(tmp_path):
    result = CliRunner().invoke(main, ["sample", "--model", MODEL, "--class", "3", "--outdir", str(tmp_path / "o")])
    assert result.exit_code == 2 and "model is unconditional" in result.output
    assert not (tmp_path / "o").exists()
    assert image_path(tmp_path, 1234) == tmp_path / "001000" / "001234.png"
