"""SFD / SFD-v (diffsampler.distill): the student, its distillation, its files and its command."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from diffsampler import distill, load_model, sample
from diffsampler.cli import main
from diffsampler.distill.train import teacher_grid
from diffsampler.models.base import NetworkDenoiser
from diffsampler.models.bundled import write_bundled
from diffsampler.models.edm import EDMDenoiser
from diffsampler.models.student import StudentDenoiser, make_student
from diffsampler.models.unet import UNet, UNetConfig
from diffsampler.reference import solve_ode
from diffsampler.schedules import logsnr, polynomial
from diffsampler.seeds import seed_noise

from conftest import mixture

TINY = UNetConfig(image_size=8, base_channels=8, channel_mult=(1, 2), num_classes=3, attention_mid=False, groups=4,
                  noise_embedding_dim=16, emb_dim=16)
TWO_PLANS = {2: {"solver": "euler", "sigmas": [80.0, 9.72, 0.47, 0.002], "afs": True},
             3: {"solver": "euler", "sigmas": [80.0, 17.5, 2.5, 0.17, 0.002], "afs": True}}


def tiny_unet_model(seed=0):
    """A small class-conditional EDM U-Net with non-trivial weights (its zero-initialised layers too)."""
    gen = torch.Generator().manual_seed(seed)
    net = UNet(UNetConfig(**TINY.to_dict()))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return EDMDenoiser(net.requires_grad_(False).eval(), shape=(1, 8, 8), num_classes=3)


def tiny_unet_folder(path):
    model = tiny_unet_model()
    write_bundled(model.net, path, {"format": "diffsampler-edm-unet", "version": 1, "architecture": "unet",
                                    "unet": model.net.config.to_dict(), **model.config(),
                                    "class_names": ["a", "b", "c"]}, "float32")
    return path


class MixtureNetwork(NetworkDenoiser):
    """The exact denoiser of a Gaussian mixture plus a small MLP correction whose last layer starts
    at zero: at first exactly the analytic mixture (whose ODE endpoints are known), and a network
    that distillation can fine-tune."""

    def __init__(self, gmm, hidden=32, exact=True):
        self.gmm, self.shape = gmm, gmm.shape
        dim = math.prod(gmm.shape)
        gen = torch.Generator().manual_seed(3)
        self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.SiLU(), nn.Linear(hidden, dim))
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            if exact:
                self.net[2].weight.zero_()
                self.net[2].bias.zero_()
        self.net.requires_grad_(False)

    def denoise(self, x, sigma, **cond):
        s = sigma.to(torch.float64).reshape(-1, 1)
        inp = torch.cat([x.to(torch.float64).flatten(1) / (1 + s ** 2).sqrt(), s.log() / 4], dim=1)
        correction = (s / (1 + s ** 2).sqrt()) * self.net(inp.float()).double()
        return (self.gmm(x, sigma).to(torch.float64) + correction.reshape(x.shape)).to(x.dtype)


def labels(seeds):
    return {"class_labels": torch.eye(3)[[s % 3 for s in seeds]]}


def network_calls(model):
    """A counter of the network's forward calls (the NFE as the model sees it)."""
    calls = []
    model.network.register_forward_hook(lambda *args: calls.append(1))
    return calls


def test_a_fresh_student_equals_its_teacher_exactly():
    teacher = tiny_unet_model()
    x, sigma = torch.randn(5, 1, 8, 8), torch.tensor([80.0, 9.7, 1.0, 0.3, 0.002])
    cond = labels(range(5))
    student = make_student(teacher, TWO_PLANS)                    # SFD-v: the U-Net gains its step embedding
    assert student.step_input == "native" and teacher.net.step_mlp is None     # the teacher is untouched
    for steps in (3, 4, 7):
        assert torch.equal(student(x, sigma, step_count=steps, **cond), teacher(x, sigma, **cond))
    mlp = MixtureNetwork(mixture(components=4, dim=6), exact=False)
    hooked = make_student(mlp, TWO_PLANS, step_module="0")        # another network: a hook on a named module
    y = torch.randn(5, 6, dtype=torch.float64)
    assert hooked.step_input == "hook" and torch.equal(hooked(y, sigma, step_count=3), mlp(y, sigma))
    with torch.no_grad():                                          # and the step input does reach it
        hooked.step_embedding.mlp[2].weight.fill_(0.1)
        student.inner.net.step_mlp[2].weight.fill_(0.1)
    assert not torch.equal(hooked(y, sigma, step_count=3), hooked(y, sigma, step_count=4))
    assert not torch.equal(student(x, sigma, step_count=3, **cond), student(x, sigma, step_count=4, **cond))


