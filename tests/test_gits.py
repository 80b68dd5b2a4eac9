"""GITS: the DP against brute force, the vectorized cost matrix against a naive loop, and the
schedules it finds against the usual ones on analytic models with exact endpoints."""
import itertools
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from diffsampler import Denoiser, Schedule, gits, sample
from diffsampler.cli import main
from diffsampler.generate import seed_labels
from diffsampler.models.specs import load_model
from diffsampler.reference import solve_ode
from diffsampler.seeds import seed_noise
from diffsampler.solvers import get_solver


def random_cost(n, seed):
    gen = torch.Generator().manual_seed(seed)
    cost = torch.rand(n, n, dtype=torch.float64, generator=gen) * 3
    return cost.masked_fill(torch.ones(n, n, dtype=torch.bool).tril(), float("inf"))


def brute_force(cost, num_steps, coeff):
    last = cost.shape[0] - 1
    best, best_path = float("inf"), None
    for middle in itertools.combinations(range(1, last), num_steps - 1):
        path = [0, *middle, last]
        value = gits.path_cost(cost, path, coeff)
        if value < best:
            best, best_path = value, path
    return best, best_path


@pytest.mark.parametrize("coeff", [0.8, 1.0, 1.15, 1.5])
@pytest.mark.parametrize("n", [6, 9])
def test_dp_equals_brute_force(n, coeff):
    for seed in range(4):
        cost = random_cost(n, seed)
        for k in range(1, n):
            path = gits.dp_schedule(cost, k, coeff)
            best, best_path = brute_force(cost, k, coeff)
            assert path[0] == 0 and path[-1] == n - 1 and len(path) == k + 1
            assert gits.path_cost(cost, path, coeff) == pytest.approx(best, rel=1e-12)
            assert path == best_path


def test_dp_sweep_equals_single_runs_and_errors_are_clear():
    cost = random_cost(12, 7)
    sweep = gits.dp_schedules(cost, range(2, 8), [0.9, 1.15])
    for (coeff, k), path in sweep.items():
        assert path == gits.dp_schedule(cost, k, coeff)
    with pytest.raises(ValueError, match=r"num_steps must lie in \[1, 11\]"):
        gits.dp_schedule(cost, 12)


def naive_cost(states, directions, sigmas, metric):
    n = states.shape[0]
    cost = torch.full((n, n), float("inf"), dtype=torch.float64)
    x, d = states.flatten(2), directions.flatten(2)
    for i in range(n - 1):
        for j in range(i + 1, n):
            per = []
            for b in range(x.shape[1]):
                jump = x[i, b] + (sigmas[j] - sigmas[i]) * d[i, b]
                if metric == "l2":
                    per.append(float(torch.sqrt(((jump - x[j, b]) ** 2).sum())))
                elif metric == "l1":
                    per.append(float((jump - x[j, b]).abs().sum()))
                else:
                    start, end = x[0, b], x[-1, b]
                    unit = (end - start) / torch.linalg.vector_norm(end - start)

                    def dist(p):
                        rel = p - start
                        return float(torch.linalg.vector_norm(rel - torch.dot(rel, unit) * unit))
                    per.append(dist(jump) - dist(x[j, b]))
            cost[i, j] = sum(per) / len(per)
    return cost


@pytest.mark.parametrize("scale", [1.0, 80.0])
@pytest.mark.parametrize("metric", ["l2", "l1", "dev"])
def test_vectorized_cost_matrix_equals_naive_loop(metric, scale):
    gen = torch.Generator().manual_seed(0)
    states = torch.randn(7, 3, 2, 2, 2, dtype=torch.float64, generator=gen)
    directions = torch.randn(6, 3, 2, 2, 2, dtype=torch.float64, generator=gen)
    sigmas = torch.tensor([9.0, 5.0, 3.0, 1.5, 0.7, 0.2, 0.01], dtype=torch.float64)
    states[0] *= scale                       # a first state as large as sigma_max * noise
    expected = naive_cost(states, directions, sigmas, metric)
    torch.testing.assert_close(gits.cost_matrix(states, directions, sigmas, metric), expected, rtol=1e-9, atol=1e-9)
    chunked = gits.cost_matrix(states, directions, sigmas, metric, max_elements=16)   # one target point at a time
    torch.testing.assert_close(chunked, expected)
    summed = gits.cost_matrix(states, directions, sigmas, metric, reduction="sum")
    torch.testing.assert_close(summed[torch.isfinite(summed)], 3 * expected[torch.isfinite(expected)])


