"""AMED's predictor: a tiny network from (bottleneck feature, sigma_i, sigma_next) to (r, s_dir, s_time).

Input: the pooled feature of the evaluation at ``sigma_i`` (see :mod:`diffsampler.models.features`),
compressed as ``sign(f) log(1 + |f|)`` so any activation scale trains, and ``log(sigma) / 4`` of
both times.  A two-hidden-layer SiLU MLP with a zero-initialised output layer gives three numbers
``o``; ``r = sigmoid(o_0)`` (so an untrained predictor is the midpoint, r = 0.5) and
``s = 1 + c tanh(o_k)`` for the scales (``c = 0`` disables one).  The file written by
:meth:`Predictor.save` holds the weights and every setting sampling needs (solver, grid, AFS,
model identity), so ``diffsampler sample --amed FILE`` needs nothing else.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..fileio import write_atomic
from ..models.base import Denoiser, sigma_range
from ..solvers import get_solver

FORMAT = "diffsampler-amed/1"


def _log_sigma(sigma, batch: int, device) -> torch.Tensor:
    """log(sigma) / 4 as a (batch,) float32 input, from a float or a per-sample tensor."""
    value = (torch.as_tensor(sigma, dtype=torch.float64).detach().log() / 4).to(device=device, dtype=torch.float32)
    value = value.reshape(-1)
    return value.expand(batch) if value.numel() == 1 else value.reshape(batch)


class Predictor(nn.Module):
    def __init__(self, feature_dim: int, feature_source: str, hidden: int = 64, scale_dir: float = 0.0,
                 scale_time: float = 0.0, settings: Optional[Dict[str, Any]] = None):
        super().__init__()
        for name, c in (("scale_dir", scale_dir), ("scale_time", scale_time)):
            if not 0 <= c < 1:
                raise ValueError(f"{name} must lie in [0, 1) (scales are bounded in [1 - c, 1 + c]), got {c}")
        self.feature_dim, self.feature_source, self.hidden = int(feature_dim), feature_source, int(hidden)
        self.scale_dir, self.scale_time = float(scale_dir), float(scale_time)
        self.settings: Dict[str, Any] = dict(settings or {})
        self.net = nn.Sequential(nn.Linear(self.feature_dim + 2, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 3))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, features: torch.Tensor, sigma, sigma_next) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(r, s_dir, s_time), each of shape (batch,)."""
        batch, device = features.shape[0], self.net[0].weight.device
        features = features.to(device=device, dtype=torch.float32)
        inputs = torch.cat([features.sign() * features.abs().log1p(),
                            _log_sigma(sigma, batch, device)[:, None],
                            _log_sigma(sigma_next, batch, device)[:, None]], dim=1)
        out = self.net(inputs)
        r = torch.sigmoid(out[:, 0])
        return r, 1 + self.scale_dir * torch.tanh(out[:, 1]), 1 + self.scale_time * torch.tanh(out[:, 2])

    # --- the settings it was trained with ------------------------------------------------------

    @property
    def sigmas(self) -> Tuple[float, ...]:
        return tuple(float(s) for s in self.settings["sigmas"])

    @property
    def afs(self) -> bool:
        return bool(self.settings.get("afs", False))

    def solver(self):
        """The AMED solver (AMED-Solver or AMED-Plugin on the trained base) using this predictor."""
        base = self.settings.get("solver", "amed")
        return get_solver("amed", base=None if base == "amed" else base, predictor=self,
                          plain_first=bool(self.settings.get("plain_first", False)))

    def check_model(self, denoiser, sample_shape: Sequence[int]) -> None:
        """Refuse a model other than the one the predictor was trained for."""
        made_for = self.settings.get("shape")
        if made_for is not None and tuple(made_for) != tuple(sample_shape):
            raise ValueError(f"this AMED predictor was trained for samples of shape {tuple(made_for)}, not "
                             f"{tuple(sample_shape)}: train one for this model (diffsampler amed train ...)")
        trained_scale, scale = float(self.settings.get("guidance", 1.0)), guidance_scale(denoiser)
        if trained_scale != scale:
            raise ValueError(f"this AMED predictor was trained with guidance {trained_scale:g}, not {scale:g}: "
                             f"sample with --guidance {trained_scale:g} (its features and trajectories depend on it)")
        fingerprint = self.settings.get("model_fingerprint")
        if fingerprint is not None and fingerprint != model_fingerprint(denoiser):
            raise ValueError(f"this AMED predictor was trained for another model ({self.settings.get('model') or 'unnamed'}"
                             f", fingerprint {fingerprint}); the given model's fingerprint is "
                             f"{model_fingerprint(denoiser)}: train one for this model (diffsampler amed train ...)")

    def sampling_request(self, denoiser, sample_shape, solver=None, nfe=None, schedule=None, sigmas=None, afs=None):
        """(solver, sigmas, afs) for ``sample(amed=self)``; a conflicting request is refused."""
        self.check_model(denoiser, sample_shape)
        trained = self.settings
        if solver is not None and solver not in ("amed", trained.get("solver")):
            raise ValueError(f"this AMED predictor was trained for solver {trained.get('solver')!r}, not {solver!r}")
        if nfe is not None and nfe != trained.get("nfe"):
            raise ValueError(f"this AMED predictor was trained for NFE {trained.get('nfe')}, not {nfe}: "
                             "train one for that NFE (diffsampler amed train --nfe ...)")
        if schedule is not None or sigmas is not None:
            raise ValueError("an AMED predictor brings its own grid (the one it was trained on); "
                             "leave schedule/sigmas out, or train on the schedule you want (--schedule FILE)")
        if afs is not None and bool(afs) != self.afs:
            raise ValueError(f"this AMED predictor was trained {'with' if self.afs else 'without'} AFS; "
                             f"sample {'with' if self.afs else 'without'} it")
        return self.solver(), self.sigmas, self.afs

    # --- files ---------------------------------------------------------------------------------

    def save(self, path: Union[str, Path]) -> Path:
        """Write weights and settings (atomic); readable with :func:`load` (no pickle: weights_only)."""
        buffer = io.BytesIO()
        config = {"feature_dim": self.feature_dim, "feature_source": self.feature_source, "hidden": self.hidden,
                  "scale_dir": self.scale_dir, "scale_time": self.scale_time}
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        torch.save({"format": FORMAT, "config": config, "settings": self.settings, "state_dict": state}, buffer)
        write_atomic(path, buffer.getvalue())
        return Path(path)


