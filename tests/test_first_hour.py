"""What a new user meets in the first hour, tried as they would try it: the real command in a fresh
process.  Reruns never reuse images made with other settings; mistakes get one clear line, never a
traceback; what ran is recorded; names from other tools work; ``--help`` is instant."""
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

DIGITS = ["--model", "digits"]


def cli(*args, timeout=120):
    out = subprocess.run([sys.executable, "-m", "diffsampler", *map(str, args)], capture_output=True, text=True,
                         timeout=timeout)
    return out.returncode, out.stdout, out.stderr


def pngs(folder):
    return sorted(p for p in folder.rglob("*.png") if p.name != "grid.png")


# --- 1. a rerun reuses only images made with the same settings -------------------------------------

def test_rerun_with_other_settings_is_refused_and_overwrite_starts_over(tmp_path):
    out = tmp_path / "run"
    code, _, _ = cli("sample", *DIGITS, "--solver", "heun", "--nfe", 4, "--seeds", "0-5", "--outdir", out, "--no-grid")
    assert code == 0
    code, stdout, stderr = cli("sample", *DIGITS, "--solver", "ipndm", "--nfe", 5, "--seeds", "0-9", "--outdir", out)
    assert code == 2 and "Traceback" not in stderr
    assert "other settings" in stderr and "solver.name" in stderr and "--overwrite" in stderr
    assert len(pngs(out)) == 6 and json.loads((out / "settings.json").read_text())["solver"]["name"] == "heun"
    code, stdout, _ = cli("sample", *DIGITS, "--solver", "ipndm", "--nfe", 5, "--seeds", "0-9", "--outdir", out,
                          "--overwrite")
    assert code == 0 and "(10 new, 0 already there)" in stdout
    assert json.loads((out / "settings.json").read_text())["solver"]["name"] == "ipndm"


def test_adding_seeds_to_a_finished_run_is_the_resume_case(tmp_path):
    out = tmp_path / "run"
    assert cli("sample", *DIGITS, "--seeds", "0-3", "--outdir", out)[0] == 0
    code, stdout, _ = cli("sample", *DIGITS, "--seeds", "0-7", "--outdir", out)
    assert code == 0 and "(4 new, 4 already there)" in stdout


def test_images_without_settings_or_from_another_model_are_refused(tmp_path):
    out = tmp_path / "run"
    assert cli("sample", *DIGITS, "--seeds", "0-3", "--outdir", out, "--no-grid")[0] == 0
    code, _, stderr = cli("sample", "--model", "gmm:digits:0.3", "--seeds", "0-3", "--outdir", out)
    assert code == 2 and "weights_hash" in stderr
    (out / "settings.json").unlink()
    code, _, stderr = cli("sample", *DIGITS, "--seeds", "0-3", "--outdir", out)
    assert code == 2 and "no settings.json" in stderr


# --- 2. mistakes that used to end in a traceback -----------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--device", "cuda"], "no CUDA GPU"),
    (["--device", "tpu:0"], "is not a device"),
    (["--schedule", "discrete"], "takes the model's own integer training timesteps"),
    (["--model", "gmm:synthetic:0:1x8x8"], "K >= 1 components"),
    (["--model", "gmm:synthetic:two:1x8x8"], "gmm:synthetic needs K:CxHxW"),
    (["--guidance", "-1"], "-1"),
    (["--class", "3"], "is unconditional"),
    (["--solver", "heun", "--nfe", "5"], "--denoise-to-zero"),
    (["--solver", "dpmpp_2m", "--max-order", "3"], "use solver 'dpmpp' for other values"),
    (["--nfe", "4", "--steps", "4"], "not both"),
])
def test_mistakes_get_one_clear_line(tmp_path, args, message):
    code, stdout, stderr = cli("sample", *DIGITS, *args, "--outdir", tmp_path / "out")
    assert code == 2 and message in stderr and "Traceback" not in stderr, stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("delay", [0.25, 0.6, 1.5, 3.0])   # after the interpreter itself started
