"""Train a class-conditional, preconditioned U-Net denoiser on a small image dataset.

Example (the bundled Fashion-MNIST model; see ``checkpoints/fashion-mnist/CARD.md``)::

    diffsampler train model --dataset fashion-mnist --steps 3600 --batch 128 \
        --out checkpoints/fashion-mnist --minutes 70

Training objective (EDM, Karras et al. 2022): draw ``ln(sigma) ~ N(P_mean, P_std^2)``
(``P_mean = -1.2``, ``P_std = 1.2``), noise the data ``x = x0 + sigma * n`` and minimise
``lambda(sigma) * |D(x, sigma, labels) - x0|^2`` with ``lambda(sigma) = 1 / c_out(sigma)^2``,
which for EDM preconditioning is ``(sigma^2 + sigma_data^2) / (sigma * sigma_data)^2``.
For the VE and VP families the noise-level distributions of their papers are used instead
(log-uniform sigma in [0.02, 100], resp. uniform t in [1e-5, 1]).

Features: Adam with a linear learning-rate warm-up, an exponential moving average (EMA) of the
weights (what gets exported), label dropout (a row of zeros = "unconditional", so classifier-free
guidance works), optional horizontal flips, a deterministic seed, ``torch.set_num_threads``
(default 1), periodic atomic checkpoints (``train_state.pt``, written to a temporary file and
moved into place with ``os.replace``) with automatic resume, and a wall-clock budget
(``--minutes``) after which the run stops cleanly and exports what it has.

Under torchrun (``torchrun --nproc_per_node N -m diffsampler train model ...``; gloo on CPU, nccl
with ``--device cuda``) the run is data parallel with DistributedDataParallel: every process draws
the whole batch from the shared seed, trains on its 1/N share, and the gradients are averaged, so
the run is the one-process run up to floating-point rounding and resumes on any number of
processes.  Rank 0 writes the checkpoints.

Outputs in ``--out``: ``model.safetensors`` (EMA weights, float16 by default), ``config.json``
(architecture and everything needed to rebuild the denoiser) and, while training is incomplete,
``train_state.pt`` (removed when the requested number of steps is reached unless
``--keep-state``).

A folder is only ever continued with the settings that started it: resuming with a different
learning rate, batch, recipe or architecture, or rerunning a finished run with other settings, is
refused with the list of differences (``--no-resume`` starts over; another ``--out`` keeps both).
Rerunning a finished run with its own settings does nothing.  Only where the run writes, its
device and threads, its wall-clock budget and its reporting and export options may change; so may
``--steps`` of an unfinished run with a constant learning rate (the same run, trained longer).

The EMA decay ramps up as ``min(ema_decay, (1 + step) / (10 + step))``, which reaches 0.999 at
step 8,990 and 0.9995 at step 17,990; a shorter run never uses the ``--ema-decay`` it asks for
(the run says so when it starts).

Fine-tuning (``--init-from FOLDER``): the run starts from the exported weights of a model folder
this trainer wrote (same architecture and preconditioning), with a fresh optimizer, its own
learning-rate schedule over its own ``--steps``, and the EMA starting at those weights with the
full ``--ema-decay`` from the first step (the warm-up exists to forget a random initialisation;
here the starting point is a trained model).  The starting weights' SHA-256 is part of the run's
settings, so a folder is not continued from other starting weights.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..datasets import DATASETS, FASHION_MNIST_CLASSES, load_dataset
from ..distributed import all_reduce_mean, barrier, join_process_group, rank_and_world
from ..fileio import save_torch_atomic, write_atomic
from ..machine import describe
from ..models.edm import EDMDenoiser, VPPrecond, loss_weight
from ..models.unet import UNet, UNetConfig, count_parameters

STATE_FILE = "train_state.pt"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "diffsampler-edm-unet"


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved in the checkpoint and in config.json)."""

    dataset: str = "fashion-mnist"
    out: str = "checkpoints/fashion-mnist"
    steps: int = 1000
    batch: int = 128
    lr: float = 1e-3
    warmup_steps: int = 200
    lr_schedule: str = "constant"    # or "cosine": decays to lr * lr_min_ratio at the last step
    lr_min_ratio: float = 0.1
    adam_betas: Tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 0.0           # 0 = off
    ema_decay: float = 0.999
    label_dropout: float = 0.1
    hflip: bool = False
    precond: str = "edm"
    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    seed: int = 0
    threads: int = 1
    device: str = "cpu"              # random draws stay on the CPU, so a run is the same on any device
    minutes: Optional[float] = None  # wall-clock budget of this invocation
    save_every: int = 250
    log_every: int = 50
    resume: bool = True
    keep_state: bool = False
    channels_last: bool = True
    export_dtype: str = "float16"
    limit: Optional[int] = None      # use only the first `limit` training examples
    init_from: Optional[str] = None  # fine-tune: start from this model folder's weights
    init_weights_sha256: Optional[str] = None   # filled in from init_from's weights file
    # architecture
    base_channels: int = 16
    channel_mult: Tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 1
    attention_mid: bool = True
    dropout: float = 0.0
    groups: int = 8

    def unet_config(self, image_size: int, in_channels: int, num_classes: int) -> UNetConfig:
        return UNetConfig(
            image_size=image_size,
            in_channels=in_channels,
            out_channels=in_channels,
            base_channels=self.base_channels,
            channel_mult=tuple(self.channel_mult),
            num_res_blocks=self.num_res_blocks,
            attention_mid=self.attention_mid,
            num_classes=num_classes,
            dropout=self.dropout,
            groups=self.groups,
            noise_embedding="positional" if self.precond == "vp" else "fourier",
        )