def test_cost_entries_by_hand_and_dev_is_signed_like_the_paper():
    # Two 2-D trajectories on sigmas 2, 1, 0 with the same states (0,0) -> (1,1) -> (2,0): the chord
    # is the x axis and the teacher's deviation is 0, 1, 0.  They differ in the first direction.
    states = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0]], dtype=torch.float64)[:, None].repeat(1, 2, 1)
    directions = torch.tensor([[[-1.0, -3.0], [-1.0, 0.0]],
                               [[0.0, 0.5], [0.0, 0.5]]], dtype=torch.float64)
    sigmas = [2.0, 1.0, 0.0]
    # jumps: from point 0 to sigma 1: (1, 3) and (1, 0); to sigma 0: (2, 6) and (2, 0); from 1 to 0: (1, 0.5)
    dev = gits.cost_matrix(states, directions, sigmas, "dev")
    assert dev[0, 1].item() == pytest.approx(((3 - 1) + (0 - 1)) / 2)     # the second sample's term is -1
    assert dev[0, 2].item() == pytest.approx((6 + 0) / 2)
    assert dev[1, 2].item() == pytest.approx(0.5)
    l2 = gits.cost_matrix(states, directions, sigmas, "l2")
    assert l2[0, 1].item() == pytest.approx((2 + 1) / 2)
    assert l2[0, 2].item() == pytest.approx((6 + 0) / 2)
    assert l2[1, 2].item() == pytest.approx(1.25 ** 0.5)
    assert gits.cost_matrix(states[:, 1:], directions[:, 1:], sigmas, "dev")[0, 1].item() == pytest.approx(-1.0)
    for cost in (dev, l2):
        assert torch.isinf(cost.tril()).sum() == 6        # j <= i is never a step


def test_unknown_metric_lists_the_valid_ones():
    with pytest.raises(ValueError, match="use one of l2, l1, dev"):
        gits.cost_matrix(torch.zeros(3, 1, 2), torch.zeros(2, 1, 2), [3.0, 2.0, 1.0], "l3")


@pytest.fixture(scope="module")
def digits():
    model = load_model("gmm:digits")
    noise = seed_noise(range(10_000, 10_048), model.shape, dtype=torch.float64)
    return model, noise, solve_ode(model, noise * 80.0, 80.0, 0.002, tol=1e-8)


def endpoint_error(model, noise, reference, **kwargs):
    out = sample(model, noise, **kwargs).samples
    return float((out - reference).flatten(1).norm(dim=1).mean())


@pytest.mark.parametrize("solver", ["ipndm", "euler"])
def test_gits_beats_polynomial_and_logsnr_on_the_digits_optimal_denoiser(digits, solver):
    model, noise, reference = digits
    for nfe in (4, 5, 6, 7, 8):
        schedule = gits.optimize_schedule(model, model.shape, nfe=nfe, solver=solver, warmup=64, dtype=torch.float64)
        tuned = endpoint_error(model, noise, reference, solver=solver, schedule=schedule)
        for base in ("polynomial", "logsnr"):
            usual = endpoint_error(model, noise, reference, solver=solver, nfe=nfe, schedule=base)
            assert tuned < usual, f"{solver} NFE {nfe}: GITS {tuned:.3f} vs {base} {usual:.3f}"


