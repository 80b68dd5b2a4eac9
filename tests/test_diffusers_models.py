"""The diffusers model wrappers against diffusers' own schedulers and pipelines.

Every model is tiny, built from a config with random weights (nothing is downloaded), on the CPU.
Each cross-check drives diffusers' scheduler (or whole pipeline) and our solver over the *same*
grid from the *same* starting point and compares the endpoints:

* pixel UNet (eps / x0 / v): ``euler`` == DDIMScheduler (eta=0), float64, relative 1e-12;
  ``dpmpp`` order 2 == DPMSolverMultistepScheduler (dpmsolver++, midpoint), relative 1e-6 (its
  ``step`` casts the state to float32 on every step: ~1e-7 is that rounding);
* flow transformer (SD3): ``euler`` (+ final denoising) == FlowMatchEulerDiscreteScheduler, shift 1
  and 3, float32 (its step runs in float32), relative 1e-5;
* StableDiffusionPipeline (tiny UNet2DConditionModel + AutoencoderKL + CLIP): ``pipelines.run``
  with ``euler`` == the pipeline's own DDIM loop, guidance 1 and 7.5, float64, relative 1e-10,
  and one UNet forward per counted evaluation (2 x batch with guidance);
* StableDiffusion3Pipeline (tiny SD3 transformer, two CLIP encoders, no T5): ``pipelines.run``
  == the pipeline's flow Euler loop, guidance 1 and 4, relative 1e-5;
* classifier-free guidance, the sigma <-> timestep map, local loading and bad inputs.

The diffusers and transformers packages are only called here; none of their code is copied.
"""
import json
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffsampler import Denoiser, sample  # noqa: E402
from diffsampler import pipelines  # noqa: E402
from diffsampler.models.diffusers_pixel import DiffusersDenoiser, discrete_schedule  # noqa: E402
from diffsampler.models.flow import FlowDenoiser, shift_time, shifted_schedule, t_to_sigma  # noqa: E402
from diffsampler.models.guidance import ClassifierFreeGuidance  # noqa: E402
from diffsampler.models.latent import LatentDiffusion  # noqa: E402

torch.set_num_threads(1)
diffusers.utils.logging.set_verbosity_error()
transformers.logging.set_verbosity_error()

# DDIM with "leading" spacing and steps_offset=1 visits 901, 801, ..., 101, 1 (10 steps of 1000) and,
# with set_alpha_to_one=False, takes its last step from t=1 to alphas_cumprod[0], the sigma of t=0.
# So every DDIM step goes between two entries of the model's own table: our grid is the table's
# sigmas at [901, 801, ..., 1, 0] (11 points, 10 steps, NFE 10) and both do exactly the same steps.
# (set_alpha_to_one=True would end at sigma=0, which an ODE grid cannot contain.)
DDIM_TIMESTEPS = [901, 801, 701, 601, 501, 401, 301, 201, 101, 1, 0]


def rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def assert_close(ours, theirs, what, rtol):
    err = rel_err(ours, theirs)
    print(f"\n{what}: relative difference {err:.2e}")
    assert err <= rtol, f"{what}: relative difference {err:.3e} exceeds {rtol:.0e}"


def start_noise(den, latents, sigma0):
    """The pipelines' start (standard normal latents in the model's space at the first sigma) as the
    ``noise`` that ``sample()`` multiplies by sigma0: x_ve = latents / c(sigma0)."""
    return latents / (den.model_input_scale(sigma0).item() * sigma0)


def upcast_table(scheduler):
    """diffusers builds alphas_cumprod in float32, and its DDIM arithmetic then rounds to float32 whatever
    the sample dtype; the float64 copy holds the same numbers, so both sides use one table."""
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    scheduler.final_alpha_cumprod = scheduler.final_alpha_cumprod.double()


class CountForwards:
    """Counts a module's forward calls and the batch size of each."""

    def __init__(self, module):
        self.batches = []
        self.handle = module.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        self.batches.append(x.shape[0])

    def remove(self):
        self.handle.remove()


# --- tiny models ---------------------------------------------------------------------------------------

def run_scheduler(sched, unet, noise):
    """diffusers' own sampling loop: the scheduler stepping the UNet over its timesteps."""
    x = noise.clone()
    for t in sched.timesteps:
        x = sched.step(unet(x, t).sample, t, x).prev_sample
    return x


def tiny_unet(num_class_embeds=None, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=4, num_class_embeds=num_class_embeds)
    return unet.to(dtype).eval()


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.fixture(scope="module")
def class_unet():
    return tiny_unet(num_class_embeds=10, seed=1)


