"""Tiny diffusers pipelines built from configs with random weights (nothing downloaded), for the
integration tests: DDPM (pixel UNet), Stable Diffusion, SDXL (two CLIP encoders, text_time UNet),
SD3 (flow transformer, static shift) and Flux (CLIP + T5, packed-latent transformer with a guidance embedding), 16 x 16 images.

The tokenizer is a CLIP BPE tokenizer over single letters written to a temporary folder; it also
serves as Flux's T5 tokenizer (any tokenizer that pads to ``max_sequence_length`` works there).
"""
import json

import diffusers
import torch
import transformers

diffusers.utils.logging.set_verbosity_error()
transformers.logging.set_verbosity_error()


def tokenizer(folder):
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=12,
                                      pad_token="<|endoftext|>")


def clip_config(tok, **extra):
    return transformers.CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, max_position_embeddings=12, bos_token_id=0, eos_token_id=1,
                                       pad_token_id=1, **extra)


def vae(**config):
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                                   layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16, **config)


def quiet(pipe, dtype=None):
    """No progress bars; every module in eval mode (modules built from configs start in training mode,
    and T5's dropout would make every prompt encoding different)."""
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    if dtype is not None:
        pipe.to(dtype)
    return pipe


def ddpm_pipe(dtype=torch.float64):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=4)
    return quiet(diffusers.DDPMPipeline(unet=unet.eval(), scheduler=diffusers.DDPMScheduler(beta_schedule="linear")),
                 dtype)


def sd_scheduler():
    """Stable Diffusion's training schedule with Euler ("leading" spacing: init_noise_sigma = sqrt(1 + sigma_max^2))."""
    return diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                            steps_offset=1, timestep_spacing="leading")


def sd_pipe(tok, dtype=torch.float32):
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4)
    pipe = diffusers.StableDiffusionPipeline(vae=vae(), text_encoder=transformers.CLIPTextModel(clip_config(tok)),
                                             tokenizer=tok, unet=unet, scheduler=sd_scheduler(), safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    return quiet(pipe, dtype)


def sdxl_pipe(tok, dtype=torch.float32):
    """SDXL in miniature: encoder 1 (16 wide) and 2 (16 wide, projection 8) concatenated as 32-wide
    cross-attention tokens; time ids 6 x 4 + pooled 8 = 32 added-embedding features."""
    torch.manual_seed(1)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=4, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 8)
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=vae(scaling_factor=0.13025), text_encoder=transformers.CLIPTextModel(clip_config(tok)), tokenizer=tok,
        text_encoder_2=transformers.CLIPTextModelWithProjection(clip_config(tok, projection_dim=8)), tokenizer_2=tok,
        unet=unet, scheduler=sd_scheduler(), add_watermarker=False)
    return quiet(pipe, dtype)


def sd3_pipe(tok, dtype=torch.float32):
    """SD3 in miniature: a flow transformer (static shift 3), two CLIP encoders, no T5."""
    torch.manual_seed(3)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8)
    config = clip_config(tok, projection_dim=8)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(scaling_factor=1.5, shift_factor=0.1), text_encoder=transformers.CLIPTextModelWithProjection(config),
        tokenizer=tok, text_encoder_2=transformers.CLIPTextModelWithProjection(config), tokenizer_2=tok,
        text_encoder_3=None, tokenizer_3=None)
    return quiet(pipe, dtype)


def flux_pipe(tok, guidance_embeds=True, dtype=torch.float32):
    """Flux in miniature: 4 latent channels packed into 16-dim tokens, T5 with 16-dim tokens, pooled CLIP 16."""
    torch.manual_seed(2)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=16, guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4))
    t5 = transformers.T5EncoderModel(transformers.T5Config(vocab_size=len(tok), d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                                           num_heads=2, decoder_start_token_id=0, pad_token_id=1))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                          max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    pipe = diffusers.FluxPipeline(scheduler=scheduler, vae=vae(scaling_factor=0.3611, shift_factor=0.1159),
                                  text_encoder=transformers.CLIPTextModel(clip_config(tok)), tokenizer=tok,
                                  text_encoder_2=t5, tokenizer_2=tok, transformer=transformer)
    return quiet(pipe, dtype)


class CountForwards:
    """Counts a module's forward calls and the batch of each (a context manager)."""

    def __init__(self, module):
        self.module, self.batches = module, []

    def __enter__(self):
        self.handle = self.module.register_forward_pre_hook(self.hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def hook(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        self.batches.append(x.shape[0])


def rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def assert_close(ours, theirs, what, rtol):
    err = rel_err(ours, theirs)
    print(f"\n{what}: relative difference {err:.2e}")
    assert err <= rtol, f"{what}: relative difference {err:.3e} exceeds {rtol:.0e}"
