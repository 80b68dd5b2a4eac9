"""Learned samplers (LD3, S4S, PAS, EPD; AMED has its own file): neutral parameters are the base
solver exactly, training lowers the held-out error against the exact endpoint of an analytic
mixture, files round-trip to identical samples and are refused elsewhere, NFE is measured, and
torchrun training equals one process."""
import os
import socket
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from diffsampler import learn, load_learned, sample
from diffsampler.cli import main
from diffsampler.learned import LEARNED
from diffsampler.models.guidance import ClassifierFreeGuidance
from diffsampler.models.specs import load_model
from diffsampler.reference import solve_ode
from diffsampler.seeds import seed_noise

from conftest import mixture

SPEC = "gmm:synthetic:6:1x6x6:3"


@pytest.fixture(scope="module")
def analytic():
    model = load_model(SPEC)
    noise = seed_noise(range(5000, 5064), model.shape, dtype=torch.float64)      # held out: never trained on
    return model, noise, solve_ode(model, noise * 80.0, 80.0, 0.002, tol=1e-9)


def rmse(out, ref):
    return float((out - ref).flatten(1).pow(2).mean(1).sqrt().mean())


# --- neutral parameters are the base solver -------------------------------------------------------

NEUTRAL = [("ld3", "unipc", 5, False), ("ld3", "ipndm", 4, True), ("ld3", "heun", 6, False), ("ld3", "deis", 5, False),
           ("s4s", "unipc", 5, False), ("s4s", "ipndm", 6, True), ("s4s", "dpmpp", 4, False),
           ("pas", "ipndm", 5, False), ("pas", "dpmpp", 6, True), ("pas", "heun", 4, False),
           ("epd", "ipndm", 5, False), ("epd", "dpmpp", 6, True)]


@pytest.mark.parametrize("method, solver, nfe, afs", NEUTRAL)
def test_neutral_parameters_reproduce_the_base_solver(method, solver, nfe, afs):
    model = mixture()
    noise = torch.randn(5, 12, dtype=torch.float64)
    learned = LEARNED[method].create(model, (12,), nfe=nfe, solver=solver, afs=afs)
    ours = sample(model, noise, learned=learned)
    base = sample(model, noise, solver=solver, sigmas=learned.settings["sigmas"], afs=afs)
    if method == "epd":      # the plugin's grid has fewer steps: K evaluations per step from step 1
        assert ours.nfe == nfe and ours.rounds < ours.nfe
    else:
        assert ours.nfe == base.nfe == nfe
    torch.testing.assert_close(ours.samples, base.samples, rtol=0, atol=1e-12)


def test_epd_solver_at_neutral_is_the_midpoint_method_and_counts_every_parallel_point():
    model = mixture()
    noise = torch.randn(5, 12, dtype=torch.float64)
    learned = LEARNED["epd"].create(model, (12,), nfe=6, solver="epd", points=2)
    ours = sample(model, noise, learned=learned)
    midpoint = sample(model, noise, solver="dpm2", sigmas=learned.settings["sigmas"])
    assert ours.nfe == 6 and ours.rounds == 4 and midpoint.nfe == 4      # 2 steps x (1 + 2 points), 2 rounds each
    torch.testing.assert_close(ours.samples, midpoint.samples, rtol=0, atol=1e-12)


def test_parallel_evaluation_is_one_call_with_the_conditioning_repeated():
    from diffsampler.loop import Evaluator
    calls = []

    def model(x, sigma, label=None):
        calls.append((x.shape[0], label.tolist()))
        return x * 0 + label[:, None]
    ev = Evaluator(model, {"label": torch.tensor([1.0, 2.0])}, torch.float64, torch.float64, 2, torch.device("cpu"), 8)
    a, b, c = ev.parallel([torch.zeros(2, 3)] * 3, [1.0, torch.tensor(2.0), torch.tensor([3.0, 4.0])])
    assert calls == [(6, [1.0, 2.0] * 3)] and ev.calls == 3 and ev.rounds == 1
    assert torch.equal(c, torch.tensor([[1.0] * 3, [2.0] * 3], dtype=torch.float64))


# --- training against the exact endpoint ----------------------------------------------------------

@pytest.mark.parametrize("method, solver, nfe", [("ld3", "unipc", 4), ("s4s", "unipc", 5), ("pas", "euler", 5),
                                                 ("epd", "ipndm", 5), ("epd", "epd", 6)])
def test_training_lowers_the_held_out_error_against_the_exact_endpoint(analytic, method, solver, nfe):
    model, noise, exact = analytic
    learned = learn(method, model, nfe=nfe, solver=solver, iters=30, batch=16, train_images=128, val_images=32)
    trained = sample(model, noise, learned=learned)
    neutral = sample(model, noise, learned=LEARNED[method].create(model, model.shape, nfe=nfe, solver=solver))
    assert trained.nfe == neutral.nfe == nfe
    assert learned.settings["best_iteration"] > 0
    assert rmse(trained.samples, exact) < 0.95 * rmse(neutral.samples, exact), \
        (rmse(trained.samples, exact), rmse(neutral.samples, exact))


