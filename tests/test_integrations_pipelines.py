"""SDXL and Flux through diffsampler.pipelines.run and the CLI, against the pipelines' own loops.

Tiny pipelines from configs (tests/tiny_pipelines.py).  With the grid the pipeline's own scheduler
uses, solver ``euler`` (+ the final step to 0) reproduces the pipeline's Euler loop from the same
latents: StableDiffusionXLPipeline (two text encoders, pooled embeddings and size/crop time ids,
with and without classifier-free guidance) and FluxPipeline (packed latents, position ids, the
distilled guidance embedding, true CFG with a negative prompt), relative 1e-5 in float32, one
network forward per counted evaluation; the VAE decoding equals the pipelines'.  The CLI samples
saved SDXL and Flux pipelines to the same images as ``pipelines.run``.
"""
import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import tiny_pipelines as tiny  # noqa: E402
from diffsampler import pipelines  # noqa: E402
from diffsampler.models.flow import t_to_sigma  # noqa: E402
from diffsampler.models.flux import FluxDenoiser, image_ids, pack, unpack  # noqa: E402
from diffsampler.models.latent import LatentDiffusion  # noqa: E402

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")   # in diffusers' Euler


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny.tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def sdxl(tok):
    return tiny.sdxl_pipe(tok)


@pytest.fixture(scope="module")
def flux(tok):
    return tiny.flux_pipe(tok)


def euler_grid(pipe, steps):
    """The VE sigmas the pipeline's EulerDiscreteScheduler steps through (its final 0 is our step to 0)."""
    probe = type(pipe.scheduler).from_config(pipe.scheduler.config)
    probe.set_timesteps(steps)
    assert float(probe.sigmas[-1]) == 0
    return probe.sigmas[:-1].double()


def flux_grid(pipe, u, image_seq_len):
    """The VE sigmas FluxPipeline's flow-Euler scheduler steps through for pipeline sigmas u (shifted by mu)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    config = pipe.scheduler.config
    mu = calculate_shift(image_seq_len, config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                         config.max_shift)
    probe = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
    probe.set_timesteps(sigmas=list(u), mu=mu)
    return t_to_sigma(probe.sigmas[:-1].double())


# --- SDXL ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_run_reproduces_sdxl_pipeline(sdxl, guidance):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    prompts = ["a cat", "dog"]
    with torch.no_grad():
        theirs = sdxl(prompts, num_inference_steps=6, guidance_scale=guidance, latents=latents.clone(), height=16,
                      width=16, output_type="latent").images
    ld = LatentDiffusion.from_pipeline(sdxl)
    assert ld.is_sdxl and ld.shape == (4, 8, 8) and (ld.height, ld.width) == (16, 16)
    with tiny.CountForwards(sdxl.unet) as counter:
        out = pipelines.run(sdxl, prompts, solver="euler", sigmas=euler_grid(sdxl, 6), denoise_to_zero=True,
                            guidance=guidance, latents=latents, output_type="latent")
    assert out.nfe == 6 == len(counter.batches) and set(counter.batches) == {2 if guidance == 1 else 4}
    tiny.assert_close(out.latents, theirs, f"pipelines.run vs StableDiffusionXLPipeline (guidance {guidance})", 1e-5)
    with torch.no_grad():
        images = sdxl(prompts, num_inference_steps=6, guidance_scale=guidance, latents=latents.clone(), height=16,
                      width=16, output_type="pt").images
    tiny.assert_close(ld.decode(theirs) / 2 + 0.5, images, "SDXL decoding vs the pipeline's", 1e-6)


def test_sdxl_conditioning(sdxl):
    """encode_prompt gives the pipeline's embeddings and pooled embeddings; time ids follow the size options
    as the pipeline's do (a different original_size changes the image the same way in both)."""
    ld = LatentDiffusion.from_pipeline(sdxl)
    cond, uncond = ld.encode_prompt("a cat", negative_prompt="blurry")
    embeds, negative, pooled, negative_pooled = sdxl.encode_prompt("a cat", device=sdxl.device, negative_prompt="blurry")
    assert torch.equal(cond["encoder_hidden_states"], embeds) and torch.equal(uncond["encoder_hidden_states"], negative)
    added = cond["added_cond_kwargs"]
    assert torch.equal(added["text_embeds"], pooled) and torch.equal(uncond["added_cond_kwargs"]["text_embeds"],
                                                                     negative_pooled)
    assert added["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]]
    sized, _ = ld.encode_prompt("a cat", need_uncond=False, original_size=(32, 24), crops_coords_top_left=(2, 1))
    assert sized["added_cond_kwargs"]["time_ids"].tolist() == [[32, 24, 2, 1, 16, 16]]
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = sdxl("a cat", num_inference_steps=4, guidance_scale=1.0, latents=latents.clone(), height=16, width=16,
                      original_size=(32, 24), output_type="latent").images
    ours = pipelines.run(sdxl, "a cat", solver="euler", sigmas=euler_grid(sdxl, 4), denoise_to_zero=True, guidance=1.0,
                         latents=latents, output_type="latent", prompt_options=dict(original_size=(32, 24)))
    plain = pipelines.run(sdxl, "a cat", solver="euler", sigmas=euler_grid(sdxl, 4), denoise_to_zero=True, guidance=1.0,
                          latents=latents, output_type="latent")
    tiny.assert_close(ours.latents, theirs, "SDXL with original_size=(32, 24) vs the pipeline", 1e-5)
    assert tiny.rel_err(plain.latents, theirs) > 1e-4, "the size conditioning reaches the UNet"


# --- Flux ----------------------------------------------------------------------------------------------

def test_flux_pieces(flux):
    """Packing is FluxPipeline's, ids are its ids, the velocity is its transformer's on packed latents."""
    x = torch.randn(2, 4, 8, 6)
    assert torch.equal(pack(x), flux._pack_latents(x, 2, 4, 8, 6))
    assert torch.equal(unpack(pack(x), 8, 6), x)
    assert torch.equal(image_ids(4, 3), flux._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32))
    ld = LatentDiffusion.from_pipeline(flux, 16, 16)
    assert isinstance(ld.inner, FluxDenoiser) and ld.is_flux and ld.shape == (4, 8, 8)
    assert LatentDiffusion.from_pipeline(flux).shape == (4, 128, 128), "FluxPipeline's default size"
    with pytest.raises(ValueError, match="multiple of 4"):
        ld.at_size(18, 16)


