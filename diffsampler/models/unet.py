"""A small class-conditional U-Net for low-resolution images (e.g. 1x28x28 Fashion-MNIST).

The network ``F(x, c_noise, class_labels)`` is the raw function that a preconditioning wrapper
(:mod:`diffsampler.models.edm`) turns into a denoiser.  Design:

* input 3x3 conv, then one level per entry of ``channel_mult``; each level has
  ``num_res_blocks`` residual blocks and (except the last) a stride-2 conv downsampling
  (28 -> 14 -> 7 for three levels; any size works, odd sizes round up);
* the bottleneck ``mid`` (a :class:`MidBlock`: residual block, optional self-attention,
  residual block) -- kept as an attribute named ``mid`` so that features can be hooked there;
* a mirrored decoder with skip connections (concatenation), nearest upsampling to the exact
  size of the matching encoder activation, then GroupNorm, SiLU and a zero-initialised conv;
* residual blocks: GroupNorm, SiLU, conv, adaptive scale/shift from the embedding, GroupNorm,
  SiLU, dropout, zero-initialised conv, plus a (1x1 if needed) skip path;
* embedding: sinusoidal features of ``c_noise`` through a two-layer MLP, plus a bias-free
  linear map of the one-hot class vector -- an all-zero row contributes nothing, which is the
  "unconditional" input that label dropout trains;
* optional step-count embedding (``step_embedding=True``, for SFD-v students that sample with
  several step counts, :mod:`diffsampler.distill`): positional features of ``step_count`` through
  a two-layer MLP whose last layer starts at zero, added to the noise embedding, so a network that
  gains it computes exactly what it did before (:meth:`UNet.add_step_embedding`).

The architecture is fully described by :class:`UNetConfig` (a dataclass), which is saved as a
plain dict next to the weights so that the model can be rebuilt with ``UNet.from_config``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class UNetConfig:
    """Architecture hyper-parameters of :class:`UNet`."""

    image_size: int = 28
    in_channels: int = 1
    out_channels: int = 1
    base_channels: int = 32
    channel_mult: Tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attention_mid: bool = True      # self-attention in the bottleneck
    attention_heads: int = 4
    num_classes: int = 10           # 0 = unconditional network
    emb_dim: Optional[int] = None   # default: 4 * base_channels
    noise_embedding: str = "fourier"  # "fourier" (log-spaced frequencies) or "positional"
    noise_embedding_dim: int = 64
    groups: int = 8
    dropout: float = 0.0
    step_embedding: bool = False    # an extra input: the number of sampling steps (SFD-v students)

    def __post_init__(self):
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        if self.emb_dim is None:
            self.emb_dim = 4 * self.base_channels
        if self.noise_embedding not in ("fourier", "positional"):
            raise ValueError(f"noise_embedding must be 'fourier' or 'positional', got {self.noise_embedding!r}")
        for m in self.channel_mult:
            if (m * self.base_channels) % self.groups:
                raise ValueError("every level's channel count must be divisible by `groups`")

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "UNetConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown UNetConfig keys: {sorted(unknown)}")
        return cls(**d)


class NoiseEmbedding(nn.Module):
    """Sinusoidal features of a scalar noise conditioning value, shape (B,) -> (B, dim).

    ``"fourier"``: angular frequencies log-spaced between 1 and ``max_freq`` -- suited to the
    small range of EDM's ``c_noise = ln(sigma)/4`` (about -1.6..1.1).  ``"positional"``: the
    transformer-style periods 1..10000, suited to VP's ``c_noise`` in [0, 999].
    """

    def __init__(self, dim: int, kind: str = "fourier", max_freq: float = 64.0):
        super().__init__()
        if dim % 2:
            raise ValueError("noise embedding dim must be even")
        half = dim // 2
        if kind == "fourier":
            freqs = torch.exp(torch.linspace(0.0, math.log(max_freq), half))
        else:
            freqs = torch.exp(-math.log(10000.0) * torch.arange(half) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        arg = c_noise.float()[:, None] * self.freqs[None, :]
        return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)


def _zero_init(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)  # scale and shift
        self.norm2 = nn.GroupNorm(groups, cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero_init(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    def __init__(self, channels: int, heads: int, groups: int):
        super().__init__()
        if channels % heads:
            raise ValueError("attention channels must be divisible by the number of heads")
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, hgt * wid).unbind(1)
        # (b, heads, tokens, head_dim)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        out = out.transpose(-1, -2).reshape(b, c, hgt, wid)
        return x + self.proj(out)


class MidBlock(nn.Module):
    """The bottleneck: residual block, optional self-attention, residual block."""

    def __init__(self, channels: int, emb_dim: int, groups: int, dropout: float, attention: bool, heads: int):
        super().__init__()
        self.res1 = ResBlock(channels, channels, emb_dim, groups, dropout)
        self.attn = SelfAttention(channels, heads, groups) if attention else None
        self.res2 = ResBlock(channels, channels, emb_dim, groups, dropout)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.res1(x, emb)
        if self.attn is not None:
            x = self.attn(x)
        return self.res2(x, emb)


class UNet(nn.Module):
    """``F(x, c_noise, class_labels=None) -> output`` with the same shape as ``x``.

    ``c_noise`` has shape ``(B,)``; ``class_labels`` is a float ``(B, num_classes)`` tensor
    (one-hot, or all zeros for "unconditional"); ``None`` means all zeros.
    """

    def __init__(self, config: Optional[UNetConfig] = None, **kwargs):
        super().__init__()
        if config is None:
            config = UNetConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a UNetConfig or keyword arguments, not both")
        self.config = cfg = config
        emb_dim = cfg.emb_dim
        chans = [cfg.base_channels * m for m in cfg.channel_mult]

        self.noise_features = NoiseEmbedding(cfg.noise_embedding_dim, cfg.noise_embedding)
        self.noise_mlp = nn.Sequential(
            nn.Linear(cfg.noise_embedding_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.class_embed = nn.Linear(cfg.num_classes, emb_dim, bias=False) if cfg.num_classes > 0 else None
        self.step_features = self.step_mlp = None
        if cfg.step_embedding:
            self._build_step_embedding()

        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skip_chans = [chans[0]]
        cur = chans[0]
        for level, ch in enumerate(chans):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(cur, ch, emb_dim, cfg.groups, cfg.dropout))
                cur = ch
                skip_chans.append(cur)
            self.down.append(blocks)
            if level < len(chans) - 1:
                self.downsample.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
                skip_chans.append(cur)

        self.mid = MidBlock(cur, emb_dim, cfg.groups, cfg.dropout, cfg.attention_mid, cfg.attention_heads)

        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level in reversed(range(len(chans))):
            ch = chans[level]
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResBlock(cur + skip_chans.pop(), ch, emb_dim, cfg.groups, cfg.dropout))
                cur = ch
            self.up.append(blocks)
            if level > 0:
                self.upsample.append(nn.Conv2d(cur, cur, 3, padding=1))
        assert not skip_chans

        self.norm_out = nn.GroupNorm(cfg.groups, cur)
        self.conv_out = _zero_init(nn.Conv2d(cur, cfg.out_channels, 3, padding=1))

    @classmethod
    def from_config(cls, config: Dict[str, Any] | UNetConfig) -> "UNet":
        if isinstance(config, dict):
            config = UNetConfig.from_dict(config)
        return cls(config)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def _build_step_embedding(self) -> None:
        cfg = self.config
        self.step_features = NoiseEmbedding(cfg.noise_embedding_dim, "positional")
        self.step_mlp = nn.Sequential(nn.Linear(cfg.noise_embedding_dim, cfg.emb_dim), nn.SiLU(),
                                      _zero_init(nn.Linear(cfg.emb_dim, cfg.emb_dim)))

    def add_step_embedding(self) -> "UNet":
        """Give the network a ``step_count`` input (in place; returns it).  The new embedding's
        last layer is zero, so the outputs are exactly the same as before until it is trained."""
        if self.step_mlp is None:
            self.config.step_embedding = True
            with torch.random.fork_rng(devices=[]):      # the same initial student whatever the global seed
                torch.manual_seed(0)
                self._build_step_embedding()
            self.step_mlp.to(device=self.conv_in.weight.device, dtype=self.conv_in.weight.dtype)
        return self

    def embedding(self, c_noise: torch.Tensor, class_labels: Optional[torch.Tensor],
                  step_count: Optional[torch.Tensor] = None) -> torch.Tensor:
        emb = self.noise_mlp(self.noise_features(c_noise))
        if step_count is not None:
            if self.step_mlp is None:
                raise ValueError("this network has no step-count input (UNetConfig.step_embedding is off)")
            steps = torch.as_tensor(step_count, device=emb.device).reshape(-1).expand(emb.shape[0])
            emb = emb + self.step_mlp(self.step_features(steps)).to(emb.dtype)
        if self.class_embed is not None and class_labels is not None:
            if class_labels.shape != (emb.shape[0], self.config.num_classes):
                raise ValueError(
                    f"class_labels must have shape (batch, {self.config.num_classes}), got {tuple(class_labels.shape)}"
                )
            emb = emb + self.class_embed(class_labels.to(emb.dtype))
        return F.silu(emb)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
                step_count: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``step_count``: a number or a ``(B,)`` tensor, for networks with a step embedding."""
        c_noise = c_noise.reshape(-1).expand(x.shape[0]) if c_noise.numel() == 1 else c_noise.reshape(-1)
        emb = self.embedding(c_noise, class_labels, step_count)
        h = self.conv_in(x)
        skips = [h]
        for level, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, emb)
                skips.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)
                skips.append(h)
        h = self.mid(h, emb)
        for i, blocks in enumerate(self.up):
            for block in blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if i < len(self.upsample):
                h = F.interpolate(h, size=skips[-1].shape[-2:], mode="nearest")
                h = self.upsample[i](h)
        return self.conv_out(F.silu(self.norm_out(h)))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