@pytest.mark.parametrize("solver", ["ipndm_v", "deis", "dpmpp", "unipc", "ipndm"])
def test_the_grid_gradient_reaches_every_interior_point(solver):
    """LD3 can train any solver's grid: the endpoint is differentiable in every interior sigma
    (the variable-step weights of ipndm_v and DEIS included)."""
    model = mixture()
    learned = LEARNED["ld3"].create(model, (12,), nfe=5, solver=solver)
    plan = learned.plan(model, (12,), differentiable=True)
    out = sample(model, torch.randn(3, 12, dtype=torch.float64), plan=plan, grad=True)
    out.samples.square().sum().backward()
    grad = learned.grid_params.offsets.grad
    assert grad is not None and bool((grad != 0).all()), grad


# --- files ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, solver", [("ld3", "unipc"), ("s4s", "ipndm"), ("pas", "dpmpp"), ("epd", "ipndm")])
def test_saved_and_loaded_samplers_sample_identically_and_are_refused_elsewhere(tmp_path, method, solver):
    model = load_model(SPEC)
    learned = learn(method, model, nfe=5, solver=solver, iters=3, batch=4, train_images=8, val_images=4, lr=0.05)
    path = learned.save(tmp_path / f"{method}.pt")
    noise = seed_noise(range(6), model.shape, dtype=torch.float64)
    before = sample(model, noise, learned=learned).samples
    assert torch.equal(sample(model, noise, learned=load_learned(path)).samples, before)
    assert torch.equal(sample(model, noise, learned=str(path)).samples, before)
    with pytest.raises(ValueError, match="trained for another model"):
        sample(load_model("gmm:synthetic:6:1x6x6:4"), noise, learned=learned)
    with pytest.raises(ValueError, match="trained for NFE 5, not 6"):
        sample(model, noise, learned=learned, nfe=6)
    with pytest.raises(ValueError, match=r"shape \(1, 6, 6\), not \(1, 4, 4\)"):
        sample(model, torch.randn(2, 1, 4, 4), learned=learned)
    with pytest.raises(ValueError, match="brings its own grid"):
        sample(model, noise, learned=learned, schedule="logsnr")


def test_a_sampler_trained_with_guidance_needs_the_same_guidance():
    class Labelled(type(load_model(SPEC))):
        num_classes = 2
    base = load_model(SPEC)
    model = Labelled(base.means.reshape(-1, 1, 6, 6), stds=base.stds)
    guided = ClassifierFreeGuidance(model, 2.0)
    cond = lambda seeds: {"class_labels": torch.eye(2)[[s % 2 for s in seeds]]}
    learned = learn("ld3", guided, nfe=4, solver="ipndm", iters=1, batch=4, train_images=4, val_images=4, cond=cond)
    with pytest.raises(ValueError, match="trained with guidance 2, not 1"):
        sample(model, torch.randn(2, 1, 6, 6, dtype=torch.float64), learned=learned)


def test_cli_learn_and_sample_with_the_file(tmp_path):
    runner = CliRunner()
    out = tmp_path / "ld3.pt"
    made = runner.invoke(main, ["learn", "ld3", "--model", SPEC, "--solver", "ipndm", "--nfe", "4", "--iters", "4",
                                "--batch", "8", "--train-images", "16", "--val-images", "8", "--out", str(out)])
    assert made.exit_code == 0, made.output
    assert "ipndm at NFE 4" in made.output and "validation RMSE" in made.output
    result = runner.invoke(main, ["sample", "--model", SPEC, "--learned", str(out), "--seeds", "0-3",
                                  "--outdir", str(tmp_path / "imgs")])
    assert result.exit_code == 0 and "NFE per image 4" in result.output, result.output
    bad = runner.invoke(main, ["learn", "nope", "--model", SPEC, "--nfe", "4", "--out", str(tmp_path / "x.pt")])
    assert bad.exit_code == 2 and "unknown learned sampler 'nope'" in bad.output


def test_torchrun_training_equals_one_process(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        "import os, sys, torch\n"
        "from diffsampler import learn\nfrom diffsampler.models.specs import load_model\n"
        "if int(os.environ.get('WORLD_SIZE', '1')) > 1:\n    torch.distributed.init_process_group('gloo')\n"
        f"model = load_model({SPEC!r})\n"
        "s = learn('s4s', model, nfe=4, solver='ipndm', iters=4, batch=8, train_images=16, val_images=8, lr=0.01)\n"
        "if int(os.environ.get('RANK', '0')) == 0:\n    s.save(sys.argv[1])\n"
        "if torch.distributed.is_initialized():\n    torch.distributed.destroy_process_group()\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one.pt")], env=env, capture_output=True, text=True)
    with socket.socket() as probe:                  # a free port (another job may hold the usual ones)
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
                          str(script), str(tmp_path / "two.pt")], env=env, capture_output=True, text=True)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    a, b = load_learned(tmp_path / "one.pt"), load_learned(tmp_path / "two.pt")
    assert b.settings["processes"] == 2
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-9, msg=name)


