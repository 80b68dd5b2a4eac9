"""diffusers UNets trained with a discrete DDPM/DDIM noise schedule, seen as EDM denoisers.

A DDPM-style model is trained on ``x_vp = sqrt(acp[t]) x0 + sqrt(1 - acp[t]) n`` for integer
timesteps ``t = 0 .. T-1`` (``acp`` = the scheduler's ``alphas_cumprod``), and predicts ``n``
(``"epsilon"``), ``x0`` (``"sample"``) or ``v = sqrt(acp) n - sqrt(1 - acp) x0``
(``"v_prediction"``).  Dividing by ``alpha = sqrt(acp)`` gives the VE form used everywhere in
diffsampler::

    x_ve = x_vp / alpha,     sigma = sqrt((1 - acp) / acp),     alpha(sigma) = 1 / sqrt(1 + sigma^2).

:class:`DiffusersDenoiser` evaluates ``D(x_ve, sigma)`` as follows:

1. the model input is ``x_vp = alpha(sigma) * x_ve``;
2. the timestep is the model's own: ``t(sigma)`` interpolates the timestep *linearly in log sigma*
   over the model's discrete table ``sigma_t = sqrt((1 - acp[t]) / acp[t])``, the same mapping
   diffusers' Karras/DPM schedulers use for in-between sigmas.  A sigma of the table gives exactly
   its integer timestep; sigmas outside the table are clamped to its ends (t = 0 or T-1);
   ``time_embedding_type="learned"`` UNets (an embedding table, integer timesteps only) get the
   nearest integer;
3. the output becomes an x0 estimate: eps -> ``x_ve - sigma * eps``; sample -> itself;
   v -> ``alpha^2 x_ve - sigma * alpha * v``.  UNets with learned variance (2 x channels out) have
   the variance half dropped, as diffusers' schedulers do.

``sigma_min`` / ``sigma_max`` are the ends of the table (t = 0 and t = T-1).  A zero-terminal-SNR
table (``acp[T-1] = 0``, infinite sigma) ends at its last finite sigma.

Conditioning: every keyword of ``D(x, sigma, **cond)`` goes to the UNet (``encoder_hidden_states``
for a ``UNet2DConditionModel``, ...).  ``class_labels`` for a class-conditional ``UNet2DModel``
(a ``num_class_embeds`` embedding table) may be integer indices ``(batch,)`` or float rows
``(batch, num_classes)`` in the EDM convention: a one-hot row is that class, an all-zero row is
"no class" and gets a zero class embedding (the embedding table used as a linear map on the row);
a model trained with a dedicated null label (DiT style) maps zero rows to it instead
(``null_class_label=``).

The model's own training timesteps as a schedule: ``sample(den, noise, schedule="discrete",
schedule_options=discrete_schedule(den), ...)``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch

from .base import NetworkDenoiser, check_sample_shape, per_sample_sigma, work_dtype

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def vp_alpha(sigma: torch.Tensor) -> torch.Tensor:
    """alpha(sigma) = 1 / sqrt(1 + sigma^2): x_vp = alpha * x_ve."""
    return torch.rsqrt(1 + sigma * sigma)


class SigmaTable:
    """A model's discrete sigmas ``sigma_t`` (t = 0 .. T-1, increasing) and the map sigma <-> t,
    piecewise linear in log sigma, exact on the table.  Tables are cached per device."""

    def __init__(self, sigmas: torch.Tensor):
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu().flatten()
        if sigmas.numel() < 2 or not bool(torch.isfinite(sigmas).all()) or not bool((sigmas > 0).all()):
            raise ValueError("the sigma table needs at least 2 finite positive entries")
        if not bool((sigmas[1:] > sigmas[:-1]).all()):
            raise ValueError("the sigma table must increase strictly with the timestep "
                             "(alphas_cumprod must decrease strictly)")
        self.sigmas = sigmas
        self._cache: Dict[Tuple[torch.device, torch.dtype], Tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self):
        return len(self.sigmas)

    def _tables(self, device, dtype):
        key = (torch.device(device), dtype)
        if key not in self._cache:
            table = self.sigmas.to(device=device, dtype=dtype)
            self._cache[key] = (table, table.log())
        return self._cache[key]

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timesteps, linear in log sigma between table entries, clamped to [0, T-1]."""
        table, log_table = self._tables(sigma.device, sigma.dtype)
        n = len(table)
        s = sigma.reshape(-1).clamp(table[0], table[-1])
        hi = torch.searchsorted(table, s).clamp(1, n - 1)
        lo = hi - 1
        frac = (s.log() - log_table[lo]) / (log_table[hi] - log_table[lo])
        # exact on the table: s == table[lo] or table[hi] gives the integer itself
        frac = torch.where(s == table[lo], torch.zeros_like(frac), torch.where(s == table[hi], torch.ones_like(frac), frac))
        return (lo.to(sigma.dtype) + frac.clamp(0, 1)).reshape(sigma.shape)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`sigma_to_t`: the table itself at integer t, log-linear in between."""
        t = torch.as_tensor(t)
        t = t.to(torch.float64) if t.device.type != "mps" else t.float()
        table, log_table = self._tables(t.device, t.dtype)
        n = len(table)
        t = t.clamp(0, n - 1)
        lo = t.floor().long().clamp(0, n - 2)
        frac = t - lo.to(t.dtype)
        interp = (log_table[lo] + frac * (log_table[lo + 1] - log_table[lo])).exp()
        return torch.where(frac == 0, table[lo], torch.where(frac == 1, table[lo + 1], interp))


def sigmas_from_alphas_cumprod(alphas_cumprod) -> torch.Tensor:
    """sigma_t = sqrt((1 - acp[t]) / acp[t]) in float64; trailing entries with acp = 0 (zero terminal
    SNR: infinite sigma) are dropped."""
    acp = torch.as_tensor(alphas_cumprod).detach().cpu().to(torch.float64).flatten()
    if acp.numel() < 2:
        raise ValueError("alphas_cumprod needs at least 2 entries")
    if not bool(((acp >= 0) & (acp <= 1)).all()):
        raise ValueError("alphas_cumprod must lie in [0, 1]")
    keep = int((acp > 0).sum())
    if not bool((acp[:keep] > 0).all()):
        raise ValueError("alphas_cumprod may be 0 only at its end (zero terminal SNR)")
    acp = acp[:keep]
    return ((1 - acp) / acp).sqrt()


def _unwrap(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.sample


class DiffusersDenoiser(NetworkDenoiser):
    """A diffusers UNet (``UNet2DModel``, ``UNet2DConditionModel``, ...) with a discrete VP
    schedule, as ``D(x, sigma, **cond) -> x0`` in the VE parametrization (module docstring).

    Args:
        unet: the network, called as ``unet(x_vp, timesteps, **cond, return_dict=False)``.
        alphas_cumprod: the training schedule's cumulative alpha products (the scheduler's
            ``alphas_cumprod``), one per training timestep.
        prediction_type: ``"epsilon"``, ``"sample"`` or ``"v_prediction"``.
        shape: per-sample shape; default ``(in_channels, sample_size, sample_size)`` of the UNet
            config.
        null_class_label: for class-conditional UNets trained with a dedicated "no class" index.
    """

    def __init__(self, unet, alphas_cumprod, prediction_type: str = "epsilon", *,
                 shape: Optional[Tuple[int, ...]] = None, null_class_label: Optional[int] = None):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.unet = unet
        self.prediction_type = prediction_type
        self.table = SigmaTable(sigmas_from_alphas_cumprod(alphas_cumprod))
        self.num_train_timesteps = len(torch.as_tensor(alphas_cumprod).flatten())
        self.sigma_min = float(self.table.sigmas[0])
        self.sigma_max = float(self.table.sigmas[-1])
        config = getattr(unet, "config", {}) or {}
        self._learned_time = config.get("time_embedding_type") == "learned"
        if shape is None:
            shape = _shape_from_config(config)
        self.shape = tuple(int(s) for s in shape) if shape is not None else None
        self._class_embedding = _class_embedding_table(unet)
        self.num_classes = int(self._class_embedding.num_embeddings) if self._class_embedding is not None else 0
        if null_class_label is not None and not 0 <= int(null_class_label) < self.num_classes:
            raise ValueError(f"null_class_label={null_class_label} is not a class index of this model "
                             f"(num_class_embeds={self.num_classes})")
        self.null_class_label = None if null_class_label is None else int(null_class_label)

    # -- constructors ------------------------------------------------------------------------------
    @classmethod
    def from_pipeline(cls, pipe, **kwargs) -> "DiffusersDenoiser":
        """From a loaded diffusers pipeline with ``unet`` and a DDPM-style ``scheduler``
        (DDPM, DDIM, PNDM, DPM-Solver, Euler, UniPC, ...: anything with ``alphas_cumprod``)."""
        unet = getattr(pipe, "unet", None)
        scheduler = getattr(pipe, "scheduler", None)
        if unet is None or scheduler is None:
            missing = [name for name, part in (("unet", unet), ("scheduler", scheduler)) if part is None]
            raise ValueError(f"{type(pipe).__name__} has no {' and no '.join(missing)}: DiffusersDenoiser needs a "
                             "pipeline with a UNet and a DDPM-style scheduler (for flow-matching transformers "
                             "use diffsampler.models.flow)")
        return cls.from_unet_and_scheduler(unet, scheduler, **kwargs)

    @classmethod
    def from_unet_and_scheduler(cls, unet, scheduler, **kwargs) -> "DiffusersDenoiser":
        alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
        if alphas_cumprod is None:
            raise ValueError(f"the scheduler {type(scheduler).__name__} has no alphas_cumprod (not a DDPM-style "
                             "discrete schedule); flow-matching schedulers go with diffsampler.models.flow.FlowDenoiser")
        kwargs.setdefault("prediction_type", scheduler.config.get("prediction_type", "epsilon"))
        return cls(unet, alphas_cumprod, **kwargs)

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], torch_dtype: Optional[torch.dtype] = None,
                        device=None, **kwargs) -> "DiffusersDenoiser":
        """From a local folder with ``unet/`` and ``scheduler/`` subfolders (a saved pipeline has them).
        Local files only: nothing is downloaded."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is not a folder (expected a saved diffusers pipeline or a folder "
                                    "with unet/ and scheduler/)")
        missing = [sub for sub in ("unet", "scheduler") if not (path / sub).is_dir()]
        if missing:
            raise ValueError(f"{path} has no {' and no '.join(s + '/' for s in missing)} subfolder: expected a saved "
                             "diffusers pipeline or a folder with unet/ and scheduler/ (as pipe.save_pretrained writes)")
        if (path / "vae").is_dir():
            raise ValueError(f"{path} holds a latent diffusion pipeline (it has vae/): load it with diffusers and use "
                             "diffsampler.models.latent.LatentDiffusion.from_pipeline")
        import diffusers
        unet_cls = getattr(diffusers, _class_name(path / "unet" / "config.json", "UNet2DModel"))
        load_kwargs: Dict[str, Any] = {"local_files_only": True}
        if torch_dtype is not None:
            load_kwargs[dtype_keyword()] = torch_dtype
        unet = unet_cls.from_pretrained(path, subfolder="unet", **load_kwargs)
        sched_name = _class_name(path / "scheduler" / "scheduler_config.json", "DDPMScheduler")
        sched_cls = getattr(diffusers, sched_name, None) or diffusers.DDPMScheduler
        scheduler = sched_cls.from_pretrained(path, subfolder="scheduler", local_files_only=True)
        if device is not None:
            unet.to(device)
        unet.eval()
        return cls.from_unet_and_scheduler(unet, scheduler, **kwargs)

    # -- the sigma <-> timestep map ------------------------------------------------------------------
    @property
    def sigmas(self) -> torch.Tensor:
        """The discrete sigma table, t = 0 .. T-1 (float64, increasing)."""
        return self.table.sigmas

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.table.sigma_to_t(sigma)

    def t_to_sigma(self, t) -> torch.Tensor:
        return self.table.t_to_sigma(t)

    def model_input_scale(self, sigma) -> torch.Tensor:
        """The factor c(sigma) with x_model = c * x_ve (here alpha = 1/sqrt(1 + sigma^2))."""
        return vp_alpha(torch.as_tensor(sigma, dtype=torch.float64))

    def discrete_schedule(self) -> Dict[str, Any]:
        """``schedule_options`` for ``schedules.discrete``: the model's integer training timesteps."""
        return discrete_schedule(self)

    # -- the denoiser --------------------------------------------------------------------------------
    @property
    def net(self) -> torch.nn.Module:
        """The UNet, for the module conveniences of :class:`NetworkDenoiser` (to, device, dtype, ...)."""
        return self.unet

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, class_labels=None, **cond) -> torch.Tensor:
        check_sample_shape(self, x.shape)
        batch = x.shape[0]
        work = work_dtype(x.device)
        s = per_sample_sigma(sigma, batch, x.device, work)
        bshape = (batch,) + (1,) * (x.ndim - 1)
        alpha = vp_alpha(s).reshape(bshape)
        xw = x.to(work)
        t = self.table.sigma_to_t(s)
        timesteps = t.round().long() if self._learned_time else t.to(torch.float32)
        model_dtype = self.dtype
        out = self._call_unet(((alpha * xw).to(model_dtype)), timesteps, class_labels, batch, cond)
        out = _unwrap(out)
        if out.shape[1] == 2 * x.shape[1] and out.shape[2:] == x.shape[2:]:
            out = out[:, : x.shape[1]]          # learned variance: keep the mean prediction
        if out.shape != x.shape:
            raise ValueError(f"the UNet returned shape {tuple(out.shape)} for input {tuple(x.shape)}")
        out = out.to(work)
        sb = s.reshape(bshape)
        if self.prediction_type == "epsilon":
            x0 = xw - sb * out
        elif self.prediction_type == "sample":
            x0 = out
        else:
            x0 = alpha * alpha * xw - sb * alpha * out
        return x0.to(x.dtype)

    def _call_unet(self, x_model, timesteps, class_labels, batch, cond):
        emb = self._class_embedding
        if emb is None:
            if class_labels is not None and self._has_class_input():
                cond = dict(cond, class_labels=class_labels)
            elif class_labels is not None:
                raise ValueError("this model is not class-conditional (its UNet has no class embedding); "
                                 "do not pass class_labels")
            return self.unet(x_model, timesteps, return_dict=False, **cond)
        rows = self._label_rows(class_labels, batch, x_model.device)
        if isinstance(rows, torch.Tensor) and not rows.is_floating_point():
            return self.unet(x_model, timesteps, class_labels=rows, return_dict=False, **cond)
        # float rows: the embedding table as a linear map (one-hot row -> that class exactly, zero row -> 0)
        weight_rows = rows

        def hook(module, inputs, output):
            return weight_rows.to(module.weight.dtype) @ module.weight

        handle = emb.register_forward_hook(hook)
        try:
            dummy = torch.zeros(batch, dtype=torch.long, device=x_model.device)
            return self.unet(x_model, timesteps, class_labels=dummy, return_dict=False, **cond)
        finally:
            handle.remove()

    def _has_class_input(self) -> bool:
        """A class input other than an index table (class_embed_type "timestep", "identity", ...)."""
        config = getattr(self.unet, "config", {}) or {}
        return config.get("class_embed_type") is not None

    def _label_rows(self, class_labels, batch, device):
        """Integer indices (checked) or float rows (batch, num_classes) for the class embedding."""
        k = self.num_classes
        if class_labels is None:
            if self.null_class_label is None:
                raise ValueError(f"this model is class-conditional ({k} classes): pass class_labels "
                                 "(indices or one-hot rows; an all-zero row is unconditional)")
            return torch.full((batch,), self.null_class_label, dtype=torch.long, device=device)
        labels = torch.as_tensor(class_labels, device=device)
        if not labels.is_floating_point():
            labels = labels.reshape(-1)
            if labels.numel() == 1 and batch > 1:
                labels = labels.expand(batch)
            if labels.shape[0] != batch:
                raise ValueError(f"class_labels must have {batch} entries (one per sample), got {tuple(labels.shape)}")
            bad = (labels < 0) | (labels >= k)
            if bool(bad.any()):
                raise ValueError(f"class label {int(labels[bad][0])} is out of range: this model has {k} classes "
                                 f"(0 .. {k - 1})")
            return labels.long()
        if labels.ndim == 1 and labels.shape[0] == k:
            labels = labels[None]
        if labels.ndim != 2 or labels.shape[1] != k or labels.shape[0] not in (1, batch):
            raise ValueError(f"float class_labels must be one-hot rows of shape ({batch}, {k}), got {tuple(labels.shape)}")
        labels = labels.expand(batch, k)
        if self.null_class_label is not None:
            zero = (labels == 0).all(dim=1)
            null = torch.zeros_like(labels)
            null[:, self.null_class_label] = 1
            labels = torch.where(zero[:, None], null, labels)
        return labels

    def __repr__(self) -> str:
        return (f"DiffusersDenoiser({type(self.unet).__name__}, prediction_type={self.prediction_type!r}, "
                f"T={self.num_train_timesteps}, sigma=[{self.sigma_min:.4g}, {self.sigma_max:.4g}], shape={self.shape}, "
                f"num_classes={self.num_classes})")


