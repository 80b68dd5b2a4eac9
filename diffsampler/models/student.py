"""Students: denoisers distilled to sample in a few steps (SFD / SFD-v, made by :mod:`diffsampler.distill`).

A student is a fine-tuned copy of a model (its network trained so that Euler on a short grid lands
where a teacher solver lands) together with the plans it was trained for: at each NFE it supports,
the solver (``euler``), the grid, AFS and the model inputs of every call.  It is an ordinary
:class:`~diffsampler.models.base.Denoiser` that declares those plans (``native_plans``): ``sample``
and the CLI use them when the request names no solver or grid, and refuse an NFE it was not trained
for, listing the ones it was.

**Step count (SFD-v).**  A student trained for several NFEs takes one more input, ``step_count``
(the number of Euler steps of the grid; a model input of its native plans, so it reaches every
model call).  Two ways to feed it to the network:

* ``"native"``: the bundled U-Net's own step embedding (``UNetConfig.step_embedding``,
  :meth:`UNet.add_step_embedding`), added to its noise embedding;
* ``"hook"``: any other torch network: a :class:`StepEmbedding` whose output a forward hook adds
  to the output of the network's time-embedding module (``step_module``, e.g. ``time_embedding``
  of a diffusers ``UNet2DModel``, ``map_layer1`` of an EDM ``SongUNet``).

Both start with a zero last layer, so a fresh student computes exactly what its teacher computes.
Called without ``step_count`` (sampled like an ordinary model, with a named solver), a
step-conditioned student uses the largest step count it was trained for.  The current step count
is held by the student during one call, so one student object serves one thread at a time.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn

from .base import Denoiser, DenoiserWrapper
from .unet import NoiseEmbedding, UNet

STEP_INPUT = "step_count"      # the model input of a step-conditioned student's native plans
STEP_INPUTS = ("native", "hook")


class StepEmbedding(nn.Module):
    """``step_count (B,) -> (B, dim)``: positional features through a two-layer MLP whose last
    layer starts at zero (added to a network's time embedding by a hook)."""

    def __init__(self, dim: int, features: int = 64):
        super().__init__()
        self.dim, self.num_features = int(dim), int(features)
        self.features = NoiseEmbedding(self.num_features, "positional")
        self.mlp = nn.Sequential(nn.Linear(self.num_features, self.dim), nn.SiLU(), nn.Linear(self.dim, self.dim))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, steps: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.features(steps).to(self.mlp[0].weight.dtype))