def test_afs_schedule_inserts_a_free_first_point_and_samples_with_afs(tmp_path):
    model = load_model("gmm:synthetic:4:1x4x4:0")
    schedule = gits.optimize_schedule(model, model.shape, nfe=4, solver="ipndm", afs=True, warmup=16,
                                      teacher_steps=30, dtype=torch.float64)
    indices = schedule.info["indices"]
    assert len(schedule.sigmas) == 6 and schedule.info["afs"] is True
    assert indices[0] == 0 and indices[-1] == 30 and indices == sorted(set(indices))
    noise = seed_noise(range(4), model.shape, dtype=torch.float64)
    assert sample(model, noise, solver="ipndm", schedule=schedule).nfe == 4         # AFS taken from the file
    assert sample(model, noise, solver="ipndm", schedule=schedule, afs=False).nfe == 5


def test_schedule_file_round_trip_and_refusals(tmp_path):
    model = load_model("gmm:synthetic:4:1x4x4:0")
    schedule = gits.optimize_schedule(model, model.shape, nfe=3, solver="euler", warmup=8, teacher_steps=20,
                                      dtype=torch.float64, model_name="gmm:synthetic:4:1x4x4:0")
    path = schedule.save(tmp_path / "gits.json")
    loaded = Schedule.load(path)
    assert torch.equal(loaded.sigmas, schedule.sigmas)
    for key in ("nfe", "solver", "model", "metric", "coeff", "teacher", "warmup", "diffsampler_version"):
        assert loaded.info[key] == schedule.info[key]
    noise = seed_noise(range(3), model.shape, dtype=torch.float64)
    torch.testing.assert_close(sample(model, noise, solver="euler", schedule=str(path)).samples,
                               sample(model, noise, solver="euler", sigmas=schedule.sigmas).samples)
    with pytest.raises(ValueError, match=r"made for samples of shape \(1, 4, 4\), not \(1, 8, 8\)"):
        sample(load_model("gmm:synthetic:4:1x8x8:0"), seed_noise([0], (1, 8, 8)), solver="euler", schedule=str(path))
    narrow = load_model("gmm:synthetic:4:1x4x4:0")
    narrow.sigma_max = 10.0
    with pytest.raises(ValueError, match="outside the model's range 0.002..10; it was made for another model"):
        sample(narrow, noise, solver="euler", schedule=str(path))


def test_cli_gits_then_show_then_sample(tmp_path):
    runner = CliRunner()
    out = tmp_path / "s.json"
    made = runner.invoke(main, ["schedule", "gits", "--model", "gmm:synthetic:4:1x4x4:0", "--nfe", "4",
                                "--warmup", "8", "--teacher-steps", "20", "--out", str(out)])
    assert made.exit_code == 0, made.output
    plain = runner.invoke(main, ["schedule", "show", str(out), "--plain"]).output.strip()
    assert [float(v) for v in plain.split(",")] == Schedule.load(out).sigmas.tolist()
    sampled = runner.invoke(main, ["sample", "--model", "gmm:synthetic:4:1x4x4:0", "--schedule", str(out),
                                   "--seeds", "0-3", "--outdir", str(tmp_path / "img")])
    assert sampled.exit_code == 0 and "NFE per image 4" in sampled.output
    refused = runner.invoke(main, ["sample", "--schedule", str(out), "--outdir", str(tmp_path / "x")])
    assert refused.exit_code == 2 and "made for samples of shape" in refused.output


def test_one_warm_up_serves_every_solver_and_nfe():
    model = load_model("gmm:synthetic:4:1x4x4:0")
    options = dict(warmup=8, teacher_steps=20, dtype=torch.float64)
    warm = gits.warm_up(model, model.shape, **options)
    for solver, nfe in (("euler", 3), ("ipndm", 5), ("heun", 6)):
        direct = gits.optimize_schedule(model, model.shape, nfe=nfe, solver=solver, **options)
        reused = warm.schedule(nfe, solver)
        assert torch.equal(direct.sigmas, reused.sigmas) and direct.info["indices"] == reused.info["indices"]
    assert len(warm.schedule(6, "heun").sigmas) == 4                  # 2 evaluations per step: 3 steps
    with pytest.raises(ValueError, match="keep_endpoints=True"):
        warm.schedule(4, "ipndm", afs=True)


