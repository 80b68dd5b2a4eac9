"""DiffSamplerScheduler inside real diffusers pipelines (tiny, from configs: tests/tiny_pipelines.py).

* ``pipe.scheduler = DiffSamplerScheduler.from_config(pipe.scheduler.config, solver=...)`` then
  ``pipe(..., num_inference_steps=NFE)`` gives the images ``pipelines.run(pipe, solver=..., nfe=NFE)``
  gives from the same latents (1e-5; float64 pixel models ~1e-14), on DDPMPipeline (every solver
  name; epsilon, sample and v prediction), StableDiffusionPipeline (with CFG), SDXL, SD3 and Flux
  (whose pipeline passes its own sigmas and mu), and the network is called exactly NFE times;
* ``euler`` through it equals diffusers' own EulerDiscreteScheduler and FlowMatchEulerDiscreteScheduler
  on the same sigmas, and ``heun`` equals HeunDiscreteScheduler, repeated timesteps included;
* a GITS schedule made by ``diffsampler schedule gits`` on a saved diffusers pipeline plugs into the
  scheduler and into the k-diffusion sampler function;
* what the interface cannot do (AMED predictors, AFS, custom timesteps, img2img) is refused.
"""
import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import tiny_pipelines as tiny  # noqa: E402
from diffsampler import pipelines, sample  # noqa: E402
from diffsampler.integrations.diffusers import DiffSamplerScheduler  # noqa: E402
from diffsampler.models.flux import pack  # noqa: E402
from diffsampler.solvers import get_solver, solver_names  # noqa: E402

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")   # in diffusers' Euler


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny.tokenizer(tmp_path_factory.mktemp("tokenizer"))


def swapped(pipe, **options):
    """The same pipeline (shared modules) with a DiffSamplerScheduler made from its scheduler's config."""
    other = type(pipe)(**pipe.components)
    other.scheduler = DiffSamplerScheduler.from_config(pipe.scheduler.config, **options)
    return tiny.quiet(other)




# --- pixel DDPM: every solver, every prediction type --------------------------------------------------------

@pytest.fixture(scope="module")
def ddpm():
    return tiny.ddpm_pipe()


@pytest.mark.parametrize("name", solver_names())
def test_ddpm_pipeline_every_solver(ddpm, name):
    pipe = swapped(ddpm, solver=name)
    with tiny.CountForwards(pipe.unet) as counter:
        images = pipe(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=6,
                      output_type="np").images
    assert len(counter.batches) == 6 == len(pipe.scheduler.timesteps), "the UNet is called NFE times"
    ref = pipelines.run(ddpm, solver=name, nfe=6, generator=torch.Generator().manual_seed(3), num_images_per_prompt=2,
                        output_type="pt")
    assert ref.nfe == 6
    ours = torch.from_numpy(images).permute(0, 3, 1, 2)
    tiny.assert_close(ours, (ref.latents / 2 + 0.5).clamp(0, 1), f"DDPMPipeline + DiffSamplerScheduler({name}) vs run", 1e-10)


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_ddpm_prediction_types(ddpm, prediction_type):
    base = diffusers.DDPMPipeline(unet=ddpm.unet, scheduler=diffusers.DDPMScheduler(prediction_type=prediction_type))
    pipe = swapped(base, solver="unipc")
    assert pipe.scheduler.config.prediction_type == prediction_type
    images = pipe(batch_size=1, generator=torch.Generator().manual_seed(4), num_inference_steps=5, output_type="np").images
    ref = pipelines.run(tiny.quiet(base), solver="unipc", nfe=5, generator=torch.Generator().manual_seed(4),
                        output_type="pt")
    tiny.assert_close(torch.from_numpy(images).permute(0, 3, 1, 2), (ref.latents / 2 + 0.5).clamp(0, 1),
                      f"DDPM {prediction_type} + DiffSamplerScheduler vs run", 1e-10)


# --- Stable Diffusion, SDXL, Flux ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd(tok):
    return tiny.sd_pipe(tok)