def test_ctrl_c_at_any_moment_ends_without_a_traceback(tmp_path, delay):
    proc = subprocess.Popen([sys.executable, "-m", "diffsampler", "sample", "--seeds", "0-999", "--outdir",
                             str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in stderr and stderr.strip().endswith("interrupted"), stderr


def test_discrete_schedule_uses_the_model_table_when_it_has_one():
    import torch
    from diffsampler import sample
    from diffsampler.models.diffusers_pixel import DiffusersDenoiser, discrete_schedule
    from diffusers import DDPMScheduler, UNet2DModel
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 8),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    den = DiffusersDenoiser(unet.eval(), DDPMScheduler(num_train_timesteps=1000).alphas_cumprod)
    noise = torch.randn(2, 1, 8, 8)
    implicit = sample(den, noise, solver="euler", nfe=6, schedule="discrete")
    explicit = sample(den, noise, solver="euler", nfe=6, schedule="discrete", schedule_options=discrete_schedule(den))
    assert torch.equal(implicit.sigmas, explicit.sigmas) and torch.equal(implicit.samples, explicit.samples)


# --- 3. what used to be accepted silently -----------------------------------------------------------

def test_fid_of_a_few_images_warns_in_the_output_and_the_json(tmp_path):
    from diffsampler.metrics.pipeline import BUNDLED_REFERENCE
    assert cli("sample", "--nfe", 3, "--seeds", "0-3", "--outdir", tmp_path / "few", "--no-grid")[0] == 0
    code, stdout, stderr = cli("fid", "calc", "--images", tmp_path / "few", "--ref", BUNDLED_REFERENCE)
    assert code == 0 and "warning:" in stderr and "only 4 images" in stderr
    assert "only 4 images" in json.loads(stdout.strip().splitlines()[-1])["warning"]


def test_a_gits_file_for_another_model_of_the_same_shape_is_refused(tmp_path):
    schedule = tmp_path / "g.json"
    assert cli("schedule", "gits", *DIGITS, "--nfe", 4, "--warmup", 16, "--teacher-steps", 20, "--out", schedule)[0] == 0
    assert json.loads(schedule.read_text())["model_fingerprint"]
    code, _, stderr = cli("sample", "--model", "gmm:digits:0.3", "--schedule", schedule, "--outdir", tmp_path / "o")
    assert code == 2 and "fitted to another model" in stderr
    assert cli("sample", *DIGITS, "--schedule", schedule, "--outdir", tmp_path / "ok")[0] == 0


# --- 4. what ran is recorded --------------------------------------------------------------------------

def test_labels_weights_hash_and_what_ran_are_recorded(tmp_path):
    from diffsampler.defaults import DEFAULT_SCHEDULE, DEFAULT_SCHEDULE_OPTIONS, DEFAULT_SOLVER
    from diffsampler.generate import seed_labels
    from diffsampler.models.identity import weights_hash
    from diffsampler.models.specs import load_model
    from diffsampler.plan import solver_record
    from diffsampler.solvers import get_solver
    code, stdout, _ = cli("sample", "--nfe", 3, "--seeds", "0-7", "--outdir", tmp_path / "s", "--npz", tmp_path / "s.npz")
    assert code == 0 and f"wrote {tmp_path / 's.npz'}" in stdout
    expected = seed_labels(range(8), 10).tolist()
    assert np.load(tmp_path / "s.npz")["labels"].tolist() == expected
    settings = json.loads((tmp_path / "s" / "settings.json").read_text())
    assert settings["class_labels"] == expected and settings["conditioning"]["labels"] == "random per seed"
    assert settings["weights_hash"] == weights_hash(load_model("fashion-mnist"))
    code, stdout, _ = cli("fid", "run", "--nfe", 3, "--num", 8, "--outdir", tmp_path / "fid")
    record = json.loads((tmp_path / "fid" / "fid.json").read_text())
    assert code == 0 and record["nfe"] == 3 and record["schedule"]["name"] == DEFAULT_SCHEDULE
    assert record["schedule"]["options"]["rho"] == DEFAULT_SCHEDULE_OPTIONS["rho"]       # and the grid's VP betas
    assert record["solver"] == solver_record(get_solver(DEFAULT_SOLVER))    # the name and every default option
    assert "warning" in record


# --- 6. start-up ------------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["--help"], ["sample", "--help"], ["sample", "--nfe", "abc", "--outdir", "x"],
                                  ["sample", "--seeds", "9-2", "--outdir", "x"], ["learn", "--help"]])
def test_help_and_usage_errors_do_not_import_torch(args):
    code = ("import sys\nsys.argv = ['diffsampler', *%r]\nfrom diffsampler.entry import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\nprint('TORCH', 'torch' in sys.modules)\n") % (args,)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "TORCH False" in out.stdout, out.stdout + out.stderr


# --- 7. names users already know ------------------------------------------------------------------

def test_steps_aliases_and_low_nfe_warning(tmp_path):
    code, stdout, stderr = cli("sample", *DIGITS, "--solver", "heun", "--steps", 2, "--schedule", "karras",
                               "--seeds", "0-1", "--outdir", tmp_path / "a")
    assert code == 0 and "NFE per image 4" in stdout and "warning: heun makes 2 evaluations per step" in stderr
    code, stdout, _ = cli("sample", *DIGITS, "--solver", "dpmpp_2m", "--nfe", 5, "--schedule", "exponential",
                          "--seeds", "0-1", "--outdir", tmp_path / "b")
    settings = json.loads((tmp_path / "b" / "settings.json").read_text())
    assert code == 0 and settings["solver"] == {"name": "dpmpp", "max_order": 2, "lower_order_final": False,
                                                "solver_type": "midpoint", "legacy_third_order": True}
    assert settings["schedule"]["name"] == "logsnr"
    code, stdout, _ = cli("sample", *DIGITS, "--solver", "heun", "--nfe", 35, "--denoise-to-zero", "--seeds", "0",
                          "--outdir", tmp_path / "edm")
    assert code == 0 and "NFE per image 35" in stdout


# --- 11. small things -------------------------------------------------------------------------------

def test_list_is_a_clean_table():
    code, stdout, _ = cli("list")
    lines = stdout.splitlines()
    rows = lines[lines.index("Solvers:") + 1:lines.index("Aliases:")]
    starts = {line.index(" order ") if " order " in line else None for line in rows[:1]}
    assert starts and "``" not in stdout and ":func:" not in stdout
    order_column = rows[0].index("order")
    assert all(row[order_column - 2:order_column] == "  " for row in rows)     # every row's columns line up
    assert "dpmpp_2m" in stdout and "karras" in stdout and "amed" in stdout.split("Learned samplers")[1]


def test_progress_bars_are_quiet_in_logs(monkeypatch):
    from diffsampler import progress
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert progress.bar(total=10).mininterval == 30.0


def test_gits_warm_up_ticks_once_per_teacher_step(monkeypatch):
    from diffsampler import gits, progress
    from diffsampler.models.specs import load_model
    ticks = []

    class Recorder:
        def __init__(self, total, **kw):
            self.total = total

        def update(self, n=1):
            ticks.append(n)

        def close(self):
            pass
    monkeypatch.setattr(progress, "bar", lambda total=None, **kw: Recorder(total))
    model = load_model("digits")
    gits.warm_up(model, model.shape, warmup=8, batch=4, teacher_steps=10, progress=True)
    assert len(ticks) == 2 * 10
