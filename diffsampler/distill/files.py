"""Students on disk, like the bundled model: ``config.json`` + ``model.safetensors`` + ``CARD.md``.

* A student of a model in the bundled format (an EDM-preconditioned :class:`~diffsampler.models.unet.UNet`,
  e.g. ``fashion-mnist``) is a bundled model folder: the U-Net config (with its step embedding),
  the preconditioning, the teacher's record, and a ``"distilled"`` block (native plans per NFE,
  step input, how it was distilled, validation).  ``load_model(DIR)``, ``--model DIR`` and, under
  ``checkpoints/``, ``--model NAME`` load it (:func:`diffsampler.models.bundled.load_bundled`).
* A student of any other network (a diffusers UNet, an EDM snapshot) is ``"architecture":
  "student"``: the base model's spec, the fine-tuned weights (``network.*``) and the step embedding
  (``step_embedding.*``); loading loads the base model by its spec and replaces its weights.

Weights are stored in float16 by default; :func:`save` measures what that changes (RMSE of the
samples of a few held-out seeds at every NFE, float16 weights against the float32 ones) and
records it.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..fileio import write_atomic
from ..machine import describe
from ..loop import run_plan
from ..models.bundled import CONFIG_FILE, WEIGHTS_FILE, bundled_config, write_bundled
from ..models.student import StudentDenoiser
from ..plan import make_plan
from ..seeds import seed_noise

CARD_FILE = "CARD.md"
STUDENT_FORMAT = "diffsampler-student"
CHECK_SEEDS = range(2_100_000, 2_100_032)      # held out (VAL_SEEDS + 100,000): float16 check


def save(student: StudentDenoiser, folder, *, command: Optional[str] = None, model_spec: Optional[str] = None,
         weights_dtype: str = "float16", cond=None) -> dict:
    """Write ``student`` to ``folder`` (config, weights, card); returns the written config.

    ``command`` is recorded in the card (the exact command that made it); ``model_spec`` is the
    spec the teacher was loaded with (needed for students of non-bundled models); ``cond`` gives
    the conditioning of the float16 check's seeds (default: a random class per seed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    info = {**student.info, "native_plans": {str(k): v for k, v in student.native_plans().items()},
            "step_input": student.step_input, "step_module": student.step_module, "command": command,
            "machine": describe(gpu=True)}
    if student.step_embedding is not None:
        info["step_embedding_dim"] = student.step_embedding.dim
    info["weights_effect"] = _dtype_effect(student, weights_dtype, cond)
    base = bundled_config(student.inner)
    if base is not None:
        config = write_bundled(student.inner.network, folder, {**base, "distilled": info}, weights_dtype)
    else:
        if model_spec is None:
            raise ValueError("saving a student of a model that is not in the bundled format needs model_spec= (the "
                             "spec its teacher was loaded with, e.g. diffusers:DIR)")
        config = _write_generic(student, folder, info, model_spec, weights_dtype)
    write_atomic(folder / CARD_FILE, card(folder.name, config).encode())
    return config


def load(folder, device="cpu", trust_pickle: bool = False) -> StudentDenoiser:
    """The student saved in ``folder`` (any model folder loads the same way: ``load_model(DIR)``)."""
    from ..models.specs import load_folder
    student = load_folder(folder, trust_pickle=trust_pickle)
    if not isinstance(student, StudentDenoiser):
        raise ValueError(f"{folder} holds a model, not a distilled student")
    return student.to(device) if str(device) != "cpu" else student


def _write_generic(student: StudentDenoiser, folder: Path, info: dict, model_spec: str, weights_dtype: str) -> dict:
    from safetensors.torch import save as st_save
    dtypes = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
    state = student.state()
    tensors = {f"{part}.{k}": v.detach().to("cpu", dtypes[weights_dtype]).contiguous()
               for part, sd in state.items() for k, v in sd.items()}
    blob = st_save(tensors, metadata={"format": STUDENT_FORMAT})
    write_atomic(folder / WEIGHTS_FILE, blob)
    config = {"format": STUDENT_FORMAT, "version": 1, "architecture": "student", "base_model": model_spec,
              "shape": list(student.shape), "sigma_min": student.sigma_min, "sigma_max": student.sigma_max,
              "num_classes": student.num_classes, "distilled": info, "weights_dtype": weights_dtype,
              "weights_sha256": hashlib.sha256(blob).hexdigest()}
    write_atomic(folder / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
    return config


def _dtype_effect(student: StudentDenoiser, weights_dtype: str, cond, seeds: Sequence[int] = CHECK_SEEDS) -> dict:
    """Per NFE, the RMSE between samples with the weights rounded to ``weights_dtype`` and the
    float32 weights (and their mean RMSE to 0, for scale), on a few held-out seeds."""
    if weights_dtype == "float32":
        return {"dtype": "float32", "seeds": [seeds[0], seeds[-1]], "rmse": {}}
    dtypes = {"float16": torch.float16, "bfloat16": torch.bfloat16}
    rounded = copy.deepcopy(student)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(dtypes[weights_dtype]).to(p.dtype))
    seeds = list(seeds)
    param = next(student.parameters())
    noise = seed_noise(seeds, student.shape, dtype=torch.float32, device=param.device)
    if cond is None and student.num_classes:
        from .train import random_class_cond
        cond = random_class_cond(student.num_classes)
    batch_cond = cond(seeds) if cond is not None else None
    out = {}
    for k in student.nfes:
        plan = make_plan(model=student, nfe=k)
        a = run_plan(plan, student, noise, cond=batch_cond).samples.double()
        b = run_plan(plan, rounded, noise, cond=batch_cond).samples.double()
        out[str(k)] = float((a - b).flatten(1).pow(2).mean(1).sqrt().mean())
    return {"dtype": weights_dtype, "seeds": [seeds[0], seeds[-1]], "rmse": out}