@pytest.mark.parametrize("name,guidance", [("unipc", 7.5), ("heun", 7.5), ("dpmpp_2m", 1.0)])
def test_stable_diffusion(sd, name, guidance):
    pipe = swapped(sd, solver=name)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with tiny.CountForwards(pipe.unet) as counter, torch.no_grad():
        theirs = pipe(["a cat", "dog"], num_inference_steps=6, guidance_scale=guidance, latents=latents.clone(),
                      height=16, width=16, output_type="latent").images
    assert len(counter.batches) == 6 and set(counter.batches) == {4 if guidance != 1 else 2}
    ours = pipelines.run(sd, ["a cat", "dog"], solver=name, nfe=6, guidance=guidance, latents=latents,
                         output_type="latent")
    tiny.assert_close(theirs, ours.latents, f"StableDiffusionPipeline + DiffSamplerScheduler({name}) vs run", 1e-5)


def test_sdxl(tok):
    xl = tiny.sdxl_pipe(tok)
    pipe = swapped(xl, solver="unipc")
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    with tiny.CountForwards(pipe.unet) as counter, torch.no_grad():
        theirs = pipe("a cat", num_inference_steps=5, guidance_scale=5.0, latents=latents.clone(), height=16, width=16,
                      output_type="latent").images
    assert len(counter.batches) == 5
    ours = pipelines.run(xl, "a cat", solver="unipc", nfe=5, guidance=5.0, latents=latents, output_type="latent")
    tiny.assert_close(theirs, ours.latents, "StableDiffusionXLPipeline + DiffSamplerScheduler(unipc) vs run", 1e-5)


def test_sd3(tok):
    """A flow model with a static shift: num_inference_steps is the NFE on the model's own range."""
    sd3 = tiny.sd3_pipe(tok)
    pipe = swapped(sd3, solver="unipc")
    assert pipe.scheduler.config.prediction_type == "flow"
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    with tiny.CountForwards(pipe.transformer) as counter, torch.no_grad():
        theirs = pipe("a cat", num_inference_steps=5, guidance_scale=4.0, latents=latents.clone(), height=16, width=16,
                      output_type="latent", max_sequence_length=8).images
    assert len(counter.batches) == 5 and set(counter.batches) == {2}
    ours = pipelines.run(sd3, "a cat", solver="unipc", nfe=5, guidance=4.0, latents=latents, output_type="latent",
                         prompt_options=dict(max_sequence_length=8))
    tiny.assert_close(theirs, ours.latents, "StableDiffusion3Pipeline + DiffSamplerScheduler(unipc) vs run", 1e-5)


@pytest.fixture(scope="module")
def flux(tok):
    return tiny.flux_pipe(tok)


def test_flux_default_sigmas(flux):
    """FluxPipeline passes sigmas linspace(1, 1/n, n) and mu: they are the grid (shifted by mu as its own
    scheduler shifts them; t = 1 starts at the model's largest finite sigma), ending with the step to 0."""
    pipe = swapped(flux, solver="dpmpp_2m")
    gen = dict(height=16, width=16, output_type="latent", max_sequence_length=8)
    with tiny.CountForwards(pipe.transformer) as counter, torch.no_grad():
        theirs = pipe("a cat", num_inference_steps=6, generator=torch.Generator().manual_seed(7), **gen).images
    sched = pipe.scheduler
    assert len(counter.batches) == 6 == sched.num_inference_steps and float(sched.sigmas[-1]) == 0
    assert float(sched.grid[0]) == pytest.approx(999.0), "t = 1 moved to the model's largest finite sigma"
    ours = pipelines.run(flux, "a cat", solver="dpmpp_2m", sigmas=sched.grid, denoise_to_zero=True,
                         generator=torch.Generator().manual_seed(7), height=16, width=16, output_type="latent",
                         prompt_options=dict(max_sequence_length=8))
    tiny.assert_close(theirs, pack(ours.latents), "FluxPipeline + DiffSamplerScheduler(dpmpp_2m) vs run", 1e-5)


# --- euler / heun == diffusers' own schedulers -----------------------------------------------------------------

def test_euler_equals_euler_discrete(sd):
    """SD with EulerDiscreteScheduler vs DiffSamplerScheduler(euler) on the Euler scheduler's sigmas (its
    final 0 is our step to 0); both start from latents * sqrt(1 + sigma_max^2)."""
    probe = diffusers.EulerDiscreteScheduler.from_config(sd.scheduler.config)
    probe.set_timesteps(8)
    pipe = swapped(sd, solver="euler", sigmas=probe.sigmas.tolist())
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        theirs = sd("a cat", num_inference_steps=8, latents=latents.clone(), height=16, width=16,
                    output_type="latent").images
        ours = pipe("a cat", num_inference_steps=8, latents=latents.clone(), height=16, width=16,
                    output_type="latent").images
    tiny.assert_close(ours, theirs, "DiffSamplerScheduler(euler) vs EulerDiscreteScheduler", 1e-5)