# --------------------------------------------------------------------------------------------
# loss
# --------------------------------------------------------------------------------------------
def sample_sigma(cfg: TrainConfig, n: int, generator: torch.Generator) -> torch.Tensor:
    """Training noise levels for the configured preconditioning family."""
    if cfg.precond == "edm":
        return (cfg.p_mean + cfg.p_std * torch.randn(n, generator=generator)).exp()
    if cfg.precond == "ve":
        u = torch.rand(n, generator=generator)
        return 0.02 * (100.0 / 0.02) ** u
    if cfg.precond == "vp":
        t = 1e-5 + (1 - 1e-5) * torch.rand(n, generator=generator)
        return VPPrecond().t_to_sigma(t)
    raise ValueError(f"unknown preconditioning {cfg.precond!r}")


def denoising_loss(
    denoiser: EDMDenoiser, x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
    class_labels: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mean over the batch of ``lambda(sigma) * mean_pixels |D(x0 + sigma n, sigma) - x0|^2``."""
    x = x0 + sigma.reshape(-1, *([1] * (x0.ndim - 1))) * noise
    d = denoiser(x, sigma, class_labels=class_labels)
    w = loss_weight(denoiser.precond, sigma)
    per_sample = (d - x0).square().flatten(1).mean(1)
    return (w * per_sample).mean()


def loss_curve(losses: List[float], every: int) -> List[List[float]]:
    """``[step, mean loss over the ``every`` steps ending there]`` pairs: the card's loss curve."""
    every = max(1, int(every))
    return [[end, round(sum(losses[end - every:end]) / every, 4)] for end in range(every, len(losses) + 1, every)]


def one_hot_with_dropout(labels: torch.Tensor, num_classes: int, p: float, generator: torch.Generator) -> torch.Tensor:
    onehot = F.one_hot(labels, num_classes).float()
    if p > 0:
        keep = (torch.rand(labels.shape[0], generator=generator) >= p).float()
        onehot = onehot * keep[:, None]
    return onehot


# --------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------
def export_model(net: torch.nn.Module, out: Path, meta: Dict, dtype: str = "float16") -> Path:
    """Write ``model.safetensors`` (weights cast to ``dtype``) and ``config.json`` atomically."""
    from safetensors.torch import save

    out.mkdir(parents=True, exist_ok=True)
    tdtype = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    tensors = {k: v.detach().to("cpu", tdtype).contiguous() for k, v in net.state_dict().items()}
    blob = save(tensors, metadata={"format": FORMAT})
    write_atomic(out / WEIGHTS_FILE, blob)
    meta = dict(meta)
    meta["weights_dtype"] = dtype
    meta["weights_sha256"] = hashlib.sha256(blob).hexdigest()
    write_atomic(out / CONFIG_FILE, (json.dumps(meta, indent=2) + "\n").encode())
    return out / WEIGHTS_FILE


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def build_denoiser(cfg: TrainConfig, shape: Tuple[int, ...], num_classes: int,
                   net: Optional[torch.nn.Module] = None) -> EDMDenoiser:
    """The preconditioned denoiser of ``cfg`` around ``net`` (default: a new U-Net)."""
    net = UNet(cfg.unet_config(shape[-1], shape[0], num_classes)) if net is None else net
    return EDMDenoiser(
        net, precond=cfg.precond, sigma_data=cfg.sigma_data, sigma_min=cfg.sigma_min,
        sigma_max=cfg.sigma_max, shape=shape, num_classes=num_classes,
    )


def _log(msg: str) -> None:
    print(msg, flush=True)


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True on every process when it is True on any (they stop at the same step); ``device`` is
    where the collective runs (nccl reduces only CUDA tensors)."""
    if rank_and_world()[1] > 1:
        value = torch.tensor([float(flag)], device=device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())
    return flag


# What may change between the invocations of one run: where it writes, how fast it goes, how often
# it reports and saves, how it exports.  Every other setting changes what the run computes.
RUN_ONLY_SETTINGS = frozenset({"out", "threads", "device", "minutes", "save_every", "log_every", "resume",
                               "keep_state", "export_dtype"})


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def settings_conflicts(saved: Dict, cfg: TrainConfig, done_steps: int, finished: bool) -> List[str]:
    """What differs between the settings a run in a folder was made with (``saved``, its
    ``train_config``) and ``cfg``, in a way that continuing or reusing that run would not give the
    run ``cfg`` asks for.  Empty: the folder holds (part of) this very run."""
    defaults = asdict(TrainConfig())
    conflicts = []
    for key, value in asdict(cfg).items():
        if key in RUN_ONLY_SETTINGS or key == "steps":
            continue
        old = saved.get(key, defaults[key])
        if _plain(old) != _plain(value):
            conflicts.append(f"{key} {old!r} there, {value!r} asked")
    old_steps = saved.get("steps", done_steps)
    if finished and cfg.steps != done_steps:
        conflicts.append(f"steps: it finished at {done_steps} steps and its training state was removed, so it "
                         f"cannot become a {cfg.steps}-step run (--keep-state keeps the state of a finished run)")
    elif not finished and cfg.steps < done_steps:
        conflicts.append(f"steps: {done_steps} are already trained, more than the {cfg.steps} asked")
    elif not finished and cfg.steps != old_steps and cfg.lr_schedule != "constant":
        conflicts.append(f"steps {old_steps} there, {cfg.steps} asked: the {cfg.lr_schedule} learning-rate "
                         "schedule depends on the total number of steps")
    return conflicts


def _refuse(what: str, conflicts: List[str]) -> ValueError:
    return ValueError(f"{what} was made with other settings ({'; '.join(conflicts)}), so it is not continued "
                      "or reused: rerun with its settings, pick another --out, or pass --no-resume to start over "
                      "and overwrite it")


def finished_run(cfg: TrainConfig) -> Optional[Dict]:
    """The ``config.json`` of the finished run ``cfg`` asks for, if ``cfg.out`` holds it (None if
    the folder holds no finished model); refuses a folder holding another model or another run."""
    out = Path(cfg.out)
    if not cfg.resume or (out / STATE_FILE).exists() or not (out / CONFIG_FILE).exists():
        return None
    meta = json.loads((out / CONFIG_FILE).read_text())
    if "train_config" not in meta or not (out / WEIGHTS_FILE).exists():
        raise ValueError(f"{out} holds {CONFIG_FILE} of a model this trainer did not write (or no weights); "
                         "pick another --out, or pass --no-resume to overwrite it")
    conflicts = settings_conflicts(meta["train_config"], cfg, int(meta["steps"]), finished=True)
    if conflicts:
        raise _refuse(f"The finished model in {out}", conflicts)
    return meta


def with_init_identity(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the SHA-256 of its ``init_from`` weights filled in (unchanged without one);
    refuses a folder that holds no model written by this trainer."""
    if not cfg.init_from:
        return replace(cfg, init_from=None, init_weights_sha256=None)
    folder = Path(cfg.init_from)
    weights, config = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    if not (weights.is_file() and config.is_file()):
        raise ValueError(f"--init-from {folder}: not a model folder written by `train model` "
                         f"(it needs {WEIGHTS_FILE} and {CONFIG_FILE})")
    try:
        fmt = json.loads(config.read_text()).get("format")
    except ValueError as err:
        raise ValueError(f"--init-from {folder}: corrupt {CONFIG_FILE} ({err})") from None
    if fmt != FORMAT:
        raise ValueError(f"--init-from {folder}: its {CONFIG_FILE} has format {fmt!r}; only {FORMAT!r} "
                         "models (written by `train model`) can be fine-tuned")
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    return replace(cfg, init_from=str(folder), init_weights_sha256=digest)


def load_init(cfg: TrainConfig, denoiser: EDMDenoiser) -> Dict:
    """Copy the weights of ``cfg.init_from`` into ``denoiser.net``; returns that model's
    ``config.json``.  Refuses a model of another architecture, preconditioning or data shape."""
    from ..models.bundled import load_bundled

    folder = Path(cfg.init_from)
    init = load_bundled(folder.name, root=folder.parent)
    meta = json.loads((folder / CONFIG_FILE).read_text())
    ours = {**denoiser.net.config.to_dict(), "precond": cfg.precond, "sigma_data": cfg.sigma_data,
            "shape": list(denoiser.shape), "num_classes": denoiser.num_classes}
    theirs = {**init.net.config.to_dict(), "precond": meta.get("precond"),
              "sigma_data": meta.get("sigma_data"), "shape": meta.get("shape"),
              "num_classes": meta.get("num_classes")}
    differ = [f"{key} {theirs[key]!r} there, {ours[key]!r} here" for key in ours if _plain(theirs[key]) != _plain(ours[key])]
    if differ:
        raise ValueError(f"--init-from {folder} is another kind of model ({'; '.join(differ)}): pass the "
                         "architecture and preconditioning options it was trained with")
    denoiser.net.load_state_dict(init.net.state_dict())
    return meta


def train(cfg: TrainConfig, data: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, quiet: bool = False) -> Dict:
    """Run (or resume) training.

    Returns ``{"steps", "losses", "seconds", "stopped_by_budget", "out", "wall_seconds",
    "net", "ema", "denoiser"}`` (``net`` the trained weights, ``ema`` their moving average -- the
    exported model -- and ``denoiser`` the preconditioned wrapper around ``net``).  If ``cfg.out``
    already holds this finished run nothing is trained: ``already_done`` is True, ``net`` None,
    ``losses`` empty and ``ema`` / ``denoiser`` the exported model.

    ``data`` overrides the dataset named in ``cfg`` (images in [-1, 1], int64 labels).
    """
    log = (lambda m: None) if quiet else _log
    start_wall = time.time()
    cfg = with_init_identity(cfg)
    torch.set_num_threads(max(1, int(cfg.threads)))
    torch.manual_seed(cfg.seed)
    rank, world = rank_and_world()
    if cfg.batch % world:
        raise ValueError(f"--batch {cfg.batch} does not split evenly over {world} processes")
    if rank:
        log = lambda m: None  # noqa: E731 -- rank 0 reports
    out = Path(cfg.out)
    done = finished_run(cfg)
    if done is not None:
        from ..models.bundled import load_bundled

        log(f"{out} already holds this run, finished at step {done['steps']}: nothing to do "
            "(--no-resume retrains it)")
        denoiser = load_bundled(out.name, root=out.parent)
        return {"steps": int(done["steps"]), "losses": [], "seconds": done["training_seconds"],
                "stopped_by_budget": False, "out": str(out), "wall_seconds": time.time() - start_wall,
                "net": None, "ema": denoiser.net, "denoiser": denoiser, "already_done": True}
    out.mkdir(parents=True, exist_ok=True)

    if data is None:
        images, labels = load_dataset(cfg.dataset, "train")
    else:
        images, labels = data
    if cfg.limit:
        images, labels = images[: cfg.limit], labels[: cfg.limit]
    num_classes = DATASETS[cfg.dataset]["num_classes"] if cfg.dataset in DATASETS else int(labels.max()) + 1
    shape = tuple(images.shape[1:])
    n_data = images.shape[0]

    if cfg.lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {cfg.lr_schedule!r}")
    device = torch.device(cfg.device)
    denoiser = build_denoiser(cfg, shape, num_classes)
    init_meta = load_init(cfg, denoiser) if cfg.init_from else None
    init_images = 0 if init_meta is None else init_meta.get("images_seen", init_meta["steps"] * init_meta["batch"])
    net = denoiser.net.to(device)
    memfmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    net.to(memory_format=memfmt)
    denoiser.channels_last = cfg.channels_last
    trainee = denoiser
    if world > 1:
        trainee = build_denoiser(cfg, shape, num_classes,
                                 net=torch.nn.parallel.DistributedDataParallel(net, broadcast_buffers=False))
        trainee.channels_last = cfg.channels_last
    share = slice(rank * cfg.batch // world, (rank + 1) * cfg.batch // world)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=tuple(cfg.adam_betas))
    gen = torch.Generator().manual_seed(cfg.seed)
    step, elapsed_before, losses = 0, 0.0, []

    state_path = out / STATE_FILE
    if cfg.resume and state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if state["unet"] != net.config.to_dict():
            raise ValueError(f"{state_path} was written for a different architecture; remove it or use --no-resume")
        conflicts = settings_conflicts(state["train_config"], cfg, int(state["step"]), finished=False)
        if conflicts:
            raise _refuse(f"The unfinished run in {out} ({state['step']} steps)", conflicts)
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        net.to(device), ema.to(device)
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        step, elapsed_before, losses = state["step"], state["elapsed"], state["losses"]
        log(f"resumed from {state_path} at step {step} ({elapsed_before / 60:.1f} min trained)")

    ramp_end = 9.0 / (1.0 - cfg.ema_decay) - 10.0 if cfg.ema_decay < 1 else math.inf
    if cfg.init_from:
        log(f"fine-tuning {cfg.init_from} (weights {cfg.init_weights_sha256[:12]}, {init_meta['steps']} steps); "
            f"EMA decay {cfg.ema_decay} from the first step")
    elif cfg.steps < ramp_end:
        log(f"note: the EMA warm-up min({cfg.ema_decay}, (1 + step) / (10 + step)) reaches --ema-decay "
            f"{cfg.ema_decay} only at step {math.ceil(ramp_end)}; this {cfg.steps}-step run ends at decay "
            f"{(1 + cfg.steps) / (10 + cfg.steps):.5f}")
    n_params = count_parameters(net)
    log(f"dataset {cfg.dataset}: {n_data} images of shape {shape}, {num_classes} classes; "
        f"U-Net {n_params / 1e6:.3f}M parameters; {cfg.steps} steps of batch {cfg.batch}, "
        f"{cfg.threads} thread(s)")

    def meta(done_steps: int, seconds: float) -> Dict:
        return {
            "format": FORMAT,
            "version": 1,
            "architecture": "unet",
            "unet": net.config.to_dict(),
            "precond": cfg.precond,
            "sigma_data": cfg.sigma_data,
            "sigma_min": cfg.sigma_min,
            "sigma_max": cfg.sigma_max,
            "shape": list(shape),
            "dataset": cfg.dataset,
            "num_classes": num_classes,
            "class_names": list(FASHION_MNIST_CLASSES) if cfg.dataset == "fashion-mnist" else [str(i) for i in range(num_classes)],
            "data_range": [-1.0, 1.0],
            "parameters": n_params,
            "steps": done_steps,
            "batch": cfg.batch,
            "training_seconds": round(seconds, 1),
            "loss_curve": loss_curve(losses, cfg.log_every),
            "machine": describe(),
            "train_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
            "processes": world,
            "init": None if init_meta is None else {
                "from": cfg.init_from, "weights_sha256": cfg.init_weights_sha256,
                "steps": init_meta["steps"], "batch": init_meta["batch"], "images_seen": init_images,
            },
            "images_seen": init_images + done_steps * cfg.batch,   # this run's and its starting model's
        }

    def save_state(seconds: float) -> None:
        if rank:
            return
        save_torch_atomic(
            {
                "step": step, "elapsed": seconds, "losses": losses,
                "net": net.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                "unet": net.config.to_dict(), "train_config": asdict(cfg),
            },
            state_path,
        )
        export_model(ema, out, meta(step, seconds), cfg.export_dtype)

    budget_s = cfg.minutes * 60 if cfg.minutes else math.inf
    run_start = time.time()
    stopped_by_budget = False
    net.train()
    t_log, loss_acc, n_acc = time.time(), 0.0, 0
    ema_params = list(ema.parameters())
    net_params = list(net.parameters())
    while step < cfg.steps:
        if budget_s < math.inf and _any_rank(time.time() - run_start >= budget_s, device):   # same budget on every rank
            stopped_by_budget = True
            log(f"wall-clock budget of {cfg.minutes} min reached at step {step}")
            break
        idx = torch.randint(n_data, (cfg.batch,), generator=gen)
        x0 = images[idx]
        if cfg.hflip:
            flip = torch.rand(cfg.batch, generator=gen) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        x0 = x0.to(device)
        x0 = x0.contiguous(memory_format=memfmt) if x0.ndim == 4 else x0
        y = one_hot_with_dropout(labels[idx], num_classes, cfg.label_dropout, gen).to(device)
        sigma = sample_sigma(cfg, cfg.batch, gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device).contiguous(memory_format=memfmt)

        lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        if cfg.lr_schedule == "cosine":
            lr *= cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * step / max(1, cfg.steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        loss = denoising_loss(trainee, x0[share], sigma[share], noise[share], y[share])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in net_params:
            if p.grad is not None:
                torch.nan_to_num_(p.grad, nan=0.0, posinf=1e5, neginf=-1e5)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(net_params, cfg.grad_clip)
        opt.step()
        decay = cfg.ema_decay if cfg.init_from else min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, net_params, 1 - decay)
        step += 1
        lv = float(all_reduce_mean(loss))          # the whole batch's loss when each rank holds a share
        losses.append(lv)
        loss_acc, n_acc = loss_acc + lv, n_acc + 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            dt = (time.time() - t_log) / n_acc
            elapsed = elapsed_before + time.time() - run_start
            log(f"step {step}/{cfg.steps}  loss {loss_acc / n_acc:.4f}  lr {lr:.2e}  {dt:.3f} s/it  "
                f"elapsed {elapsed / 60:.1f} min")
            t_log, loss_acc, n_acc = time.time(), 0.0, 0
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            save_state(elapsed_before + time.time() - run_start)

    seconds = elapsed_before + time.time() - run_start
    finished = step >= cfg.steps
    if rank == 0 and finished and not cfg.keep_state:
        export_model(ema, out, meta(step, seconds), cfg.export_dtype)
        if state_path.exists():
            state_path.unlink()
    elif rank == 0:
        save_state(seconds)
    barrier()
    log(f"{'finished' if finished else 'stopped'} at step {step}; {seconds / 60:.1f} min of training; "
        f"wrote {out / WEIGHTS_FILE}")
    return {
        "steps": step, "losses": losses, "seconds": seconds, "stopped_by_budget": stopped_by_budget,
        "out": str(out), "wall_seconds": time.time() - start_wall,
        "net": net, "ema": ema, "denoiser": denoiser,
    }


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def _tuple_of_ints(s: str) -> Tuple[int, ...]:
    return tuple(int(v) for v in s.replace(" ", "").split(",") if v)


def parse_args(argv: Optional[List[str]] = None) -> TrainConfig:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="diffsampler train model", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default=d.dataset, choices=sorted(DATASETS))
    p.add_argument("--out", default=None, help="output folder (default checkpoints/<dataset>)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--lr-schedule", default=d.lr_schedule, choices=["constant", "cosine"])
    p.add_argument("--lr-min-ratio", type=float, default=d.lr_min_ratio, help="cosine: final lr / lr")
    p.add_argument("--device", default=d.device, help="cpu or cuda (random draws stay on the CPU)")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--ema-decay", type=float, default=d.ema_decay)
    p.add_argument("--label-dropout", type=float, default=d.label_dropout)
    p.add_argument("--hflip", action="store_true", help="random horizontal flips (off by default)")
    p.add_argument("--precond", default=d.precond, choices=["edm", "ve", "vp"])
    p.add_argument("--sigma-data", type=float, default=d.sigma_data)
    p.add_argument("--p-mean", type=float, default=d.p_mean)
    p.add_argument("--p-std", type=float, default=d.p_std)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads, help="torch.set_num_threads (default 1)")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget of this run")
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--no-resume", dest="resume", action="store_false")
    p.add_argument("--keep-state", action="store_true", help="keep train_state.pt after finishing")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--export-dtype", default=d.export_dtype, choices=["float16", "bfloat16", "float32"])
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--init-from", default=None, metavar="FOLDER",
                   help="fine-tune: start from the weights of a model folder `train model` wrote (same "
                        "architecture); the EMA starts there with the full --ema-decay")
    p.add_argument("--base-channels", type=int, default=d.base_channels)
    p.add_argument("--channel-mult", type=_tuple_of_ints, default=d.channel_mult, help="e.g. 1,2,4")
    p.add_argument("--num-res-blocks", type=int, default=d.num_res_blocks)
    p.add_argument("--no-attention", dest="attention_mid", action="store_false")
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--groups", type=int, default=d.groups)
    a = vars(p.parse_args(argv))
    if a["out"] is None:
        a["out"] = f"checkpoints/{a['dataset']}"
    return TrainConfig(**a)


def main(argv: Optional[List[str]] = None) -> int:
    cfg = parse_args(argv)
    cfg.device = join_process_group(cfg.device)
    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