def test_torchrun_splits_the_warm_up_and_finds_the_schedule_of_one_process(tmp_path):
    """Two processes take half the warm-up seeds each and sum their costs: the same schedule (AFS point
    included, which is searched across ranks too) as one process over all seeds, and one file."""
    args = ["schedule", "gits", "--model", "digits", "--nfe", "5", "--afs", "--warmup", "32", "--batch", "8",
            "--teacher-steps", "30"]
    one = CliRunner().invoke(main, args + ["--out", str(tmp_path / "one.json")])
    assert one.exit_code == 0, one.output
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29541", "-m", "diffsampler", *args, "--out", str(tmp_path / "two.json")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    single, double = Schedule.load(tmp_path / "one.json"), Schedule.load(tmp_path / "two.json")
    assert double.info["indices"] == single.info["indices"] and torch.equal(double.sigmas, single.sigmas)
    # 32 seeds in all: each rank did 16 (a rank that ran all of them would make the count 64)
    assert (single.info["processes"], double.info["processes"]) == (1, 2)
    assert single.info["warmup"] == double.info["warmup"] == 32
    assert two.stdout.count("wrote ") == 1                           # rank 0 alone writes and reports


class LabelledGaussians(Denoiser):
    """Class c's data is N(mean_c, I) on 1x4x4 (exact denoiser); records the class rows of every call."""

    shape, num_classes = (1, 4, 4), 3

    def __init__(self):
        self.means = torch.tensor([-2.0, 0.0, 3.0], dtype=torch.float64)
        self.calls, self.moved_to = [], None

    def to(self, device):
        self.moved_to = device
        return self

    def denoise(self, x, sigma, class_labels=None):
        self.calls.append(class_labels.clone())
        mean = (class_labels.to(torch.float64) @ self.means).reshape(-1, 1, 1, 1)
        s2 = sigma.to(torch.float64).reshape(-1, 1, 1, 1) ** 2
        return (mean + (x.to(torch.float64) - mean) / (1 + s2)).to(x.dtype)


@pytest.mark.parametrize("extra, expected", [
    ([], lambda seeds: seed_labels(seeds, 3)),                       # a random class per seed, as sample draws it
    (["--class", "2"], lambda seeds: torch.full((len(seeds),), 2)),
])
def test_cli_warm_up_is_conditioned_like_sample(tmp_path, monkeypatch, extra, expected):
    model = LabelledGaussians()
    monkeypatch.setattr("diffsampler.models.specs.load_model", lambda spec, **kw: model)
    out = tmp_path / "s.json"
    made = CliRunner().invoke(main, ["schedule", "gits", "--model", "labelled", "--nfe", "3", "--warmup", "6",
                                     "--batch", "6", "--teacher-steps", "10", "--first-seed", "100", *extra,
                                     "--out", str(out)])
    assert made.exit_code == 0, made.output
    assert len(model.calls) == 10 and all(torch.equal(c, model.calls[0]) for c in model.calls)
    assert model.calls[0].argmax(1).tolist() == expected(range(100, 106)).tolist()
    info = Schedule.load(out).info
    assert info["first_seed"] == 100 and info["conditioning"]["class"] == (2 if extra else None)


def test_cli_warm_up_with_guidance_makes_batched_cond_uncond_calls(tmp_path, monkeypatch):
    refused = CliRunner().invoke(main, ["schedule", "gits", "--model", "digits", "--nfe", "3", "--class", "1",
                                        "--out", str(tmp_path / "x.json")])
    assert refused.exit_code == 2 and "model is unconditional" in refused.output
    model = LabelledGaussians()
    monkeypatch.setattr("diffsampler.models.specs.load_model", lambda spec, **kw: model)
    made = CliRunner().invoke(main, ["schedule", "gits", "--model", "labelled", "--nfe", "3", "--warmup", "4",
                                     "--batch", "4", "--teacher-steps", "10", "--guidance", "2",
                                     "--device", "cpu:0", "--out", str(tmp_path / "s.json")])
    assert made.exit_code == 0, made.output
    assert model.moved_to == "cpu:0"                                 # the model moved, then guidance wrapped it
    rows = model.calls[0]
    assert len(model.calls) == 10 and rows.shape == (8, 3)           # one 2x-batch call per guided evaluation
    assert rows.sum(1).tolist().count(0.0) == 4                      # the unconditional half
    assert Schedule.load(tmp_path / "s.json").info["conditioning"]["guidance"] == 2.0