def test_heun_equals_heun_discrete(sd):
    """HeunDiscreteScheduler's pattern: timesteps t0, t1, t1, ..., t_{n-1}, t_{n-1} (Heun steps, then one
    Euler step to 0) is heun + the step to 0 on the same sigmas; same images, same timesteps."""
    heun = diffusers.HeunDiscreteScheduler.from_config(sd.scheduler.config)
    heun.set_timesteps(5)
    reference = type(sd)(**{**sd.components, "scheduler": heun})
    pipe = swapped(sd, solver="heun", sigmas=heun.sigmas[::2].tolist() + [0.0])     # its sigmas, each once
    pipe.scheduler.set_timesteps(9)
    assert len(pipe.scheduler.timesteps) == len(heun.timesteps) == 9
    assert torch.allclose(pipe.scheduler.timesteps, heun.timesteps.float(), atol=2e-3), "repeated timesteps as Heun's"
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        theirs = tiny.quiet(reference)("a cat", num_inference_steps=5, latents=latents.clone(), height=16, width=16,
                                       output_type="latent").images
        ours = pipe("a cat", num_inference_steps=9, latents=latents.clone(), height=16, width=16,
                    output_type="latent").images
    tiny.assert_close(ours, theirs, "DiffSamplerScheduler(heun) vs HeunDiscreteScheduler", 1e-5)


def test_euler_equals_flow_match_euler(flux):
    u = np.linspace(0.95, 0.1, 6)
    pipe = swapped(flux, solver="euler")
    kwargs = dict(sigmas=u, height=16, width=16, output_type="latent", max_sequence_length=8)
    with torch.no_grad():
        theirs = flux("a cat", generator=torch.Generator().manual_seed(1), **kwargs).images
        ours = pipe("a cat", generator=torch.Generator().manual_seed(1), **kwargs).images
    probe = diffusers.FlowMatchEulerDiscreteScheduler.from_config(flux.scheduler.config)
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    probe.set_timesteps(sigmas=list(u), mu=calculate_shift(16, 256, 4096, 0.5, 1.15))
    assert torch.allclose(pipe.scheduler.sigmas, probe.sigmas, rtol=1e-6), "the flow scheduler's shifted sigmas"
    assert torch.allclose(pipe.scheduler.timesteps, probe.timesteps, rtol=1e-6)
    tiny.assert_close(ours, theirs, "DiffSamplerScheduler(euler) vs FlowMatchEulerDiscreteScheduler", 1e-5)


# --- GITS schedules from the CLI, in the scheduler and in the k-diffusion sampler ----------------------------------

def test_gits_schedule_plugs_into_both(sd, tmp_path):
    from click.testing import CliRunner
    from diffsampler.cli import main
    from diffsampler.integrations.k_diffusion import sampler
    from diffsampler.models.latent import LatentDiffusion
    folder = tmp_path / "sd"
    sd.save_pretrained(folder)
    path = tmp_path / "gits.json"
    result = CliRunner().invoke(main, ["schedule", "gits", "--model", f"diffusers:{folder}", "--prompt", "a cat",
                                       "--solver", "ipndm", "--nfe", "4", "--warmup", "4", "--batch", "4",
                                       "--teacher-steps", "12", "--out", str(path)])
    assert result.exit_code == 0, result.output
    pipe = swapped(sd, schedule=str(path))
    assert pipe.scheduler.solver.name == "ipndm", "the file's solver"
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(10))
    with tiny.CountForwards(pipe.unet) as counter, torch.no_grad():
        theirs = pipe("a cat", num_inference_steps=4, guidance_scale=1.0, latents=latents.clone(), height=16, width=16,
                      output_type="latent").images
    assert len(counter.batches) == 4
    ours = pipelines.run(sd, "a cat", solver="ipndm", schedule=str(path), guidance=1.0, latents=latents,
                         output_type="latent")
    tiny.assert_close(theirs, ours.latents, "GITS file in DiffSamplerScheduler vs pipelines.run", 1e-5)
    with pytest.warns(UserWarning, match="makes 4 model evaluations"):
        pipe("a cat", num_inference_steps=10, guidance_scale=1.0, height=16, width=16, output_type="latent")
    # the same file as a k-diffusion sampler on the same model (the latent denoiser, prompt as extra_args)
    ld = LatentDiffusion.from_pipeline(sd)
    cond, _ = ld.encode_prompt("a cat", need_uncond=False)
    grid = pipe.scheduler.grid
    noise = latents.double() / (ld.model_input_scale(float(grid[0])).item() * float(grid[0]))
    with torch.no_grad():
        k = sampler(str(path))(ld, (noise * grid[0]).float(), torch.cat([grid, grid.new_zeros(1)]).float(),
                               extra_args=cond, disable=True)
        direct = sample(ld, noise.float(), schedule=str(path), cond=cond, denoise_to_zero=True)
    tiny.assert_close(k, direct.samples, "GITS file through the k-diffusion sampler vs sample()", 1e-5)