@pytest.mark.parametrize("distilled", [3.5, 1.5])
def test_run_reproduces_flux_pipeline(flux, distilled):
    u = np.linspace(0.95, 0.1, 6)
    grid = flux_grid(flux, u, image_seq_len=16)
    with torch.no_grad():
        theirs = flux("a cat", sigmas=u, guidance_scale=distilled, generator=torch.Generator().manual_seed(0),
                      height=16, width=16, output_type="latent", max_sequence_length=8).images
    with tiny.CountForwards(flux.transformer) as counter:
        out = pipelines.run(flux, "a cat", solver="euler", sigmas=grid, denoise_to_zero=True, height=16, width=16,
                            distilled_guidance=distilled, generator=torch.Generator().manual_seed(0),
                            output_type="latent", prompt_options=dict(max_sequence_length=8))
    assert out.nfe == 6 == len(counter.batches) and set(counter.batches) == {1}, "no CFG by default: one forward each"
    assert out.latents.shape == (1, 4, 8, 8)
    tiny.assert_close(pack(out.latents), theirs, f"pipelines.run vs FluxPipeline (distilled guidance {distilled})", 1e-5)
    with torch.no_grad():
        images = flux("a cat", sigmas=u, guidance_scale=distilled, generator=torch.Generator().manual_seed(0),
                      height=16, width=16, output_type="pt", max_sequence_length=8).images
    ld = LatentDiffusion.from_pipeline(flux, 16, 16)
    tiny.assert_close(ld.decode(unpack(theirs, 8, 8)) / 2 + 0.5, images, "Flux decoding vs the pipeline's", 1e-6)
    # the pipeline's packed latents= are accepted as they are
    packed = pack(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)))
    a = pipelines.run(flux, "a cat", solver="euler", sigmas=grid, latents=packed, height=16, width=16,
                      output_type="latent", distilled_guidance=distilled, prompt_options=dict(max_sequence_length=8))
    with torch.no_grad():
        b = flux("a cat", sigmas=u, guidance_scale=distilled, latents=packed.clone(), height=16, width=16,
                 output_type="latent", max_sequence_length=8).images
    # (no step to 0 here: the pipeline's last step goes to 0, ours stops at the grid's last sigma)
    assert tiny.rel_err(pack(a.latents), b) > 1e-4
    c = pipelines.run(flux, "a cat", solver="euler", sigmas=grid, latents=packed, height=16, width=16,
                      denoise_to_zero=True, output_type="latent", distilled_guidance=distilled,
                      prompt_options=dict(max_sequence_length=8))
    tiny.assert_close(pack(c.latents), b, "FluxPipeline(latents=packed) vs run(latents=packed)", 1e-5)