def test_the_teacher_grid_is_the_polynomial_grid_with_m_plus_1_times_the_steps():
    student = polynomial(3, 0.002, 80.0).tolist()
    assert torch.allclose(torch.tensor(teacher_grid(student, 3, "polynomial", {"rho": 7.0}), dtype=torch.float64),
                          polynomial(12, 0.002, 80.0), rtol=1e-12, atol=0)
    fine = teacher_grid(logsnr(4, 0.002, 80.0).tolist(), 2, "logsnr", {})
    assert torch.allclose(torch.tensor(fine, dtype=torch.float64), logsnr(12, 0.002, 80.0), rtol=1e-12, atol=0)


def test_an_nfe_2_student_takes_three_euler_steps_with_the_analytical_first_one_and_calls_the_model_twice():
    student = distill(tiny_unet_model(), nfe="2-3", iters=1, batch=2, val_images=0)
    calls = network_calls(student)
    out = sample(student, seed_noise(range(4), (1, 8, 8)), nfe=2, cond=labels(range(4)))
    assert out.nfe == 2 and len(calls) == 2
    assert out.sigmas.tolist() == polynomial(3, 0.002, 80.0).tolist() and out.plan.afs
    assert out.plan.solver.name == "euler" and out.plan.model_inputs == {"step_count": 3}
    assert sample(student, seed_noise(range(4), (1, 8, 8)), nfe=3, cond=labels(range(4))).nfe == 3 and len(calls) == 5


def test_a_few_iterations_lower_the_endpoint_error_against_the_exact_teacher_on_held_out_seeds():
    """Teacher: an analytic mixture (as a network with a zero correction); exact endpoints by the
    adaptive reference solver.  Forty iterations of SFD at NFE 2 bring the student much closer to
    them on seeds it never trained on."""
    teacher = MixtureNetwork(mixture(components=4, dim=8), hidden=64)
    held_out = range(5_000, 5_064)
    noise = seed_noise(held_out, teacher.shape, dtype=torch.float64)
    exact = solve_ode(teacher.gmm, noise * 80.0, 80.0, 0.002, tol=1e-9)

    def error(model):
        out = sample(model, noise, nfe=2, solver="euler", afs=True).samples if not isinstance(model, StudentDenoiser) \
            else sample(model, noise, nfe=2).samples
        return float((out - exact).flatten(1).pow(2).mean(1).sqrt().mean())
    student = distill(teacher, nfe=2, iters=40, batch=16, lr=3e-3, val_images=16, dtype=torch.float64)
    before, after = error(teacher), error(student)
    assert after < 0.75 * before, (before, after)
    assert student.info["validation"][0][1] > min(v for _, v, _ in student.info["validation"])
    assert student.info["best_iteration"] > 0 and student.info["iterations_done"] == 40