def test_cli_sweeps_nfes_and_coefficients_from_one_warm_up(tmp_path, monkeypatch):
    spec = "gmm:synthetic:4:1x4x4:0"
    model = load_model(spec)
    calls = []
    counted = type("Counted", (Denoiser,), {"shape": model.shape, "denoise": lambda self, x, s: calls.append(1) or model(x, s)})()
    monkeypatch.setattr("diffsampler.models.specs.load_model", lambda name, **kw: counted)
    runner = CliRunner()
    args = ["schedule", "gits", "--model", spec, "--warmup", "8", "--teacher-steps", "20"]
    made = runner.invoke(main, args + ["--nfe", "3-4", "--coeff", "1.0,1.15", "--out", str(tmp_path / "g_{nfe}_{coeff}.json")])
    assert made.exit_code == 0, made.output
    assert len(calls) == 20                 # one warm-up (8 seeds in one batch, 20 teacher steps) for 4 schedules
    warm = gits.warm_up(model, model.shape, warmup=8, teacher_steps=20)
    for nfe in (3, 4):
        for coeff in (1.0, 1.15):
            written = Schedule.load(tmp_path / f"g_{nfe}_{coeff:g}.json")
            expected = warm.schedule(nfe, "ipndm", coeff=coeff)
            assert written.info["indices"] == expected.info["indices"] and torch.equal(written.sigmas, expected.sigmas)
            assert (written.info["nfe"], written.info["coeff"]) == (nfe, coeff)
    unnamed = runner.invoke(main, args + ["--nfe", "3-4", "--out", str(tmp_path / "one.json")])
    assert unnamed.exit_code == 2 and "need {nfe} in the file name" in unnamed.output
    odd = runner.invoke(main, args + ["--solver", "heun", "--nfe", "4,5", "--out", str(tmp_path / "h_{nfe}.json")])
    assert odd.exit_code == 2 and "cannot use nfe=5" in odd.output
    assert not (tmp_path / "one.json").exists() and not list(tmp_path.glob("h_*"))      # nothing half-made


def test_solver_metric_prices_euler_exactly_like_the_euler_jump_and_refuses_two_evaluation_solvers():
    """For Euler the student's own update is the Euler jump: metric 'solver' equals 'l2' exactly;
    for a multistep student it prices the jump by its own (history-aware) update."""
    model = load_model("gmm:synthetic:4:1x4x4:0")
    noise = seed_noise(range(8), model.shape, dtype=torch.float64)
    grid = torch.tensor([80.0, 20.0, 5.0, 1.0, 0.2, 0.002], dtype=torch.float64)
    traj = gits.teacher_trajectories(model, noise, grid)
    euler = gits.cost_matrix(traj.states, traj.directions, grid, metric="solver", student=get_solver("euler"))
    l2 = gits.cost_matrix(traj.states, traj.directions, grid, metric="l2")
    upper = torch.ones(6, 6, dtype=torch.bool).triu(1)
    torch.testing.assert_close(euler[upper], l2[upper], rtol=1e-9, atol=1e-5)   # l2 from Gram matrices: sqrt of ~0
    ipndm = gits.cost_matrix(traj.states, traj.directions, grid, metric="solver", student=get_solver("ipndm"))
    torch.testing.assert_close(ipndm[0], euler[0], rtol=1e-9, atol=1e-12)      # no history yet: an Euler step
    assert not torch.allclose(ipndm[2:, 3:], euler[2:, 3:])                      # then its own multistep update
    with pytest.raises(ValueError, match="one-evaluation solvers"):
        gits.warm_up(model, model.shape, metric="solver", student="heun", warmup=4, teacher_steps=10)
    warm = gits.warm_up(model, model.shape, metric="solver", student="ipndm", warmup=8, teacher_steps=20)
    assert warm.schedule(4, "ipndm").num_steps == 4
    with pytest.raises(ValueError, match="priced jumps by ipndm's own update"):
        warm.schedule(4, "dpmpp")