def pixel_noise(batch=2, seed=1, dtype=torch.float64):
    return torch.randn(batch, 3, 8, 8, dtype=dtype, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A CLIP BPE tokenizer over single letters, from a vocabulary written here (no merges)."""
    folder = tmp_path_factory.mktemp("tokenizer")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=12,
                                      pad_token="<|endoftext|>")


def clip_config(tokenizer, **extra):
    return transformers.CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                       num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=12,
                                       bos_token_id=0, eos_token_id=1, pad_token_id=1, **extra)


def tiny_vae(**config):
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                                   layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16, **config)


@pytest.fixture(scope="module")
def sd_pipe(tokenizer):
    """Stable Diffusion in miniature (16x16 images, 4x8x8 latents), float64, with a DDIM scheduler."""
    torch.manual_seed(0)
    text_encoder = transformers.CLIPTextModel(clip_config(tokenizer))
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4)
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    pipe = diffusers.StableDiffusionPipeline(vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(torch.float64)
    upcast_table(pipe.scheduler)
    return pipe


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=8).eval()


# --- 1. pixel UNets vs DDIM and DPM-Solver++ ----------------------------------------------------------------

@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_euler_matches_ddim(unet, prediction_type):
    """Our Euler on DiffusersDenoiser == DDIMScheduler (eta=0) on the same timesteps and noise.

    DDIM works on x_vp; ours on x_ve = x_vp / alpha, so its endpoint is compared after scaling ours by
    alpha at the last sigma.  DDIM starts from x_vp = noise at t=901; ours from x_ve = noise / alpha."""
    sched = diffusers.DDIMScheduler(beta_schedule="linear", steps_offset=1, set_alpha_to_one=False,
                                    clip_sample=False, prediction_type=prediction_type)
    upcast_table(sched)
    sched.set_timesteps(10)
    assert sched.timesteps.tolist() == DDIM_TIMESTEPS[:-1]
    den = DiffusersDenoiser.from_unet_and_scheduler(unet, sched)
    assert den.prediction_type == prediction_type
    grid = den.t_to_sigma(torch.tensor(DDIM_TIMESTEPS, dtype=torch.float64))
    assert torch.equal(den.sigma_to_t(grid), torch.tensor(DDIM_TIMESTEPS, dtype=torch.float64)), \
        "table sigmas must map to exactly their integer timesteps"
    noise = pixel_noise()
    with torch.no_grad():
        x = run_scheduler(sched, unet, noise)
        s0 = float(grid[0])
        result = sample(den, start_noise(den, noise, s0), "euler", sigmas=grid)
    assert result.nfe == 10
    ours = result.samples * den.model_input_scale(float(grid[-1])).item()
    assert_close(ours, x, f"euler vs DDIM ({prediction_type}, float64)", 1e-12)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")   # inside diffusers' set_timesteps
@pytest.mark.parametrize("num_steps", [5, 10])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_dpmpp2_matches_dpmsolver_multistep(unet, prediction_type, num_steps):
    """dpmpp max_order=2 == DPMSolverMultistepScheduler(dpmsolver++, order 2, midpoint,
    final_sigmas_type="sigma_min"): below 15 steps both take a first-order last step.  Its timesteps
    ("linspace" spacing: 999, 799, ... for 5 steps) and the final sigma of t=0 make our grid; its sigmas
    are replaced by that float64 grid (it builds them in float32), and its model is called at the
    integer timesteps, ours through sigma -> t.  Its step casts the state to float32 (~1e-7)."""
    sched = diffusers.DPMSolverMultistepScheduler(
        beta_schedule="linear", solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint",
        final_sigmas_type="sigma_min", lower_order_final=True, prediction_type=prediction_type)
    sched.set_timesteps(num_steps)
    den = DiffusersDenoiser.from_unet_and_scheduler(unet, sched)
    grid = torch.cat([den.t_to_sigma(sched.timesteps.double()), den.sigmas[:1]])
    assert rel_err(sched.sigmas, grid) < 1e-6, "the scheduler's own sigmas should be our table's (in float32)"
    sched.sigmas = grid.clone()
    noise = pixel_noise()
    with torch.no_grad():
        x = run_scheduler(sched, unet, noise)
        s0 = float(grid[0])
        result = sample(den, start_noise(den, noise, s0), "dpmpp", sigmas=grid, max_order=2, solver_type="midpoint")
        first = sample(den, start_noise(den, noise, s0), "dpmpp", sigmas=grid, max_order=1)
    assert result.nfe == num_steps
    scale = den.model_input_scale(float(grid[-1])).item()
    assert_close(result.samples * scale, x, f"dpmpp order 2 vs DPMSolverMultistep ({prediction_type}, {num_steps} steps)",
                 1e-6)
    assert rel_err(first.samples * scale, x) > 1e-4, "order 1 should differ from the scheduler's order 2 (test has teeth)"


def test_ddim_pipeline_reproduced_by_run(unet):
    """pipelines.run on a DDIMPipeline (unconditional pixel UNet) with a generator: same initial noise
    (diffusers' randn_tensor), same 10 steps; the pipeline returns (x_vp / 2 + 0.5).clamp(0, 1)."""
    sched = diffusers.DDIMScheduler(beta_schedule="linear", steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    upcast_table(pipe.scheduler)     # the pipeline rebuilds its scheduler from the config
    with torch.no_grad():
        theirs = pipe(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=10,
                      output_type="pt").images
    den = DiffusersDenoiser.from_pipeline(pipe)
    grid = den.t_to_sigma(torch.tensor(DDIM_TIMESTEPS, dtype=torch.float64))
    out = pipelines.run(pipe, solver="euler", sigmas=grid, num_images_per_prompt=2,
                        generator=torch.Generator().manual_seed(3), output_type="pt")
    assert out.nfe == 10 and out.images.shape == (2, 3, 8, 8)
    ours = (out.latents * den.model_input_scale(float(grid[-1])).item() / 2 + 0.5).clamp(0, 1)
    assert_close(ours, theirs, "pipelines.run(DDIMPipeline) vs the pipeline", 1e-12)
    assert torch.equal(out.images, out.latents.clamp(-1, 1))
    pil = pipelines.run(pipe, solver="euler", sigmas=grid, seed=[4, 5], num_images_per_prompt=2).images
    assert len(pil) == 2 and pil[0].size == (8, 8) and pil[0].mode == "RGB"


# --- 2. the sigma <-> timestep map and the discrete schedule ---------------------------------------------------

def test_sigma_timestep_map(unet):
    sched = diffusers.DDPMScheduler(beta_schedule="linear")
    den = DiffusersDenoiser.from_unet_and_scheduler(unet, sched)
    table = ((1 - sched.alphas_cumprod.double()) / sched.alphas_cumprod.double()).sqrt()
    assert den.sigma_min == float(table[0]) and den.sigma_max == float(table[-1])
    t = torch.arange(1000, dtype=torch.float64)
    assert torch.equal(den.t_to_sigma(t), table), "integer timesteps must give the table itself"
    assert torch.equal(den.sigma_to_t(table), t), "table sigmas must give exactly their integer timesteps"
    mid = den.t_to_sigma(t[:-1] + 0.25)   # log-linear in between
    expected = (table[:-1].log() + 0.25 * (table[1:].log() - table[:-1].log())).exp()
    assert rel_err(mid, expected) < 1e-14
    assert rel_err(den.sigma_to_t(mid), t[:-1] + 0.25) < 1e-12
    assert den.sigma_to_t(torch.tensor([1e-9, 1e9], dtype=torch.float64)).tolist() == [0.0, 999.0], "clamped to the table"
    # the timestep reaches the network: one timestep apart gives a different output
    x = pixel_noise()
    with torch.no_grad():
        a = den(x, den.t_to_sigma(torch.full((2,), 500.0)))
        b = den(x, den.t_to_sigma(torch.full((2,), 500.0)) * (1 + 1e-12))
        c = den(x, den.t_to_sigma(torch.full((2,), 501.0)))
    assert rel_err(a, b) < 1e-9 and rel_err(a, c) > 1e-6


def test_discrete_schedule_uses_training_timesteps(unet):
    den = DiffusersDenoiser.from_unet_and_scheduler(unet, diffusers.DDPMScheduler(beta_schedule="linear"))
    with torch.no_grad():
        result = sample(den, pixel_noise(), "euler", nfe=10, schedule="discrete", schedule_options=discrete_schedule(den))
    t = den.sigma_to_t(result.sigmas)
    assert result.nfe == 10 and len(result.sigmas) == 11
    assert torch.equal(t, t.round()) and t[0] == 999 and t[-1] == 0
    assert torch.equal(result.sigmas, den.sigmas[t.long()]), "grid points must be table entries"
    assert discrete_schedule(den).keys() == {"sigma_fn", "sigma_inv"}


def test_zero_terminal_snr_table_ends_at_last_finite_sigma(unet):
    sched = diffusers.DDIMScheduler(beta_schedule="linear", rescale_betas_zero_snr=True)
    assert float(sched.alphas_cumprod[-1]) == 0
    den = DiffusersDenoiser.from_unet_and_scheduler(unet, sched)
    assert len(den.sigmas) == 999 and math.isfinite(den.sigma_max)


def test_from_pretrained_loads_local_folder(unet, tmp_path):
    sched = diffusers.DDIMScheduler(beta_schedule="linear", prediction_type="v_prediction")
    unet.save_pretrained(tmp_path / "unet")
    sched.save_pretrained(tmp_path / "scheduler")
    loaded = DiffusersDenoiser.from_pretrained(tmp_path, torch_dtype=torch.float64)
    direct = DiffusersDenoiser.from_unet_and_scheduler(unet, sched)
    assert loaded.prediction_type == "v_prediction" and loaded.shape == (3, 8, 8)
    x, s = pixel_noise(), torch.full((2,), 3.0, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(loaded(x, s), direct(x, s))
    with pytest.raises(ValueError, match="no scheduler/"):
        DiffusersDenoiser.from_pretrained(tmp_path / "unet")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        DiffusersDenoiser.from_pretrained(tmp_path / "nothing")


def test_loading_with_a_dtype_uses_the_installed_diffusers_keyword(unet, tmp_path):
    """A saved pipeline and a unet/scheduler folder load in the requested dtype without the
    deprecation warning diffusers gives for ``torch_dtype`` in the releases that renamed it."""
    import warnings
    from diffsampler.pipelines import load_pipeline
    folder = tmp_path / "ddim"
    diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler()).save_pretrained(folder)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*torch_dtype.*")
        pipe = load_pipeline(folder, torch_dtype=torch.float64)
        den = DiffusersDenoiser.from_pretrained(folder, torch_dtype=torch.float64)
    assert next(pipe.unet.parameters()).dtype == torch.float64
    assert next(den.unet.parameters()).dtype == torch.float64


# --- 3. class labels and classifier-free guidance ----------------------------------------------------------

def test_class_labels_reach_the_unet(class_unet):
    den = DiffusersDenoiser.from_unet_and_scheduler(class_unet, diffusers.DDPMScheduler())
    assert den.num_classes == 10
    x, s = pixel_noise(), torch.full((2,), 2.0, dtype=torch.float64)
    labels = torch.tensor([3, 7])
    rows = torch.nn.functional.one_hot(labels, 10).double()
    with torch.no_grad():
        by_index = den(x, s, class_labels=labels)
        by_row = den(x, s, class_labels=rows)
        other = den(x, s, class_labels=torch.tensor([4, 7]))
        zero = den(x, s, class_labels=torch.zeros(2, 10, dtype=torch.float64))
        weight = class_unet.class_embedding.weight.data.clone()
        class_unet.class_embedding.weight.data.zero_()
        try:
            zero_embedding = den(x, s, class_labels=labels)
        finally:
            class_unet.class_embedding.weight.data.copy_(weight)
    assert torch.equal(by_index, by_row), "a one-hot row must be exactly its class"
    assert rel_err(other[0], by_index[0]) > 1e-6 and torch.equal(other[1], by_index[1])
    assert torch.equal(zero, zero_embedding), "an all-zero row must mean a zero class embedding"


class Recorder(Denoiser):
    """D(x, sigma | labels, emb) = x / (1 + sigma^2) + labels @ W + emb.mean(1); records every call."""

    sigma_min, sigma_max, shape = 0.01, 10.0, (4,)

    def __init__(self):
        self.calls = []
        self.weight = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(3, 4)

    def denoise(self, x, sigma, class_labels=None, encoder_hidden_states=None):
        self.calls.append(dict(batch=x.shape[0], class_labels=class_labels, encoder_hidden_states=encoder_hidden_states))
        out = x / (1 + sigma[:, None] ** 2)
        if class_labels is not None:
            out = out + class_labels @ self.weight
        if encoder_hidden_states is not None:
            out = out + encoder_hidden_states.mean(1)
        return out


def test_cfg_class_labels_one_batched_call():
    inner = Recorder()
    x = torch.randn(3, 4, dtype=torch.float64)
    s = torch.full((3,), 0.7, dtype=torch.float64)
    labels = torch.nn.functional.one_hot(torch.tensor([0, 2, 1]), 3).double()
    guided = ClassifierFreeGuidance(inner, 4.0)(x, s, class_labels=labels)
    assert len(inner.calls) == 1 and inner.calls[0]["batch"] == 6, "cond and uncond must be one call of 2 x batch"
    seen = inner.calls[0]["class_labels"]
    assert torch.equal(seen[:3], torch.zeros_like(labels)) and torch.equal(seen[3:], labels), "uncond first, then cond"
    d_c, d_u = inner(x, s, class_labels=labels), inner(x, s, class_labels=torch.zeros_like(labels))
    assert rel_err(guided, d_u + 4.0 * (d_c - d_u)) < 1e-15
    inner.calls.clear()
    assert torch.equal(ClassifierFreeGuidance(inner, 1.0)(x, s, class_labels=labels), d_c), "scale 1 = conditional model"
    assert len(inner.calls) == 1 and inner.calls[0]["batch"] == 3, "scale 1 must skip the unconditional half"
    # integer labels work with num_classes
    inner.calls.clear()
    by_index = ClassifierFreeGuidance(inner, 4.0, num_classes=3)(x, s, class_labels=torch.tensor([0, 2, 1]))
    assert torch.equal(by_index, guided)
    with pytest.raises(ValueError, match="num_classes"):
        ClassifierFreeGuidance(inner, 4.0)(x, s, class_labels=torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="out of range"):
        ClassifierFreeGuidance(inner, 4.0, num_classes=3)(x, s, class_labels=torch.tensor([0, 3, 1]))


def test_cfg_prompt_embeddings_and_nfe():
    inner = Recorder()
    cond_emb = torch.randn(1, 5, 4, dtype=torch.float64)     # one prompt, broadcast over the batch
    neg_emb = torch.randn(1, 5, 4, dtype=torch.float64)
    den = ClassifierFreeGuidance(inner, 7.5, uncond={"encoder_hidden_states": neg_emb})
    noise = torch.randn(2, 4, dtype=torch.float64)
    result = sample(den, noise, "ipndm", nfe=6, cond={"encoder_hidden_states": cond_emb})
    assert result.nfe == 6 == len(inner.calls), "one guided evaluation = one model call"
    for call in inner.calls:
        assert call["batch"] == 4
        assert torch.equal(call["encoder_hidden_states"][:2], neg_emb.expand(2, 5, 4))
        assert torch.equal(call["encoder_hidden_states"][2:], cond_emb.expand(2, 5, 4))
    with pytest.raises(ValueError, match="unconditional input"):
        ClassifierFreeGuidance(inner, 2.0)(noise, torch.ones(2, dtype=torch.float64), encoder_hidden_states=cond_emb)


def test_cfg_on_class_conditional_unet(class_unet):
    """Through DiffusersDenoiser: the zero rows of the uncond half reach the UNet as a zero embedding."""
    den = DiffusersDenoiser.from_unet_and_scheduler(class_unet, diffusers.DDPMScheduler())
    x, s = pixel_noise(), torch.full((2,), 1.5, dtype=torch.float64)
    rows = torch.nn.functional.one_hot(torch.tensor([1, 8]), 10).double()
    counter = CountForwards(class_unet)
    try:
        with torch.no_grad():
            guided = ClassifierFreeGuidance(den, 3.0)(x, s, class_labels=rows)
            d_c = den(x, s, class_labels=rows)
            d_u = den(x, s, class_labels=torch.zeros_like(rows))
            plain = ClassifierFreeGuidance(den, 1.0)(x, s, class_labels=rows)
    finally:
        counter.remove()
    assert counter.batches == [4, 2, 2, 2]
    assert torch.equal(plain, d_c)
    assert rel_err(guided, d_u + 3.0 * (d_c - d_u)) < 1e-12


def test_run_class_conditional_with_guidance(class_unet):
    """run(class_labels=..., guidance=w) == sample() on ClassifierFreeGuidance(one-hot rows) from the same start,
    with one UNet forward of 2 x batch per evaluation."""
    pipe = diffusers.DDPMPipeline(unet=class_unet, scheduler=diffusers.DDPMScheduler())
    latents = pixel_noise(seed=4)
    counter = CountForwards(class_unet)
    try:
        out = pipelines.run(pipe, solver="dpmpp", nfe=4, class_labels=[2, 9], guidance=2.5, latents=latents,
                            output_type="pt")
    finally:
        counter.remove()
    assert out.nfe == 4 and counter.batches == [4] * 4
    den = DiffusersDenoiser.from_pipeline(pipe)
    rows = torch.nn.functional.one_hot(torch.tensor([2, 9]), 10).double()
    with torch.no_grad():
        ref = sample(ClassifierFreeGuidance(den, 2.5), start_noise(den, latents, float(out.sigmas[0])), "dpmpp",
                     sigmas=out.sigmas, cond={"class_labels": rows})
    assert torch.equal(out.latents, ref.samples)


# --- 4. flow matching --------------------------------------------------------------------------------------

@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_matches_flowmatch_scheduler(transformer, shift):
    """Our Euler + final denoising == FlowMatchEulerDiscreteScheduler over the same sigmas.  The scheduler
    gets unshifted sigmas u (0.98 .. 0.05) and shifts them; its grid ends with t=0, which an ODE grid
    cannot hold, and its Euler step to t=0 is x_t - t v = x0, our denoise_to_zero: 8 evaluations each.
    The scheduler's step runs in float32."""
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    den = FlowDenoiser(transformer, **{"shift": shift})
    assert den.shape == (4, 8, 8)
    u = torch.linspace(0.98, 0.05, 8, dtype=torch.float64)
    sched.set_timesteps(sigmas=u.tolist())
    t_sched = sched.sigmas[:-1].double()
    assert float(sched.sigmas[-1]) == 0
    ours_grid = shifted_schedule(7, float(t_to_sigma(shift_time(u[-1], shift))), float(t_to_sigma(shift_time(u[0], shift))),
                                 shift=shift)
    assert float((ours_grid / (1 + ours_grid) - t_sched).abs().max()) < 1e-6, "shifted_schedule vs the scheduler's shift"
    grid = t_to_sigma(t_sched)
    gen = torch.Generator().manual_seed(2)
    noise = torch.randn(2, 4, 8, 8, generator=gen)
    cond = dict(encoder_hidden_states=torch.randn(2, 5, 32, generator=gen), pooled_projections=torch.randn(2, 16, generator=gen))
    with torch.no_grad():
        x = noise.clone()
        for t in sched.timesteps:
            v = transformer(hidden_states=x, timestep=t.expand(2), return_dict=False, **cond)[0]
            x = sched.step(v, t, x).prev_sample
        s0 = float(grid[0])
        result = sample(den, start_noise(den, noise, s0), "euler", sigmas=grid, denoise_to_zero=True, cond=cond)
    assert result.nfe == 8
    assert_close(result.samples, x, f"flow euler vs FlowMatchEulerDiscreteScheduler (shift {shift}, float32)", 1e-5)


def test_flow_denoiser_formulas():
    """x_t = x_ve / (1 + sigma), t = sigma / (1 + sigma), timestep = t * T, x0 = x_t - t v, on a callable."""
    seen = {}

    def velocity(x_t, timestep, scale=1.0):
        seen.update(x_t=x_t, timestep=timestep)
        return scale * x_t

    den = FlowDenoiser(velocity, shift=3.0)
    assert den.sigma_min == pytest.approx(3 / 999) and den.sigma_max == pytest.approx(2997.0)
    x = torch.randn(2, 4, dtype=torch.float64)
    sigma = torch.tensor([0.5, 3.0], dtype=torch.float64)
    out = den(x, sigma, scale=2.0)
    t = sigma / (1 + sigma)
    assert torch.allclose(seen["x_t"], x / (1 + sigma[:, None]), rtol=1e-15)
    assert torch.allclose(seen["timestep"], 1000 * t, rtol=1e-15)
    assert torch.allclose(out, seen["x_t"] - t[:, None] * 2.0 * seen["x_t"], rtol=1e-15)
    grid = shifted_schedule(6, 0.01, 100.0, shift=3.0)
    assert grid[0] == 100.0 and grid[-1] == 0.01 and bool((grid[1:] < grid[:-1]).all())
    with torch.no_grad():
        result = sample(den, torch.randn(2, 4, dtype=torch.float64), "euler", nfe=6, schedule=den.schedule())
    assert result.nfe == 6 and result.sigmas[0] == den.sigma_max


# --- 5. Stable Diffusion through pipelines.run -----------------------------------------------------------------

@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_run_reproduces_stable_diffusion_pipeline(sd_pipe, guidance):
    """pipelines.run(pipe, prompt, solver="euler") on the DDIM grid == the pipeline's own loop, from the same
    latents, with guidance (one UNet forward of 2 x batch per evaluation) and without (batch)."""
    pipe = sd_pipe
    prompts = ["a cat", "dog"]
    latents = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        theirs = pipe(prompts, num_inference_steps=10, guidance_scale=guidance, latents=latents.clone(),
                      height=16, width=16, output_type="latent").images
    ld = LatentDiffusion.from_pipeline(pipe)
    assert ld.shape == (4, 8, 8) and (ld.height, ld.width) == (16, 16)
    grid = ld.inner.t_to_sigma(torch.tensor(DDIM_TIMESTEPS, dtype=torch.float64))
    counter = CountForwards(pipe.unet)
    try:
        out = pipelines.run(pipe, prompts, solver="euler", sigmas=grid, guidance=guidance, latents=latents,
                            output_type="latent")
    finally:
        counter.remove()
    assert out.nfe == 10 and len(counter.batches) == 10, "one UNet forward per counted evaluation"
    assert set(counter.batches) == {2 if guidance == 1.0 else 4}
    ours = out.latents * ld.model_input_scale(float(grid[-1])).item()
    assert_close(ours, theirs, f"pipelines.run vs StableDiffusionPipeline (guidance {guidance}, float64)", 1e-10)

    # decoding: ours on the pipeline's latents == the pipeline's images (it returns (x / 2 + 0.5).clamp(0, 1))
    with torch.no_grad():
        images = pipe(prompts, num_inference_steps=10, guidance_scale=guidance, latents=latents.clone(),
                      height=16, width=16, output_type="pt").images
    assert_close(ld.decode(theirs) / 2 + 0.5, images, "LatentDiffusion.decode vs the pipeline's VAE decoding", 1e-12)
    pt = pipelines.run(pipe, prompts, solver="euler", sigmas=grid, guidance=guidance, latents=latents, output_type="pt")
    assert pt.images.shape == (2, 3, 16, 16) and torch.equal(pt.images, ld.decode(out.latents))


def test_stable_diffusion_pieces(sd_pipe):
    """encode_prompt gives the pipeline's embeddings; negative prompts reach the uncond half; seeds and PIL."""
    ld = LatentDiffusion.from_pipeline(sd_pipe)
    cond, uncond = ld.encode_prompt("a cat", negative_prompt="blurry")
    embeds, negative = sd_pipe.encode_prompt("a cat", sd_pipe.device, 1, True, "blurry")
    assert torch.equal(cond["encoder_hidden_states"], embeds) and torch.equal(uncond["encoder_hidden_states"], negative)
    assert not torch.equal(embeds, negative)
    _, empty = ld.encode_prompt("a cat")
    assert torch.equal(empty["encoder_hidden_states"], sd_pipe.encode_prompt("", sd_pipe.device, 1, False)[0])
    out = pipelines.run(sd_pipe, "a cat", solver="ipndm", nfe=4, seed=7, num_images_per_prompt=2)
    assert out.nfe == 4 and len(out.images) == 2 and out.images[0].size == (16, 16)
    again = pipelines.run(sd_pipe, "a cat", solver="ipndm", nfe=4, seed=8, output_type="latent")
    # each sample has its own seed (seed + i): the same sample in another batch, up to float64 rounding
    assert rel_err(again.latents[0], out.latents[1]) < 1e-12, "each sample has its own seed (seed + i)"
    # a pipeline's safety checker runs on the decoded images, as in diffusers
    seen = []

    def checker(image, device, dtype):
        seen.append(image.clone())
        return torch.zeros_like(image), [True] * len(image)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sd_pipe, "safety_checker", object())
        mp.setattr(sd_pipe, "run_safety_checker", checker)
        flagged = pipelines.run(sd_pipe, "a cat", solver="euler", nfe=2, seed=1, output_type="pt")
    assert flagged.nsfw_content_detected == [True] and torch.equal(flagged.images, torch.zeros(1, 3, 16, 16, dtype=torch.float64))
    assert torch.equal(seen[0], ld.decode(flagged.latents))
    big = ld.at_size(32, 16)
    assert big.shape == (4, 16, 8) and ld.shape == (4, 8, 8)
    assert pipelines.run(sd_pipe, "a cat", solver="euler", nfe=2, height=32, width=16, output_type="pt").images.shape \
        == (1, 3, 32, 16)


# --- 6. SD3 (flow matching in latent space) through pipelines.run -------------------------------------------------

@pytest.fixture(scope="module")
def sd3_pipe(tokenizer, transformer):
    torch.manual_seed(1)
    config = clip_config(tokenizer, projection_dim=8)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(scaling_factor=1.5, shift_factor=0.1),
        text_encoder=transformers.CLIPTextModelWithProjection(config), tokenizer=tokenizer,
        text_encoder_2=transformers.CLIPTextModelWithProjection(config), tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_run_reproduces_sd3_pipeline(sd3_pipe, guidance):
    """SD3: the pipeline's flow Euler over sigmas u shifted by 3 (then t=0) == our euler over the same VE
    sigmas + denoise_to_zero, from the same latents (at t0 < 1 the pipeline uses them as x_t0 as is)."""
    pipe = sd3_pipe
    u = torch.linspace(0.95, 0.1, 6).tolist()
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():   # T5-less SD3: the prompt is 2 x 12 CLIP tokens + max_sequence_length zero tokens
        theirs = pipe("a cat", sigmas=u, guidance_scale=guidance, latents=latents.clone(), height=16, width=16,
                      output_type="latent", max_sequence_length=8).images
        images = pipe("a cat", sigmas=u, guidance_scale=guidance, latents=latents.clone(), height=16, width=16,
                      output_type="pt", max_sequence_length=8).images
    probe = diffusers.FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    probe.set_timesteps(sigmas=u)
    grid = t_to_sigma(probe.sigmas[:-1].double())
    ld = LatentDiffusion.from_pipeline(pipe)
    assert isinstance(ld.inner, FlowDenoiser) and ld.inner.shift == 3.0 and ld.shape == (4, 8, 8)
    counter = CountForwards(pipe.transformer)
    try:
        out = pipelines.run(pipe, "a cat", solver="euler", sigmas=grid, denoise_to_zero=True, guidance=guidance,
                            latents=latents, output_type="latent", prompt_options=dict(max_sequence_length=8))
    finally:
        counter.remove()
    assert out.nfe == 6 == len(counter.batches) and set(counter.batches) == {1 if guidance == 1.0 else 2}
    assert_close(out.latents, theirs, f"pipelines.run vs StableDiffusion3Pipeline (guidance {guidance})", 1e-5)
    assert_close(ld.decode(theirs) / 2 + 0.5, images, "decode with shift_factor vs the SD3 pipeline", 1e-6)


# --- 7. bad input -----------------------------------------------------------------------------------------

def test_bad_input(sd_pipe, unet, class_unet):
    ddpm = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler())
    with pytest.raises(ValueError, match="lacks vae"):
        LatentDiffusion.from_pipeline(ddpm)
    no_text = diffusers.StableDiffusionPipeline(vae=sd_pipe.vae, text_encoder=None, tokenizer=None, unet=sd_pipe.unet,
                                                scheduler=sd_pipe.scheduler, safety_checker=None, feature_extractor=None,
                                                requires_safety_checker=False)
    with pytest.raises(ValueError, match="lacks text_encoder"):
        LatentDiffusion.from_pipeline(no_text)
    with pytest.raises(ValueError, match="takes no prompt"):
        pipelines.run(ddpm, "a cat", solver="euler", nfe=2)
    with pytest.raises(ValueError, match="text-conditioned: give a prompt"):
        pipelines.run(sd_pipe, solver="euler", nfe=2)
    with pytest.raises(ValueError, match="not class-conditional"):
        pipelines.run(ddpm, solver="euler", nfe=2, class_labels=[1])
    class_pipe = diffusers.DDPMPipeline(unet=class_unet, scheduler=diffusers.DDPMScheduler())
    with pytest.raises(ValueError, match=r"class label 12 is out of range.*10 classes"):
        pipelines.run(class_pipe, solver="euler", nfe=2, class_labels=[3, 12])
    with pytest.raises(ValueError, match="pass class_labels"):
        pipelines.run(class_pipe, solver="euler", nfe=2)
    den = DiffusersDenoiser.from_pipeline(class_pipe)
    x, s = pixel_noise(), torch.ones(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="out of range"):
        den(x, s, class_labels=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="not class-conditional"):
        DiffusersDenoiser.from_pipeline(ddpm)(x, s, class_labels=torch.tensor([0, 1]))
    ld = LatentDiffusion.from_pipeline(sd_pipe)
    with pytest.raises(ValueError, match=r"latents have shape \(1, 4, 8, 8\) but this run needs \(1, 4, 16, 16\)"):
        pipelines.run(sd_pipe, "a cat", solver="euler", nfe=2, height=32, width=32,
                      latents=torch.randn(1, 4, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"model expects \(4, 8, 8\)"):
        sample(ld, torch.randn(1, 4, 16, 16, dtype=torch.float64), "euler", nfe=2)
    with pytest.raises(ValueError, match="latents have shape"):
        ld(torch.randn(1, 3, 8, 8, dtype=torch.float64), torch.ones(1, dtype=torch.float64))
    with pytest.raises(ValueError, match="latents must have shape"):
        ld.decode(torch.randn(1, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="not a positive multiple of 2"):
        ld.at_size(15, 16)
    with pytest.raises(ValueError, match="prediction_type"):
        DiffusersDenoiser(unet, diffusers.DDPMScheduler().alphas_cumprod, prediction_type="flow")
    with pytest.raises(ValueError, match="not a flow-matching scheduler"):
        FlowDenoiser.from_pipeline(type("P", (), {"transformer": object(), "scheduler": diffusers.DDPMScheduler()})())


def test_cli_samples_a_saved_stable_diffusion_pipeline(sd_pipe, unet, tmp_path):
    """`diffsampler sample --model diffusers:DIR --prompt ... --guidance ...` writes decoded images."""
    from click.testing import CliRunner
    from PIL import Image
    from diffsampler.cli import main
    folder = tmp_path / "sd"
    sd_pipe.save_pretrained(folder)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["sample", "--model", f"diffusers:{folder}", "--prompt", "a cat", "--guidance",
                                       "7.5", "--solver", "dpmpp", "--nfe", "4", "--seeds", "0-2", "--outdir", str(out)])
    assert result.exit_code == 0, result.output
    images = sorted((out / "000000").glob("*.png"))
    assert len(images) == 3 and Image.open(images[0]).size == (16, 16) and Image.open(images[0]).mode == "RGB"
    again = CliRunner().invoke(main, ["sample", "--model", f"diffusers:{folder}", "--prompt", "a cat", "--guidance",
                                      "7.5", "--solver", "dpmpp", "--nfe", "4", "--seeds", "1", "--outdir",
                                      str(tmp_path / "one")])
    assert again.exit_code == 0
    assert (tmp_path / "one" / "000000" / "000001.png").read_bytes() == images[1].read_bytes()
    # --device other than the literal "cpu": the pipeline moves before its prompt is encoded and before
    # guidance wraps it (the wrapper has no .to), and samples the same image
    moved = CliRunner().invoke(main, ["sample", "--model", f"diffusers:{folder}", "--prompt", "a cat", "--guidance",
                                      "7.5", "--solver", "dpmpp", "--nfe", "4", "--seeds", "1", "--device", "cpu:0",
                                      "--outdir", str(tmp_path / "moved")])
    assert moved.exit_code == 0, moved.output
    assert (tmp_path / "moved" / "000000" / "000001.png").read_bytes() == images[1].read_bytes()
    # --height/--width resize a latent pipeline's images; the size is a setting of the run folder
    base = ["sample", "--model", f"diffusers:{folder}", "--prompt", "a cat", "--solver", "dpmpp", "--nfe", "2"]
    tall_dir = str(tmp_path / "tall")
    resized = CliRunner().invoke(main, base + ["--seeds", "0", "--height", "32", "--width", "16", "--outdir", tall_dir])
    assert resized.exit_code == 0, resized.output
    assert Image.open(tmp_path / "tall" / "000000" / "000000.png").size == (16, 32)
    assert json.loads((tmp_path / "tall" / "settings.json").read_text())["image_size"] == [32, 16]
    square = CliRunner().invoke(main, base + ["--seeds", "1", "--outdir", tall_dir])
    assert square.exit_code == 2 and "image_size" in square.output
    odd = CliRunner().invoke(main, base + ["--height", "15", "--outdir", str(tmp_path / "odd")])
    assert odd.exit_code == 2 and "not a positive multiple" in odd.output and "Traceback" not in odd.output
    fixed = CliRunner().invoke(main, ["sample", "--height", "32", "--outdir", str(tmp_path / "fixed")])
    assert fixed.exit_code == 2 and "fixed shape (1, 28, 28)" in fixed.output
    missing = CliRunner().invoke(main, ["sample", "--model", f"diffusers:{folder}", "--outdir", str(tmp_path / "x")])
    assert missing.exit_code == 2 and "give --prompt" in missing.output
    pixel = tmp_path / "ddim"
    diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler()).save_pretrained(pixel)
    refused = CliRunner().invoke(main, ["sample", "--model", f"diffusers:{pixel}", "--prompt", "a cat",
                                        "--outdir", str(tmp_path / "y")])
    assert refused.exit_code == 2 and "not text-conditioned" in refused.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