# --- refusals and config --------------------------------------------------------------------------------------

def test_refusals(ddpm, tmp_path):
    config = ddpm.scheduler.config
    with pytest.raises(ValueError, match="learned samplers .AMED.*pipelines.run"):
        DiffSamplerScheduler.from_config(config, amed="amed.pt")
    with pytest.raises(ValueError, match="learned samplers .AMED.*pipelines.run"):
        DiffSamplerScheduler.from_config(config, solver="amed", predictor=object())
    with pytest.raises(ValueError, match="analytical first step.*pipelines.run"):
        DiffSamplerScheduler.from_config(config, afs=True)
    from diffsampler import Schedule
    tuned = Schedule(torch.tensor([80.0, 10.0, 1.0, 0.02]), {"solver": "ipndm", "afs": True}).save(tmp_path / "afs.json")
    with pytest.raises(ValueError, match="analytical first step"):
        DiffSamplerScheduler.from_config(config, schedule=str(tuned))
    with pytest.raises(ValueError, match="outside the model's range"):
        DiffSamplerScheduler.from_config(config, schedule=str(Schedule(torch.tensor([500.0, 1.0])).save(tmp_path / "x.json")))
    with pytest.raises(ValueError, match="unknown solver 'nope'"):
        DiffSamplerScheduler.from_config(config, solver="nope")
    with pytest.raises(ValueError, match="has no option 'order'"):
        DiffSamplerScheduler.from_config(config, solver="ipndm", order=2)
    with pytest.raises(ValueError, match="prediction_type"):
        DiffSamplerScheduler.from_config(config, prediction_type="noise")
    sched = DiffSamplerScheduler.from_config(config, solver="euler")
    with pytest.raises(ValueError, match="set_timesteps before step"):
        sched.step(torch.zeros(1, 3, 8, 8), 999, torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="no custom timesteps"):
        sched.set_timesteps(timesteps=[999, 500])
    with pytest.raises(ValueError, match="img2img"):
        sched.set_begin_index(2)
    with pytest.raises(NotImplementedError, match="img2img"):
        sched.add_noise(torch.zeros(1), torch.zeros(1), torch.zeros(1))
    sched.set_timesteps(4)
    with pytest.raises(ValueError, match="visit scheduler.timesteps in order"):
        sched.step(torch.zeros(1, 3, 8, 8), sched.timesteps[1], torch.zeros(1, 3, 8, 8))


def test_config_round_trip(ddpm, tmp_path):
    sched = DiffSamplerScheduler.from_config(ddpm.scheduler.config, solver="dpmpp", max_order=2, schedule="logsnr")
    assert sched.config.solver_options == {"max_order": 2} and sched.solver == get_solver("dpmpp", max_order=2)
    sched.save_pretrained(tmp_path / "scheduler")
    loaded = DiffSamplerScheduler.from_pretrained(tmp_path / "scheduler")
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}
    assert public(loaded.config) == public(sched.config)
    heun = DiffSamplerScheduler.from_config(sched.config, solver="heun")
    assert heun.solver.name == "heun" and not heun.config.solver_options, "a new solver does not inherit options"
    sched.set_timesteps(5)
    assert sched.num_inference_steps == 5 and len(sched.timesteps) == 5 and sched.order == 1
    assert sched.init_noise_sigma == 1.0 and torch.equal(sched.scale_model_input(torch.ones(2), 3), torch.ones(2))