def test_auto_base_is_the_most_accurate_untrained_base_on_the_validation_seeds(analytic):
    """solver='auto' sweeps the bases on validation seeds (never the held-out ones) against an
    accurate teacher and trains on the best; checked here by redoing the sweep independently."""
    from diffsampler.learned.select import candidates
    model, noise, exact = analytic
    learned = learn("s4s", model, nfe=4, iters=20, batch=16, train_images=64, val_images=32)
    choice = learned.settings["base_choice"]
    assert choice["rule"] == "auto" and choice["tried"] > 20
    val = seed_noise(range(2_000_000, 2_000_032), model.shape, dtype=torch.float64)
    target = solve_ode(model, val * 80.0, 80.0, 0.002, tol=1e-9)
    scores = {}
    for request in candidates(LEARNED["s4s"].accepts):
        try:
            scores[str(request)] = rmse(sample(model, val.float(), nfe=4, **request).samples.double(), target)
        except ValueError:
            continue
    assert str(choice["chosen"]) == min(scores, key=scores.get)
    neutral = LEARNED["s4s"].create(model, model.shape, nfe=4, **choice["chosen"])
    assert rmse(sample(model, noise, learned=learned).samples, exact) <= rmse(sample(model, noise, learned=neutral).samples, exact)


def test_the_default_teacher_is_far_more_accurate_than_the_base_and_validation_uses_256_seeds(analytic):
    """Defaults (evaluation/learned_training_defaults.py): the teacher's own endpoint error is a
    small fraction of the base solver's, so a student imitating it is not held at the teacher's
    error; 256 validation seeds for LD3/S4S/PAS/EPD, 64 for AMED (measured so)."""
    from diffsampler.learned.distill import refine
    model, noise, exact = analytic
    learned = learn("ld3", model, nfe=6, solver="ipndm", iters=1, batch=4, train_images=4)
    settings = learned.settings
    assert settings["val_images"] == 256 and settings["teacher"] == "dpmpp"
    grid = LEARNED["ld3"].create(model, model.shape, nfe=6, solver="ipndm").grid()
    teacher = refine(grid, settings["M"])
    assert len(teacher) - 1 >= 48
    base_error = rmse(sample(model, noise, nfe=6, solver="ipndm").samples, exact)
    teacher_error = rmse(sample(model, noise, solver="dpmpp", sigmas=teacher, afs=False).samples, exact)
    assert teacher_error < 0.05 * base_error
    amed = learn("amed", model, nfe=4, iters=1, batch=4, train_images=4)
    assert amed.settings["val_images"] == 64


def test_a_confirmation_on_fresh_seeds_keeps_the_chosen_iterate_only_where_it_beats_the_base(analytic):
    """``confirm_images``: the iterate validation chose must be significantly better than the base
    again on other seeds, or the neutral parameters (the base solver exactly) come back."""
    from diffsampler.learned.distill import VAL_SEEDS
    model, noise, _ = analytic
    kw = dict(nfe=4, solver="unipc", iters=30, batch=16, train_images=128, val_images=32)
    plain = learn("ld3", model, **kw)
    chosen = plain.settings["best_iteration"]
    assert chosen > 0 and plain.settings["confirmation"] is None and plain.settings["confirm_images"] == 0
    # confirmed on the validation seeds themselves: the same paired test, so the same verdict and value
    same = learn("ld3", model, confirm_images=32, confirm_seed=VAL_SEEDS, **kw)
    assert same.settings["best_iteration"] == chosen and same.settings["confirmation"]["kept"]
    assert same.settings["confirmation"]["learned"] == pytest.approx(dict(plain.settings["validation"])[chosen], rel=1e-9)
    assert same.settings["confirmation"]["neutral"] == pytest.approx(plain.settings["validation"][0][1], rel=1e-9)
    # a seed on which that iterate lands farther from the teacher than the base does: rejected
    from diffsampler.learned.distill import refine
    neutral = LEARNED["ld3"].create(model, model.shape, nfe=4, solver="unipc")
    seeds = list(range(2_500_000, 2_500_064))
    fresh = seed_noise(seeds, model.shape)
    teacher = sample(model, fresh, solver="dpmpp", sigmas=refine(neutral.grid(), plain.settings["M"]), afs=False).samples
    error = lambda s: (sample(model, fresh, learned=s).samples - teacher).flatten(1).pow(2).mean(1).sqrt()
    ratio = error(plain) / error(neutral)
    worse = seeds[int(ratio.argmax())]
    assert ratio.max() > 1.5 and ratio.median() < 0.8          # most seeds improve, this one does not
    rejected = learn("ld3", model, confirm_images=1, confirm_seed=worse, **kw)
    assert rejected.settings["best_iteration"] == 0 and not rejected.settings["confirmation"]["kept"]
    assert torch.equal(sample(model, noise, learned=rejected).samples, sample(model, noise, learned=neutral).samples)