def load(path: Union[str, Path], device="cpu") -> Predictor:
    """A predictor written by :meth:`Predictor.save`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no AMED predictor file at {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (a torch.save file or not: say which file)
        raise ValueError(f"{path} is not an AMED predictor file (torch.load failed: {err})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path} is not an AMED predictor file (expected format {FORMAT!r})")
    predictor = Predictor(settings=blob["settings"], **blob["config"])
    predictor.load_state_dict(blob["state_dict"])
    return predictor.to(device).eval()


def model_fingerprint(denoiser) -> Optional[str]:
    """A short digest of a model's parameters (or of a Gaussian mixture's means), None if it has none."""
    tensors = []
    if hasattr(denoiser, "parameters") and callable(denoiser.parameters):
        tensors = [p.detach() for p in denoiser.parameters()]
    elif isinstance(getattr(denoiser, "means", None), torch.Tensor):
        tensors = [denoiser.means, denoiser.stds]
    elif hasattr(denoiser, "inner"):
        return model_fingerprint(denoiser.inner)
    if not tensors:
        return None
    count = sum(t.numel() for t in tensors)
    total = sum(float(t.double().sum()) for t in tensors)
    squares = sum(float(t.double().pow(2).sum()) for t in tensors)
    lo, hi = sigma_range(denoiser) if isinstance(denoiser, Denoiser) else (None, None)
    return f"{count}:{total:.6e}:{squares:.6e}:{lo}:{hi}"


def guidance_scale(denoiser) -> float:
    """The classifier-free guidance scale a denoiser applies (1 for an unguided model)."""
    from ..models.guidance import ClassifierFreeGuidance
    return float(denoiser.scale) if isinstance(denoiser, ClassifierFreeGuidance) else 1.0