def discrete_schedule(denoiser) -> Dict[str, Any]:
    """``dict(sigma_fn=..., sigma_inv=...)`` for :func:`diffsampler.schedules.discrete`: a grid on the
    model's own integer training timesteps, e.g.
    ``sample(den, noise, nfe=10, schedule="discrete", schedule_options=discrete_schedule(den))``."""
    table = denoiser.table if isinstance(denoiser, DiffusersDenoiser) else None
    if table is None:
        raise TypeError(f"discrete_schedule needs a DiffusersDenoiser (a model with a discrete sigma table), "
                        f"got {type(denoiser).__name__}")
    return {"sigma_fn": table.t_to_sigma, "sigma_inv": table.sigma_to_t}


def _shape_from_config(config) -> Optional[Tuple[int, ...]]:
    size = config.get("sample_size")
    channels = config.get("in_channels")
    if size is None or channels is None:
        return None
    if isinstance(size, (list, tuple)):
        return (int(channels), int(size[0]), int(size[1]))
    return (int(channels), int(size), int(size))


def _class_embedding_table(unet):
    """The UNet's class-embedding table (config ``num_class_embeds`` with no ``class_embed_type``), or None."""
    config = getattr(unet, "config", {}) or {}
    if config.get("num_class_embeds") is None or config.get("class_embed_type") is not None:
        return None
    emb = unet.class_embedding
    if not isinstance(emb, torch.nn.Embedding):
        raise TypeError(f"{type(unet).__name__}.class_embedding is {type(emb).__name__}, expected an embedding table")
    return emb


def dtype_keyword() -> str:
    """The name diffusers' ``from_pretrained`` takes the weights' dtype under: ``dtype`` in the
    releases that deprecate ``torch_dtype`` (they warn on every load with the old name), else
    ``torch_dtype``."""
    try:
        from diffusers.utils import deprecation_utils
    except ImportError:
        return "torch_dtype"
    return "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"


def _class_name(config_file: Path, default: str) -> str:
    try:
        return json.loads(config_file.read_text()).get("_class_name", default)
    except (OSError, json.JSONDecodeError):
        return default
