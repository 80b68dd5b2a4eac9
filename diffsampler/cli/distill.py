"""``diffsampler distill``: SFD / SFD-v, the model's network fine-tuned for a few Euler steps."""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import click

from .options import model_options, parse_options

STATE_FILE = "distill_state.pt"


def _command_line(ctx: click.Context) -> str:
    """The command as typed (from sys.argv when this process was started by it), else an
    equivalent one rebuilt from the options that differ from their defaults."""
    argv = sys.argv[1:]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = f"torchrun --nproc_per_node {os.environ.get('LOCAL_WORLD_SIZE', world)} -m diffsampler" \
        if world > 1 else "diffsampler"
    if "distill" in argv:
        return f"{launcher} {shlex.join(argv[argv.index('distill'):])}"
    words = ["distill"]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value == param.default or value in (None, (), False):
            continue
        flag = max(param.opts, key=len)
        if isinstance(param, click.Option) and param.is_flag:
            words.append(flag if value else (param.secondary_opts or [flag])[0])
        elif isinstance(value, tuple):
            words += [w for v in value for w in (flag, str(v))]
        else:
            words += [flag, str(value)]
    return f"{launcher} {shlex.join(words)}"


@click.command("distill", context_settings={"show_default": True})
@model_options
@click.option("--nfe", required=True,
              help="NFE to distil for: one value (SFD, e.g. 2) or a range/list (SFD-v, one student with a "
                   "step-count input, e.g. 2-5).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for the student (config.json, model.safetensors, CARD.md); a --model spec afterwards.")
@click.option("--iters", type=click.IntRange(min=1), default=None, help="Training iterations (default 600).")
@click.option("--batch", type=click.IntRange(min=1), default=None, help="Seeds per iteration (default 32).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Adam learning rate (default 2e-4); divided by 10 after --lr-drop-at of the iterations.")
@click.option("--lr-drop-at", type=click.FloatRange(0, 1), default=0.5)
@click.option("--M", "extra", type=click.IntRange(min=0), default=3,
              help="Teacher points inside every student interval.")
@click.option("--teacher", default="dpmpp", help="Teacher solver (DPM-Solver++ order 3 by default).")
@click.option("--teacher-option", multiple=True, metavar="KEY=VALUE", help="Teacher solver option (repeatable).")
@click.option("--schedule", default="polynomial", help="Student grid (the teacher refines it).")
@click.option("--schedule-option", multiple=True, metavar="KEY=VALUE", help="Grid parameter, e.g. rho=7.")
@click.option("--afs/--no-afs", default=True, help="Analytical first step (an NFE-k student takes k+1 steps).")
@click.option("--class", "class_label", type=click.IntRange(min=0), default=None,
              help="Distil for one class (default: a random class per seed).")
@click.option("--seed", "first_seed", type=click.IntRange(min=0), default=1_000_000, help="First training seed.")
@click.option("--val-images", type=click.IntRange(min=0), default=64,
              help="Held-out seeds (from 2,000,000) that measure the endpoint error to the teacher.")
@click.option("--val-every", type=click.IntRange(min=1), default=None, help="Default: every tenth of the run.")
@click.option("--save-every", type=click.IntRange(min=0), default=50,
              help=f"Iterations between checkpoints (OUT/{STATE_FILE}; a rerun resumes from it).")
@click.option("--minutes", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Wall-clock budget: stop cleanly, save the state, rerun to continue.")
@click.option("--step-module", default=None,
              help="SFD-v on a network other than the bundled U-Net: its time-embedding module, whose output gets "
                   "the step embedding (e.g. time_embedding for a diffusers UNet2DModel).")
@click.option("--weights-dtype", type=click.Choice(["float16", "float32", "bfloat16"]), default="float16")
@click.option("--keep-state", is_flag=True, default=False, help=f"Keep OUT/{STATE_FILE} after finishing.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch.set_num_threads.")
@click.option("--device", default="cpu")
def distill_command(model, trust_pickle, height, width, nfe, out, iters, batch, lr, lr_drop_at, extra, teacher, teacher_option,
                    schedule, schedule_option, afs, class_label, first_seed, val_images, val_every, save_every,
                    minutes, step_module, weights_dtype, keep_state, threads, device):
    """Distil the model itself for a few NFE (SFD; SFD-v for an NFE range): a fine-tuned copy of its
    network samples with Euler on a short grid where a teacher solver lands.

    Data-free (fresh noise every iteration, the teacher run online), resumable (rerun the same
    command), torchrun data parallel.  The student is a model folder: `diffsampler sample --model
    OUT --nfe 2`."""
    command = _command_line(click.get_current_context())
    import torch

    from . import runtime as rt
    from ..distill import files, train
    from ..distributed import rank_and_world
    if threads is not None:
        torch.set_num_threads(threads)
    with rt.user_errors():
        nfes = train.parse_nfes(nfe)
        device = rt.init_distributed(device)
        denoiser = rt.load_on_device(model, device, trust_pickle=trust_pickle, height=height, width=width)
        if denoiser.conditioning == "text":
            raise ValueError("distill from the CLI takes pixel-space models; distil text-to-image models from Python "
                             "with diffsampler.distill(model, ..., cond=...)")
        denoiser, cond = rt.conditioning(denoiser, class_label, None, None, 1.0)
        out.mkdir(parents=True, exist_ok=True)
        student = train.distill(
            denoiser, denoiser.shape, nfe=nfes, cond=cond if cond.inputs is not None else None,
            cond_record=cond.record, batch=batch or train.DEFAULT_BATCH, iters=iters or train.DEFAULT_ITERS,
            lr=lr or train.DEFAULT_LR, lr_drop_at=lr_drop_at, M=extra, teacher=teacher,
            teacher_options=parse_options(teacher_option, "--teacher-option") or None, schedule=schedule,
            schedule_options=parse_options(schedule_option, "--schedule-option") or None, afs=afs,
            first_seed=first_seed, val_images=val_images, val_every=val_every, step_module=step_module,
            state_path=out / STATE_FILE, save_every=save_every, minutes=minutes, device=device, progress=True,
            model_name=model)
        if rank_and_world()[0] != 0:
            return
        info = student.info
        if not info["finished"]:
            click.echo(f"stopped after the {minutes:g}-minute budget at iteration {info['iterations_done']} of "
                       f"{info['iters']}; the state is in {out / STATE_FILE}: rerun the same command to continue")
            return
        files.save(student, out, command=command, model_spec=model, weights_dtype=weights_dtype,
                   cond=cond if cond.inputs is not None else None)
        if not keep_state:
            (out / STATE_FILE).unlink(missing_ok=True)
    history = info["validation"]
    best = min(history, key=lambda h: h[1]) if history else None
    quality = "; ".join(f"NFE {k}: {history[0][2][str(k)]:.4g} -> {best[2][str(k)]:.4g}" for k in nfes) if best else ""
    click.echo(f"wrote {out}: {'SFD-v' if len(nfes) > 1 else 'SFD'} student for NFE {', '.join(map(str, nfes))}; endpoint RMSE to "
               f"the teacher on {val_images} held-out seeds {quality}; {info['train_seconds'] / 60:.1f} min")