def test_an_interrupted_distillation_resumes_and_ends_bit_identical(tmp_path):
    model = tiny_unet_model()
    options = dict(nfe="2-3", iters=6, batch=4, val_images=4, val_every=2, save_every=3, lr=1e-3)
    straight = distill(model, **options)

    class Killed(Exception):
        pass

    def kill_at_3(it, loss):
        if it == 3:
            raise Killed
    state = tmp_path / "state.pt"
    with pytest.raises(Killed):
        distill(model, state_path=state, log=kill_at_3, **options)
    assert torch.load(state, weights_only=False)["iteration"] == 3
    resumed = distill(model, state_path=state, **options)
    a, b = straight.state()["network"], resumed.state()["network"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.info["losses"] == straight.info["losses"] and resumed.info["validation"] == straight.info["validation"]
    with pytest.raises(ValueError, match="other settings .*lr"):
        distill(model, state_path=state, **{**options, "lr": 5e-4})


@pytest.mark.parametrize("weights_dtype", ["float32", "float16"])
def test_a_student_loaded_from_disk_reproduces_its_samples_and_refuses_other_nfes(tmp_path, weights_dtype):
    student = distill(tiny_unet_model(), nfe="2-3", iters=2, batch=4, val_images=4)
    distill.save(student, tmp_path / "s", weights_dtype=weights_dtype, command="diffsampler distill ...")
    loaded = load_model(str(tmp_path / "s"))
    assert isinstance(loaded, StudentDenoiser) and loaded.native_plans() == student.native_plans()
    if weights_dtype == "float16":          # what float16 storage is: the weights rounded, nothing else
        with torch.no_grad():
            for p in student.parameters():
                p.copy_(p.half().float())
    noise, cond = seed_noise(range(6), (1, 8, 8)), labels(range(6))
    calls = network_calls(loaded)
    for k in (2, 3):
        out = sample(loaded, noise, nfe=k, cond=cond)
        assert out.nfe == k and torch.equal(out.samples, sample(student, noise, nfe=k, cond=cond).samples)
    assert len(calls) == 5
    with pytest.raises(ValueError, match="distilled for NFE 2, 3, not 4"):
        sample(loaded, noise, nfe=4, cond=cond)
    assert sample(loaded, noise, solver="ipndm", nfe=4, cond=cond).nfe == 4  # named: sampled as an ordinary model
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert config["weights_dtype"] == weights_dtype and config["distilled"]["command"] == "diffsampler distill ..."
    assert "diffsampler distill ..." in (tmp_path / "s" / "CARD.md").read_text()


def test_a_student_of_another_network_saves_and_loads_through_its_base_spec(tmp_path, monkeypatch):
    """Students of networks outside the bundled format record the base model's spec and their weights."""
    from diffsampler.models import specs
    monkeypatch.setitem(specs.NAMED, "mixture-net", lambda: MixtureNetwork(mixture(components=4, dim=6)))
    teacher = load_model("mixture-net")
    student = distill(teacher, nfe=[2, 3], iters=2, batch=4, val_images=0, step_module="0", dtype=torch.float64,
                      lr=1e-2)
    distill.save(student, tmp_path / "m", model_spec="mixture-net", weights_dtype="float32")
    loaded = distill.load(tmp_path / "m")
    noise = seed_noise(range(4), teacher.shape, dtype=torch.float64)
    for k in (2, 3):
        assert torch.equal(sample(loaded, noise, nfe=k).samples, sample(student, noise, nfe=k).samples)
    assert not torch.equal(sample(loaded, noise, nfe=2).samples, sample(teacher, noise, solver="euler", nfe=2,
                                                                      afs=True).samples)


def test_cli_distills_a_folder_that_sample_samples(tmp_path):
    model = tiny_unet_folder(tmp_path / "tiny")
    out = tmp_path / "student"
    result = CliRunner().invoke(main, ["distill", "--model", str(model), "--nfe", "2-3", "--iters", "3", "--batch", "4",
                                       "--val-images", "4", "--save-every", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and not (out / "distill_state.pt").exists()
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "CARD.md"}
    card = (out / "CARD.md").read_text()
    assert "diffsampler distill --model" in card and "--nfe 2-3" in card and "min** of distillation" in card
    images = tmp_path / "images"
    done = CliRunner().invoke(main, ["sample", "--model", str(out), "--nfe", "2", "--seeds", "0-5", "--outdir",
                                     str(images)])
    assert done.exit_code == 0, done.output
    settings = json.loads((images / "settings.json").read_text())
    assert settings["nfe"] == 2 and settings["solver"]["name"] == "euler" and len(list(images.rglob("0*.png"))) == 6
    refused = CliRunner().invoke(main, ["sample", "--model", str(out), "--nfe", "4", "--seeds", "0", "--outdir",
                                        str(tmp_path / "x")])
    assert refused.exit_code == 2 and "distilled for NFE 2, 3, not 4" in refused.output


def test_torchrun_two_processes_distil_the_student_of_one(tmp_path):
    """Each rank takes half of every batch's seeds and DDP averages the gradients: the same student
    as one process, to float rounding."""
    model = tiny_unet_folder(tmp_path / "tiny")
    args = ["distill", "--model", str(model), "--nfe", "2-3", "--iters", "4", "--batch", "4", "--val-images", "4",
            "--lr", "1e-3", "--weights-dtype", "float32", "--threads", "1"]
    one = CliRunner().invoke(main, args + ["--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29547", "-m", "diffsampler", *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("wrote ") == 1
    a, b = (json.loads((tmp_path / d / "config.json").read_text())["distilled"] for d in ("one", "two"))
    assert (a["processes"], b["processes"]) == (1, 2)
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-4)
    single, double = load_model(str(tmp_path / "one")), load_model(str(tmp_path / "two"))
    noise, cond = seed_noise(range(8), (1, 8, 8)), labels(range(8))
    for k in (2, 3):
        x, y = (sample(m, noise, nfe=k, cond=cond).samples for m in (single, double))
        assert torch.allclose(x, y, atol=1e-4), float((x - y).abs().max())



def test_sfd_v_on_a_diffusers_unet_through_a_hook_on_its_time_embedding(tmp_path):
    """Any torch network: a tiny diffusers UNet2DModel pipeline gets the step embedding on the output
    of its time_embedding module; the fresh student is its teacher, the trained one is saved with its
    base model's spec and samples from its folder."""
    from tiny_pipelines import ddpm_pipe
    ddpm_pipe(torch.float32).save_pretrained(tmp_path / "ddpm")
    spec = f"diffusers:{tmp_path / 'ddpm'}"
    teacher = load_model(spec)
    fresh = make_student(teacher, TWO_PLANS, step_module="time_embedding")
    x, sigma = torch.randn(3, *teacher.shape), torch.tensor([20.0, 1.0, 0.05])
    with torch.no_grad():
        assert torch.equal(fresh(x, sigma, step_count=3), teacher(x, sigma))
    out = tmp_path / "student"
    result = CliRunner().invoke(main, ["distill", "--model", spec, "--nfe", "2-3", "--step-module", "time_embedding",
                                       "--iters", "2", "--batch", "2", "--val-images", "2", "--lr", "1e-3",
                                       "--weights-dtype", "float32", "--out", str(out)])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "student" and config["base_model"] == spec
    student = load_model(str(out))
    assert student.step_input == "hook" and student.nfes == [2, 3]
    noise = seed_noise(range(2), teacher.shape)
    calls = network_calls(student)
    assert sample(student, noise, nfe=3).nfe == 3 and len(calls) == 3
    assert not torch.equal(sample(student, noise, nfe=2).samples,
                           sample(teacher, noise, solver="euler", nfe=2, afs=True).samples)


def test_the_bundled_sfd_student_samples_with_its_own_grid():
    student = load_model("fashion-mnist-sfd")
    assert isinstance(student, StudentDenoiser) and student.nfes == [2, 3, 4, 5]
    noise = seed_noise(range(4), student.shape)
    cond = {"class_labels": torch.eye(10)[[0, 1, 7, 9]]}
    calls = network_calls(student)
    out = sample(student, noise, nfe=2, cond=cond)
    assert out.nfe == 2 and len(calls) == 2 and out.sigmas.tolist() == polynomial(3, 0.002, 80.0).tolist()
    assert out.samples.abs().max() < 1.5
    with pytest.raises(ValueError, match="distilled for NFE 2, 3, 4, 5, not 6"):
        sample(student, noise, nfe=6, cond=cond)