def _labels(record) -> str:
    if isinstance(record, dict):
        return record.get("labels") or "none"
    return record or "none"


def card(name: str, config: dict) -> str:
    """CARD.md of a student: how to use it, how it was made (the exact command, time, machine) and
    what was measured while making it."""
    d = config["distilled"]
    nfes = sorted(int(k) for k in d["native_plans"])
    method = "SFD-v" if len(nfes) > 1 else "SFD"
    nfe_text = ", ".join(map(str, nfes))
    teacher = d.get("teacher") or {}
    teacher_text = ", ".join(f"{k}={v}" for k, v in teacher.items() if k != "name")
    lines = [
        f"# {name}: {method} student of `{d.get('model') or 'its teacher'}` (NFE {nfe_text})", "",
        f"A copy of the model's network fine-tuned by Simple and Fast Distillation (Zhou, Chen et al., NeurIPS "
        f"2024) so that Euler with the analytical first step on a short polynomial grid lands where the teacher "
        f"solver lands. It samples with its own grid at NFE {nfe_text} and refuses other NFEs (name a solver to "
        "sample it like an ordinary model).", "",
        "```bash",
        f"diffsampler sample --model {name} --nfe {nfes[0]} --seeds 0-63 --outdir out/",
        "```", "",
        "```python",
        "from diffsampler import load_model, sample",
        f"student = load_model({name!r})       # or the folder's path",
        f"result = sample(student, noise, nfe={nfes[0]}, cond=labels)   # result.nfe == {nfes[0]}",
        "```", "",
        "## How it was made", "",
        "```bash", d.get("command") or "(from Python: diffsampler.distill(...))", "```", "",
        f"- Teacher: the original model with `{teacher.get('name', '?')}` ({teacher_text}) on the student's grid "
        f"with M = {d['M']} extra points in every interval ({d['schedule']} "
        f"{', '.join(f'{k}={v}' for k, v in d['schedule_options'].items())}; teacher steps "
        f"{', '.join(f'{v} at NFE {k}' for k, v in d['teacher_steps'].items())}), no gradients.",
        "- Student: Euler, " + ("AFS (the first step is closed form, no model call, nothing learned), " if d["afs"]
                                else "") +
        "each step from its own previous output; L1 loss to the teacher's state at every student time, one Adam "
        f"update per step; lr {d['lr']:g}, divided by {1 / d['lr_drop']:g} after {d['lr_drop_at']:.0%} of the "
        f"iterations; {d['iters']} iterations of batch {d['batch']} (training seeds {d['first_seed']}.., fresh "
        f"noise every iteration, class labels: {_labels(d.get('conditioning'))}).",
        f"- Step input: {d.get('step_input') or 'none (one NFE)'}"
        + (" (a step-count embedding, zero-initialised, added to the noise embedding)" if d.get("step_input") ==
           "native" else f" (module {d.get('step_module')})" if d.get("step_input") == "hook" else ""),
        f"- Time: **{d['train_seconds'] / 60:.1f} min** of distillation on {d.get('processes', 1)} process(es) x "
        f"{d.get('threads', '?')} thread(s), device {d.get('device', 'cpu')}: {d.get('machine', '?')}.",
        f"- Best validated iteration: {d.get('best_iteration')} of {d['iters']}.", "",
        "## Native plans", "",
        "| NFE | steps | sigmas | step_count |", "|---|---|---|---|",
    ]
    for k in nfes:
        plan = d["native_plans"][str(k)]
        lines.append(f"| {k} | {len(plan['sigmas']) - 1} | {', '.join(f'{s:.4g}' for s in plan['sigmas'])} | "
                     f"{plan.get('model_inputs', {}).get('step_count', '-')} |")
    history = d.get("validation") or []
    if history:
        first, best = history[0], min(history, key=lambda h: h[1])
        lines += ["", "## Measured while distilling", "",
                  f"Endpoint RMSE to the teacher on {d['val_images']} held-out seeds ({d['val_seed']}..), per NFE:",
                  "", "| NFE | before (Euler + AFS with the teacher's network) | distilled (iteration "
                  f"{best[0]}) |", "|---|---|---|"]
        lines += [f"| {k} | {first[2][str(k)]:.4f} | {best[2][str(k)]:.4f} |" for k in nfes]
    effect = d.get("weights_effect") or {}
    if effect.get("rmse"):
        lines += ["", f"Weights stored as {effect['dtype']}: sample RMSE against the float32 weights on seeds "
                  f"{effect['seeds'][0]}-{effect['seeds'][1]}: "
                  + ", ".join(f"{v:.1e} at NFE {k}" for k, v in effect["rmse"].items()) + "."]
    lines += ["", "## Files", "",
              f"- `{WEIGHTS_FILE}`: the student's weights ({config.get('weights_dtype')}; SHA-256 in config.json, "
              "checked on load).",
              f"- `{CONFIG_FILE}`: architecture, preconditioning, sigma range, the native plans and everything about "
              "the distillation (`distilled`: settings, losses, validation history, machine).", ""]
    return "\n".join(lines)