def test_flux_true_cfg(flux):
    """guidance != 1 on Flux is FluxPipeline's true CFG with the negative prompt (one batched forward of
    2 x batch per evaluation here; the pipeline makes two)."""
    u = np.linspace(0.9, 0.2, 4)
    grid = flux_grid(flux, u, image_seq_len=16)
    kwargs = dict(height=16, width=16, output_type="latent")
    with torch.no_grad():
        theirs = flux("a cat", negative_prompt="blurry", true_cfg_scale=2.5, sigmas=u, guidance_scale=3.5,
                      generator=torch.Generator().manual_seed(4), max_sequence_length=8, **kwargs).images
    with tiny.CountForwards(flux.transformer) as counter:
        out = pipelines.run(flux, "a cat", negative_prompt="blurry", guidance=2.5, solver="euler", sigmas=grid,
                            denoise_to_zero=True, generator=torch.Generator().manual_seed(4),
                            prompt_options=dict(max_sequence_length=8), **kwargs)
    assert out.nfe == 4 == len(counter.batches) and set(counter.batches) == {2}
    tiny.assert_close(pack(out.latents), theirs, "pipelines.run(guidance=2.5) vs FluxPipeline(true_cfg_scale=2.5)", 1e-5)


def test_flux_bad_input(tok, flux, sdxl):
    schnell = tiny.flux_pipe(tok, guidance_embeds=False)
    with pytest.raises(ValueError, match="guidance-distilled Flux"):
        pipelines.run(schnell, "a cat", solver="euler", nfe=2, height=16, width=16, distilled_guidance=3.5)
    out = pipelines.run(schnell, "a cat", solver="euler", nfe=2, height=16, width=16, output_type="latent",
                        prompt_options=dict(max_sequence_length=8))
    assert out.latents.shape == (1, 4, 8, 8) and torch.isfinite(out.latents).all()
    with pytest.raises(ValueError, match="size conditioning is SDXL's"):
        LatentDiffusion.from_pipeline(flux, 16, 16).encode_prompt("a cat", original_size=(16, 16))
    with pytest.raises(ValueError, match="guidance-distilled Flux"):
        LatentDiffusion.from_pipeline(sdxl).encode_prompt("a cat", distilled_guidance=2.0)
    ld = LatentDiffusion.from_pipeline(flux, 16, 16)
    with pytest.raises(ValueError, match="give cond guidance"):
        ld.inner(torch.randn(1, 4, 8, 8), torch.ones(1), encoder_hidden_states=torch.randn(1, 8, 16),
                 pooled_projections=torch.randn(1, 16))


# --- the CLI on saved pipelines -----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sdxl", "flux"])
def test_cli_samples_saved_sdxl_and_flux(kind, sdxl, flux, tmp_path):
    """`diffsampler sample --model diffusers:DIR --prompt ...` on a saved SDXL / Flux pipeline writes the
    images sample() makes on LatentDiffusion with the pipeline's conditioning (the CLI's convention: noise
    from each seed, scaled by the first sigma)."""
    from click.testing import CliRunner
    from PIL import Image
    from diffsampler import sample
    from diffsampler.images import to_uint8
    from diffsampler.cli import main
    from diffsampler.seeds import seed_noise
    pipe = {"sdxl": sdxl, "flux": flux}[kind]
    folder = tmp_path / kind
    pipe.save_pretrained(folder)
    result = CliRunner().invoke(main, ["sample", "--model", f"diffusers:{folder}", "--prompt", "a cat", "--solver",
                                       "ipndm", "--nfe", "3", "--seeds", "0-1", "--outdir", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    files = sorted((tmp_path / "out" / "000000").glob("*.png"))
    assert len(files) == 2
    ld = LatentDiffusion.from_pipeline(pipe)
    cond, _ = ld.encode_prompt(["a cat"] * 2, need_uncond=False)
    with torch.no_grad():
        ours = to_uint8(ld.decode(sample(ld, seed_noise(range(2), ld.shape), "ipndm", nfe=3, cond=cond).samples))
    for file, image in zip(files, ours):
        written = np.asarray(Image.open(file).convert("RGB")).astype(int)
        assert written.shape == image.shape == (ld.height, ld.width, 3)
        assert np.abs(written - image.astype(int)).max() <= 1