class StudentDenoiser(DenoiserWrapper):
    """A distilled model: ``inner`` (a denoiser whose network was fine-tuned) and its native plans.

    ``plans``: NFE -> ``dict(solver=, sigmas=, afs=, model_inputs=)`` (see ``Denoiser.native_plans``).
    ``step_input``: None (one NFE, no step input), ``"native"`` or ``"hook"`` (module docstring);
    ``step_module``/``step_embedding``: the hooked module's name and the embedding (``"hook"``).
    ``info``: how it was made (what its config.json records)."""

    def __init__(self, inner: Denoiser, plans: Mapping[int, Mapping[str, Any]], *, step_input: Optional[str] = None,
                 step_module: Optional[str] = None, step_embedding: Optional[StepEmbedding] = None,
                 info: Optional[dict] = None):
        super().__init__(inner)
        if not isinstance(inner, Denoiser) or inner.network is None:
            raise ValueError("a student is a fine-tuned network: its model must be a Denoiser around a torch module")
        if not plans:
            raise ValueError("a student needs at least one native plan")
        if step_input not in (None, *STEP_INPUTS):
            raise ValueError(f"step_input must be None, 'native' or 'hook', got {step_input!r}")
        if step_input is None and len(plans) > 1:
            raise ValueError("a student for several NFEs needs a step-count input (step_input='native' or 'hook')")
        self.plans = {int(k): copy.deepcopy(dict(v)) for k, v in plans.items()}
        self.step_input, self.step_module, self.step_embedding = step_input, step_module, step_embedding
        self.info = dict(info or {})
        self._steps: Optional[torch.Tensor] = None
        counts = [int(p.get("model_inputs", {}).get(STEP_INPUT, 0)) for p in self.plans.values()]
        self.default_steps = max(counts) if step_input is not None else None
        net = inner.network
        if step_input == "native":
            net.register_forward_pre_hook(self._inject_steps, with_kwargs=True)
        elif step_input == "hook":
            if step_embedding is None or step_module is None:
                raise ValueError("step_input='hook' needs step_module (a module name) and step_embedding")
            target = dict(net.named_modules()).get(step_module)
            if target is None:
                raise ValueError(f"the network has no module named {step_module!r}")
            target.register_forward_hook(self._add_steps)

    # --- the step-count input ----------------------------------------------------------------------
    def _inject_steps(self, module, args, kwargs):
        if self._steps is not None:
            kwargs = {**kwargs, STEP_INPUT: self._steps}
        return args, kwargs

    def _add_steps(self, module, args, output):
        if self._steps is None:
            return output
        return output + self.step_embedding(self._steps.to(output.device)).to(output.dtype)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, step_count=None, **cond) -> torch.Tensor:
        if self.step_input is None:
            if step_count is not None:
                raise ValueError("this student was distilled for one NFE and takes no step_count")
            return self.inner(x, sigma, **cond)
        steps = self.default_steps if step_count is None else step_count
        self._steps = torch.as_tensor(steps, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        try:
            return self.inner(x, sigma, **cond)
        finally:
            self._steps = None

    # --- what it declares ---------------------------------------------------------------------------
    def native_plans(self) -> Dict[int, dict]:
        return copy.deepcopy(self.plans)

    @property
    def nfes(self) -> List[int]:
        return sorted(self.plans)

    def modules(self) -> List[nn.Module]:
        """The trained modules: the network, and the step embedding of a hooked student."""
        return [self.inner.network] + ([self.step_embedding] if self.step_embedding is not None else [])

    def parameters(self):
        for module in self.modules():
            yield from module.parameters()

    def identity_tensors(self) -> List[torch.Tensor]:
        return [p.detach() for p in self.parameters()]

    def state(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """The trained weights: ``{"network": ..., "step_embedding": ...}`` state dicts."""
        out = {"network": self.inner.network.state_dict()}
        if self.step_embedding is not None:
            out["step_embedding"] = self.step_embedding.state_dict()
        return out

    def load_state(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        self.inner.network.load_state_dict(state["network"])
        if self.step_embedding is not None:
            self.step_embedding.load_state_dict(state["step_embedding"])

    def train(self, mode: bool = True):
        for module in self.modules():
            module.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def requires_grad_(self, flag: bool = True):
        for module in self.modules():
            module.requires_grad_(flag)
        return self

    def to(self, *args, **kwargs):
        self.inner.to(*args, **kwargs)
        if self.step_embedding is not None:
            self.step_embedding.to(*args, **kwargs)
        return self

    def __repr__(self) -> str:
        return f"StudentDenoiser(NFE {self.nfes}, step input {self.step_input}, {self.inner!r})"


def step_plans(plans: Mapping[int, Mapping[str, Any]]) -> Dict[int, dict]:
    """``plans`` with each NFE's step count (its number of steps) as the ``step_count`` model input."""
    return {int(k): {**dict(v), "model_inputs": {**dict(v.get("model_inputs", {})), STEP_INPUT: len(v["sigmas"]) - 1}}
            for k, v in plans.items()}


def make_student(teacher: Denoiser, plans: Mapping[int, Mapping[str, Any]], *, step_module: Optional[str] = None,
                 info: Optional[dict] = None) -> StudentDenoiser:
    """A fresh student of ``teacher`` (a deep copy: the teacher is never changed) for ``plans``.

    One plan: no step input.  Several: the bundled U-Net gains its step embedding; another network
    needs ``step_module``, the name of its time-embedding module, whose output a hook extends."""
    if not isinstance(teacher, Denoiser) or teacher.network is None:
        raise ValueError("distillation fine-tunes the model's network: the model must be a Denoiser around a torch "
                         "module (the bundled U-Net, an EDM snapshot, a diffusers UNet), not an analytic model")
    inner = copy.deepcopy(teacher)
    net = inner.network
    if len(plans) == 1:
        return StudentDenoiser(inner, plans, info=info)
    plans = step_plans(plans)
    if isinstance(net, UNet) and step_module is None:
        net.add_step_embedding()
        return StudentDenoiser(inner, plans, step_input="native", info=info)
    if step_module is None:
        raise ValueError("a student for several NFEs (SFD-v) needs a step-count input: the bundled U-Net has one; for "
                         "another network name its time-embedding module (step_module=, --step-module; e.g. "
                         "'time_embedding' of a diffusers UNet2DModel, 'map_layer1' of an EDM network), or distil "
                         "one NFE")
    dim = _module_output_dim(inner, step_module)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        embedding = StepEmbedding(dim)
    param = next(net.parameters())
    embedding.to(device=param.device, dtype=param.dtype)
    return StudentDenoiser(inner, plans, step_input="hook", step_module=step_module, step_embedding=embedding,
                           info=info)


def _module_output_dim(denoiser: Denoiser, name: str) -> int:
    """The last dimension of module ``name``'s output, from one call of the model on zeros."""
    modules = dict(denoiser.network.named_modules())
    if name not in modules:
        raise ValueError(f"the network has no module named {name!r}; its top-level modules: "
                         f"{', '.join(n for n, _ in denoiser.network.named_children())}")
    seen = []
    handle = modules[name].register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
    param = next(denoiser.network.parameters())
    try:
        with torch.no_grad():
            denoiser(torch.zeros(1, *denoiser.shape, device=param.device),
                     torch.ones(1, device=param.device, dtype=param.dtype))
    finally:
        handle.remove()
    if not seen:
        raise ValueError(f"module {name!r} is not called when the model runs")
    return int(seen[0][-1])


def student_from_config(inner: Denoiser, distilled: Mapping[str, Any],
                        step_embedding_state: Optional[Mapping[str, torch.Tensor]] = None) -> StudentDenoiser:
    """Rebuild a student around ``inner`` (its weights already loaded) from the ``distilled`` block
    of its config.json (:mod:`diffsampler.distill.files` writes it)."""
    plans = {int(k): v for k, v in distilled["native_plans"].items()}
    step_input = distilled.get("step_input")
    embedding = None
    if step_input == "hook":
        embedding = StepEmbedding(int(distilled["step_embedding_dim"]))
        if step_embedding_state is None:
            raise ValueError("this student's step embedding weights are missing")
        embedding.load_state_dict(dict(step_embedding_state))
        param = next(inner.network.parameters())
        embedding.to(device=param.device, dtype=param.dtype).requires_grad_(False).eval()
    return StudentDenoiser(inner, plans, step_input=step_input, step_module=distilled.get("step_module"),
                           step_embedding=embedding, info=dict(distilled))
