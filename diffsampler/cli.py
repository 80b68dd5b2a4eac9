"""Command line: ``diffsampler sample | list | schedule | amed | fid | analyze`` (also ``python -m diffsampler``)."""
from __future__ import annotations

from pathlib import Path

import json

import click
import numpy as np
import torch

from . import __version__
from .fileio import write_atomic
from .generate import SampleJob, one_hot_labels, rank_and_world, seed_labels
from .generate import run as run_job
from .models.base import Denoiser, sigma_range
from .models.specs import DEFAULT_MODEL, load_model
from .sampling import fixed_schedule_request, resolve_grid
from .schedules import SCHEDULES, Schedule
from .seeds import parse_seeds
from .solvers import SOLVERS, get_solver
from .metrics import CLASSIFIER, FEATURE_LAYERS
from .metrics.sources import open_images

BUNDLED_REFERENCE = Path(__file__).resolve().parents[1] / "checkpoints" / "fashion-mnist-classifier" / "reference-train.npz"

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _parse_value(text: str):
    """Solver/schedule option values: numbers, booleans, or strings."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _parse_options(pairs, flag):
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint=flag)
        options[key.replace("-", "_")] = _parse_value(value)
    return options


def _parse_request(seeds, solver_option, max_order, schedule_option):
    """The seed list, solver options and schedule options shared by sample and analyze."""
    try:
        seed_list = parse_seeds(seeds)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--seeds") from None
    options = _parse_options(solver_option, "--option")
    if max_order is not None:
        options["max_order"] = max_order
    return seed_list, options, _parse_options(schedule_option, "--schedule-option")


def _parse_sigmas(text):
    try:
        return [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint="--sigmas") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="diffsampler")
def main():
    """Fast sampling of diffusion models by solving their probability-flow ODE."""


@main.command("list")
def list_command():
    """List the solvers (order, NFE rule, default schedule) and the schedules."""
    click.echo("Solvers:")
    for name, cls in SOLVERS.items():
        solver = cls()
        schedule = cls.default_schedule + "".join(f" {k}={v}" for k, v in cls.default_schedule_options.items())
        click.echo(f"  {name:<9} order {solver.order}  {cls.nfe_rule():<38} schedule: {schedule:<20} {cls.summary}")
    click.echo("Schedules:")
    for name, fn in SCHEDULES.items():
        click.echo(f"  {name:<15} {(fn.__doc__ or '').strip().splitlines()[0]}")
    click.echo("  (or a schedule file: JSON written by `diffsampler schedule` or Schedule.save)")


def _init_distributed(device: str) -> str:
    """Under torchrun (WORLD_SIZE > 1) join the process group; return this rank's device.

    The group is destroyed at exit: a rank that leaves with a live gloo group can abort in its
    own teardown ("terminate called without an active exception") while the others still work."""
    import atexit
    import os
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return device
    cuda = device.startswith("cuda")
    torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    atexit.register(torch.distributed.destroy_process_group)
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    return device


def _load_on_device(spec: str, device: str, dtype=None, trust_pickle: bool = False):
    """The model a spec names, on ``device``, before anything is built from it: prompt embeddings
    are computed where the pipeline runs, and guidance wraps the moved model (the wrapper has no .to)."""
    denoiser = load_model(spec, dtype=dtype, trust_pickle=trust_pickle)
    if denoiser.shape is None:
        raise ValueError(f"model {spec!r} does not declare its sample shape")
    return denoiser.to(device) if device != "cpu" else denoiser


def _conditioning_options(f):
    """--class, --prompt, --negative-prompt, --guidance: what :func:`_conditioning` turns into model inputs."""
    f = click.option("--guidance", type=float, default=1.0, show_default=True,
                     help="Classifier-free guidance scale (1 = none). NFE counts guided evaluations, each one "
                          "batched cond+uncond model call.")(f)
    f = click.option("--negative-prompt", default=None, help="Negative prompt: the unconditional half of guidance.")(f)
    f = click.option("--prompt", default=None, help="Text prompt (text-to-image models).")(f)
    f = click.option("--class", "class_label", type=int, default=None,
                     help="Class index for a class-conditional model (default: a random class per seed).")(f)
    return f


@main.command("sample")
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="Model spec: digits, gmm:digits[:STD], gmm:synthetic:K:CxHxW[:SEED], ...")
@click.option("--solver", type=click.Choice(list(SOLVERS)), default=None, help="Solver (default ipndm).")
@click.option("--nfe", type=click.IntRange(min=1), default=None, help="Model evaluations per sample (default 10).")
@click.option("--amed", "amed_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="AMED predictor file (diffsampler amed train): samples with the solver, grid and AFS it was trained for.")
@click.option("--schedule", default=None,
              help=f"Schedule name ({', '.join(SCHEDULES)}) or schedule file; default: the solver's own.")
@click.option("--schedule-option", "schedule_option", multiple=True, metavar="KEY=VALUE",
              help="Schedule parameter, e.g. rho=5 (repeatable).")
@click.option("--sigmas", default=None, help="Explicit descending grid, e.g. 80,10.9,1.6,0.2,0.002 (replaces --nfe/--schedule).")
@click.option("--sigma-min", type=float, default=None, help="Default: the model's.")
@click.option("--sigma-max", type=float, default=None, help="Default: the model's.")
@click.option("--max-order", type=int, default=None, help="Multistep order (solvers that have one).")
@click.option("--option", "solver_option", multiple=True, metavar="KEY=VALUE",
              help="Other solver option, e.g. r=0.5 or variant=bh1 (repeatable).")
@click.option("--afs/--no-afs", default=None,
              help="Analytical first step (saves one evaluation). Default: off, or what a schedule file records.")
@click.option("--denoise-to-zero/--no-denoise-to-zero", default=False, show_default=True)
@click.option("--trust-pickle", is_flag=True, default=False,
              help="Allow pickled models (edm:PATH.pkl): unpickling runs code from the file, so only for files you trust.")
@_conditioning_options
@click.option("--seeds", default="0-63", show_default=True, help="Seeds: ranges and lists, e.g. 0-63 or 1,5,10-20.")
@click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True, help="Images per batch (per process).")
@click.option("--outdir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--grid/--no-grid", "write_grid", default=True, show_default=True, help="Also write grid.png.")
@click.option("--npz", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write all images as one .npz (samples: N x H x W x C uint8, seeds).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="float32", show_default=True,
              help="Dtype the model sees (solver arithmetic is float64 where the device has it).")
def sample_command(model, solver, nfe, amed_path, schedule, schedule_option, sigmas, sigma_min, sigma_max, max_order,
                   solver_option, afs, denoise_to_zero, trust_pickle, class_label, prompt, negative_prompt, guidance,
                   seeds, batch, outdir, write_grid, npz, device, dtype):
    """Sample images, one PNG per seed (in subfolders of 1000), plus a grid.

    Resumable: a rerun skips the seeds already written. Scale out with
    `torchrun --nproc_per_node N -m diffsampler sample ...` (seeds are split across processes).
    """
    schedule_arg = schedule
    seed_list, options, schedule_options = _parse_request(seeds, solver_option, max_order, schedule_option)
    grid_sigmas = _parse_sigmas(sigmas) if sigmas is not None else None
    try:
        solver_obj = get_solver(solver or "ipndm", **options)
        device = _init_distributed(device)
        denoiser = _load_on_device(model, device, DTYPES[dtype], trust_pickle)
        denoiser, cond, decode = _conditioning(denoiser, class_label, prompt, negative_prompt, guidance)
        if decode is None and denoiser.shape[0] not in (1, 3):
            raise ValueError(f"model {model!r} makes samples with {denoiser.shape[0]} channels, which cannot be "
                             "written as images (PNG needs 1 or 3 channels)")
        schedule, afs = fixed_schedule_request(schedule, schedule_options, denoiser, denoiser.shape, afs)
        fixed = schedule if isinstance(schedule, Schedule) else None
        if amed_path is not None:
            from .amed import load as load_predictor
            if options or schedule_options or sigma_min is not None or sigma_max is not None or denoise_to_zero:
                raise ValueError("--amed fixes the solver and grid: drop solver/schedule options, --sigma-min/max "
                                 "and --denoise-to-zero")
            predictor = load_predictor(amed_path, device=device)
            solver_obj, grid_sigmas, afs = predictor.sampling_request(denoiser, denoiser.shape, solver, nfe, schedule,
                                                                      grid_sigmas, afs)
            schedule = fixed = nfe = None
        afs = bool(afs)
        if grid_sigmas is None and fixed is None and nfe is None:
            nfe = 10
        model_min, model_max = sigma_range(denoiser)
        used_sigmas = resolve_grid(solver_obj, nfe, schedule, schedule_options or None, grid_sigmas,
                                   model_min if sigma_min is None else sigma_min,
                                   model_max if sigma_max is None else sigma_max, afs, denoise_to_zero)
    except (ValueError, FileNotFoundError) as err:
        raise click.UsageError(str(err)) from None
    nfe_used = solver_obj.num_evals(len(used_sigmas) - 1, afs, denoise_to_zero)
    settings = {"model": model, "solver": solver_obj.label if amed_path else (solver or "ipndm"),
                "solver_options": options, "amed": str(amed_path) if amed_path else None,
                "schedule": "explicit sigmas" if grid_sigmas else (str(schedule_arg) if schedule_arg else solver_obj.default_schedule),
                "schedule_options": schedule_options, "afs": afs, "denoise_to_zero": denoise_to_zero,
                "class": class_label, "prompt": prompt, "negative_prompt": negative_prompt, "guidance": guidance,
                "sigmas": [float(s) for s in used_sigmas], "nfe": nfe_used, "dtype": dtype,
                "seeds": seeds, "diffsampler_version": __version__}
    job = SampleJob(denoiser=denoiser, shape=denoiser.shape, seeds=seed_list, outdir=outdir, batch=batch,
                    dtype=DTYPES[dtype], device=device, cond=cond, decode=decode, settings=settings, write_grid=write_grid, npz=npz,
                    request=dict(solver=solver_obj, sigmas=used_sigmas, afs=afs, denoise_to_zero=denoise_to_zero))
    summary = run_job(job)
    if rank_and_world()[0] == 0:
        rate = summary["new"] / summary["seconds"] if summary["seconds"] > 0 else float("nan")
        click.echo(f"{summary['images']} images in {outdir} ({summary['new']} new, "
                   f"{summary['images'] - summary['new']} already there); NFE per image {nfe_used}; "
                   f"{summary['seconds']:.1f} s ({rate:.1f} images/s)")


def _repeat_rows(cond, n):
    """Conditioning computed once (batch 1) repeated for a batch of n."""
    if isinstance(cond, dict):
        return {k: _repeat_rows(v, n) for k, v in cond.items()}
    if isinstance(cond, torch.Tensor) and cond.ndim and cond.shape[0] == 1:
        return cond.expand(n, *cond.shape[1:])
    return cond


def _conditioning(denoiser, class_label, prompt, negative_prompt, guidance):
    """(denoiser, cond(seeds), decode) for the model's kind of conditioning.

    Text models (latent pipelines) take --prompt / --negative-prompt; class-conditional models take
    --class (default: a random class per seed); --guidance wraps the model in classifier-free
    guidance (one batched cond/uncond model call per evaluation).
    """
    from .models.guidance import ClassifierFreeGuidance
    text_model = type(denoiser).__name__ == "LatentDiffusion"
    num_classes = denoiser.num_classes if isinstance(denoiser, Denoiser) else 0
    decode = denoiser.decode if text_model else None
    if prompt is not None and not text_model:
        raise ValueError("--prompt was given but this model is not text-conditioned")
    if class_label is not None and not num_classes:
        raise ValueError("--class was given but this model is unconditional")
    if class_label is not None and not 0 <= class_label < num_classes:
        raise ValueError(f"class index out of range: the model has classes 0..{num_classes - 1}, got {class_label}")
    if text_model:
        if prompt is None:
            raise ValueError("this model is text-conditioned: give --prompt")
        cond_once, uncond_once = denoiser.encode_prompt(prompt, negative_prompt, need_uncond=guidance != 1)
        cond = lambda seeds: _repeat_rows(cond_once, len(seeds))
        if guidance != 1:
            denoiser = ClassifierFreeGuidance(denoiser, guidance, uncond=lambda c: _repeat_rows(
                uncond_once, next(iter(c.values())).shape[0]))
        return denoiser, cond, decode
    if num_classes:
        def cond(seeds):
            labels = torch.full((len(seeds),), class_label) if class_label is not None else seed_labels(seeds, num_classes)
            return {"class_labels": one_hot_labels(labels, num_classes)}
        if guidance != 1:
            denoiser = ClassifierFreeGuidance(denoiser, guidance)
        return denoiser, cond, decode
    if guidance != 1:
        raise ValueError("--guidance needs a conditional model (class labels or a prompt)")
    return denoiser, None, decode


@main.group("schedule")
def schedule_group():
    """Optimize (GITS) and inspect schedule files."""


@schedule_group.command("gits")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Model spec (as for sample).")
@click.option("--solver", type=click.Choice(list(SOLVERS)), default="ipndm", show_default=True,
              help="The solver the schedule is tuned for.")
@click.option("--nfe", required=True,
              help="Model evaluations per sample; several (e.g. 4-10 or 4,6,8) are fitted from one warm-up.")
@click.option("--afs/--no-afs", default=False, show_default=True, help="Tune for sampling with an analytical first step.")
@click.option("--coeff", default="1.15", show_default=True,
              help="DP coefficient on the remaining-path cost; several (e.g. 1.0,1.05,1.15) are fitted from one warm-up.")
@click.option("--metric", type=click.Choice(["l2", "l1", "dev"]), default="dev", show_default=True,
              help="Cost of one Euler jump: dev (the paper's: distance from the start-end chord vs the teacher's; "
                   "blind to error along the chord, so use l2 for models with nearly straight trajectories), l2, l1.")
@click.option("--teacher", type=click.Choice(list(SOLVERS)), default="ipndm", show_default=True)
@click.option("--teacher-steps", type=click.IntRange(min=2), default=60, show_default=True,
              help="Intervals of the teacher grid (61 points by default).")
@click.option("--base-schedule", default="polynomial", show_default=True, help="Schedule the teacher grid is taken from.")
@click.option("--warmup", type=click.IntRange(min=1), default=256, show_default=True, help="Warm-up trajectories.")
@click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--max-order", type=int, default=None, help="Student solver order (solvers that have one).")
@click.option("--option", "solver_option", multiple=True, metavar="KEY=VALUE",
              help="Other student solver option (repeatable), e.g. plain_first=true for AMED's odd-NFE rule.")
@click.option("--first-seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Warm-up seeds are first-seed .. first-seed + warmup - 1 (pick a range your evaluation does not use).")
@_conditioning_options
@click.option("--device", default="cpu", show_default=True)
@click.option("--trust-pickle", is_flag=True, default=False,
              help="Allow pickled models (edm:PATH.pkl): unpickling runs code from the file, so only for files you trust.")
@click.option("--out", required=True,
              help="Schedule file to write (JSON); with several NFEs or coefficients a name with {nfe} and/or "
                   "{coeff}, e.g. ipndm_{nfe}_{coeff}.json.")
def schedule_gits(model, solver, nfe, afs, coeff, metric, teacher, teacher_steps, base_schedule, warmup, batch,
                  max_order, solver_option, first_seed, class_label, prompt, negative_prompt, guidance, device,
                  trust_pickle, out):
    """Fit a GITS schedule to a model (dynamic programming over its own teacher trajectories).

    The warm-up trajectories are conditioned as `diffsampler sample` conditions its samples (a
    random class per seed unless --class; --prompt for text-to-image models; --guidance).  Scale out
    with `torchrun --nproc_per_node N -m diffsampler schedule gits ...`: the warm-up seeds are split
    across processes and their costs summed; rank 0 writes the file.
    """
    from . import gits
    options = _parse_options(solver_option, "--option")
    if max_order is not None:
        options["max_order"] = max_order
    nfes, coeffs = _parse_sweep(nfe, coeff, out)
    try:
        for n in nfes:                                  # refuse an NFE the solver cannot use before the warm-up
            gits.student_steps(n, solver, afs, teacher_steps + 1, options)
        device = _init_distributed(device)
        denoiser = _load_on_device(model, device, trust_pickle=trust_pickle)
        denoiser, cond, _ = _conditioning(denoiser, class_label, prompt, negative_prompt, guidance)
        rank = rank_and_world()[0]
        warm = gits.warm_up(denoiser, denoiser.shape, teacher=teacher, teacher_steps=teacher_steps,
                            base_schedule=base_schedule, warmup=warmup, first_seed=first_seed, batch=batch,
                            metric=metric, cond=cond, device=device, model_name=model, progress=rank == 0,
                            keep_endpoints=afs)
        warm.settings["conditioning"] = {"class": class_label, "prompt": prompt, "negative_prompt": negative_prompt,
                                         "guidance": guidance}        # recorded in every schedule file
        made = [(n, c, warm.schedule(n, solver, afs=afs, coeff=c, solver_options=options or None))
                for n in nfes for c in coeffs]          # every rank: the AFS search sums over ranks
    except (ValueError, FileNotFoundError) as err:
        raise click.UsageError(str(err)) from None
    if rank != 0:
        return
    for n, c, schedule in made:
        path = Path(out.format(nfe=n, coeff=f"{c:g}"))
        schedule.save(path)
        click.echo(f"wrote {path}: {solver} at NFE {n}{' with AFS' if afs else ''}, coeff {c:g}, "
                   f"{len(schedule.sigmas)} sigmas")
        click.echo(str(schedule))
    t = warm.timings
    click.echo(f"teacher {t['teacher_s']:.1f} s, cost matrix {t['cost_matrix_s']:.1f} s, "
               f"DP {1000 * max(s.info['timings']['dp_s'] for _, _, s in made):.1f} ms per schedule at most")


def _parse_sweep(nfe_text, coeff_text, out):
    """The NFEs and coefficients of `schedule gits`, and a check that --out can name each file."""
    from .seeds import parse_ranges
    try:
        nfes = parse_ranges(nfe_text, "NFEs", "NFE", "5, 4-10 or 4,6,8")
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--nfe") from None
    try:
        coeffs = list(dict.fromkeys(float(c) for c in coeff_text.split(",")))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {coeff_text!r}", param_hint="--coeff") from None
    missing = [f"{{{name}}}" for name, values in (("nfe", nfes), ("coeff", coeffs))
               if len(values) > 1 and f"{{{name}}}" not in out]
    if missing:
        raise click.BadParameter(f"several schedules need {' and '.join(missing)} in the file name, "
                                 f"e.g. --out gits_{{nfe}}_{{coeff}}.json", param_hint="--out")
    return nfes, coeffs


@schedule_group.command("show")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--plain", is_flag=True, help="Print only the comma-separated sigmas (for diffusers sigmas= / ComfyUI).")
def schedule_show(path, plain):
    """Print a schedule file: how it was made, then the sigmas as a plain list."""
    try:
        schedule = Schedule.load(path)
    except (ValueError, FileNotFoundError) as err:
        raise click.UsageError(str(err)) from None
    if not plain:
        for key, value in schedule.info.items():
            click.echo(f"{key}: {value}")
        click.echo("sigmas:")
    click.echo(str(schedule))


@main.group("amed")
def amed_group():
    """Train AMED predictors (learned intermediate times for AMED-Solver and AMED-Plugin)."""


@amed_group.command("train")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Model spec (as for sample).")
@click.option("--solver", type=click.Choice(["amed", "euler", "ipndm", "dpmpp", "dpm2"]), default="amed",
              show_default=True, help="amed = AMED-Solver; a solver name = AMED-Plugin on that solver.")
@click.option("--nfe", type=click.IntRange(min=1), required=True, help="Model evaluations per sample (2 per step).")
@click.option("--afs/--no-afs", default=None,
              help="Analytical first step. Default: on when the NFE is odd and --plain-first is not given.")
@click.option("--plain-first", is_flag=True, default=False,
              help="Odd NFE without AFS: step 0 is the base update with one evaluation and no intermediate point "
                   "(for data whose mean is far from 0, where AFS's zero-mean guess is poor).")
@click.option("--schedule", default=None, help="Schedule name or file (e.g. a GITS file made with --solver amed).")
@click.option("--schedule-option", "schedule_option", multiple=True, metavar="KEY=VALUE")
@click.option("--teacher", type=click.Choice(list(SOLVERS)), default="dpm2", show_default=True)
@click.option("--M", "extra", type=click.IntRange(min=0), default=None,
              help="Teacher points inserted between two student points (default: enough for a teacher of >= 8 steps, at least 1).")
@click.option("--scale-dir", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="Learn a direction scale in [1-c, 1+c] (0 = off).")
@click.option("--scale-time", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="Learn a time scale in [1-c, 1+c] (0 = off).")
@click.option("--batch", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--iters", type=click.IntRange(min=1), default=40, show_default=True, help="Training batches.")
@click.option("--lr", type=float, default=1e-2, show_default=True)
@click.option("--seed", "first_seed", type=click.IntRange(min=0), default=1_000_000, show_default=True,
              help="First training seed.")
@click.option("--feature-module", default=None,
              help="Module whose output feeds the predictor (default: the model's bottleneck; 'denoised' = fallback).")
@click.option("--guidance", type=float, default=1.0, show_default=True, help="Classifier-free guidance scale to train with.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--trust-pickle", is_flag=True, default=False, help="Allow pickled models (edm:PATH.pkl).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Predictor file to write.")
def amed_train(model, solver, nfe, afs, plain_first, schedule, schedule_option, teacher, extra, scale_dir, scale_time,
               batch, iters, lr, first_seed, feature_module, guidance, device, trust_pickle, out):
    """Distill an AMED predictor from a teacher solver (progress bar shows the loss)."""
    from .amed import train
    try:
        denoiser = _load_on_device(model, device, trust_pickle=trust_pickle)
        if type(denoiser).__name__ == "LatentDiffusion":
            raise ValueError("amed train from the CLI takes pixel-space models; train text-to-image models from "
                             "Python with diffsampler.amed.train(..., cond=...)")
        denoiser, cond, _ = _conditioning(denoiser, None, None, None, guidance)
        predictor = train(denoiser, denoiser.shape, solver=solver, nfe=nfe, afs=afs, plain_first=plain_first,
                          schedule=schedule,
                          schedule_options=_parse_options(schedule_option, "--schedule-option") or None,
                          teacher=teacher, M=extra, scale_dir=scale_dir, scale_time=scale_time, batch=batch,
                          iters=iters, lr=lr, first_seed=first_seed, cond=cond, feature_module=feature_module,
                          device=device, model_name=model, progress=True)
    except (ValueError, FileNotFoundError) as err:
        raise click.UsageError(str(err)) from None
    predictor.save(out)
    info = predictor.settings
    first = " with AFS" if info["afs"] else ""
    first += ", plain first step" if info.get("plain_first") else ""
    click.echo(f"wrote {out}: {predictor.solver().label} at NFE {info['nfe']}{first}, "
               f"features from {predictor.feature_source!r} ({predictor.feature_dim}), final loss "
               f"{info['final_loss']:.4g}, {info['train_seconds']:.1f} s")


@main.group("fid")
def fid_group():
    """FID (and KID, precision/recall) on torch-fidelity: reference statistics, scoring, sample-and-score."""


def _extractor_options(f):
    f = click.option("--inception-weights", type=click.Path(dir_okay=False), default=None,
                     help="Local Inception-v3 weights (or set DIFFSAMPLER_INCEPTION_WEIGHTS).")(f)
    f = click.option("--batch", type=click.IntRange(min=1), default=250, show_default=True)(f)
    f = click.option("--device", default="cpu", show_default=True)(f)
    return f


@fid_group.command("ref")
@click.option("--data", required=True, help="Folder of images, .npz, or a bundled dataset (fashion-mnist:train, ...).")
@click.option("--dest", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Reference .npz to write.")
@click.option("--extractor", type=click.Choice(list(FEATURE_LAYERS)), default=CLASSIFIER, show_default=True)
@click.option("--keep-features", type=click.IntRange(min=0), default=2000, show_default=True,
              help="Also store this many features (for KID / precision-recall against the reference).")
@_extractor_options
def fid_ref(data, dest, extractor, keep_features, inception_weights, batch, device):
    """Compute reference statistics (mu, sigma) of a dataset."""
    from .metrics import fid
    try:
        images = open_images(data)
        device = _init_distributed(device)
        features = fid.extract_features(images, extractor, batch, device, inception_weights, progress=True)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        raise click.UsageError(str(err)) from None
    if rank_and_world()[0] == 0:
        fid.save_reference(dest, features, extractor, keep_features, source=str(data))
        click.echo(f"wrote {dest}: {len(features)} images, {features.shape[1]} features ({extractor})")


def _score(images, ref, batch, device, inception_weights, with_kid, with_prc):
    from .metrics import fid
    features = fid.extract_features(images, ref["extractor"], batch, device, inception_weights, progress=True)
    stats = fid.statistics(features)
    if stats["mu"].shape != ref["mu"].shape:
        raise ValueError(f"the reference has {ref['mu'].shape[0]} features per image but extractor "
                         f"{ref['extractor']} gives {stats['mu'].shape[0]}: the reference was made differently")
    result = {"fid": fid.frechet_distance(stats, ref), "extractor": ref["extractor"], "num_images": len(features)}
    if with_kid or with_prc:
        if "features" not in ref:
            raise ValueError("KID and precision/recall need reference features: make the reference with --keep-features")
        if with_kid:
            result.update(fid.kid(features, ref["features"]))
        if with_prc:
            result.update(fid.precision_recall(features, ref["features"]))
    return result


@fid_group.command("calc")
@click.option("--images", required=True, help="Folder of images or .npz.")
@click.option("--ref", type=click.Path(dir_okay=False), required=True, help="Reference statistics (.npz).")
@click.option("--kid", "with_kid", is_flag=True, help="Also KID (needs reference features).")
@click.option("--prc", "with_prc", is_flag=True, help="Also precision/recall (needs reference features).")
@_extractor_options
def fid_calc(images, ref, with_kid, with_prc, inception_weights, batch, device):
    """Score a set of images against reference statistics (the extractor is the reference's)."""
    from .metrics import fid
    try:
        reference = fid.load_reference(ref)
        device = _init_distributed(device)
        result = _score(open_images(images), reference, batch, device, inception_weights, with_kid, with_prc)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        raise click.UsageError(str(err)) from None
    if rank_and_world()[0] == 0:
        click.echo(json.dumps(result))


@fid_group.command("run")
@click.option("--model", default=DEFAULT_MODEL, show_default=True)
@click.option("--solver", type=click.Choice(list(SOLVERS)), default="ipndm", show_default=True)
@click.option("--nfe", type=click.IntRange(min=1), default=None)
@click.option("--schedule", default=None)
@click.option("--afs/--no-afs", default=None)
@click.option("--max-order", type=int, default=None)
@click.option("--num", type=click.IntRange(min=2), default=10000, show_default=True, help="Images per seed block.")
@click.option("--blocks", type=click.IntRange(min=1), default=1, show_default=True,
              help="Seed blocks (block k uses seeds k*num .. (k+1)*num-1); each is scored, then min and mean.")
@click.option("--ref", type=click.Path(dir_okay=False), default=None, help="Reference statistics (default: the bundled model's).")
@click.option("--outdir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--sample-batch", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--trust-pickle", is_flag=True, default=False,
              help="Allow pickled models (edm:PATH.pkl): unpickling runs code from the file, so only for files you trust.")
@_extractor_options
@click.pass_context
def fid_run(ctx, model, solver, nfe, schedule, afs, max_order, num, blocks, ref, outdir, sample_batch, trust_pickle,
            inception_weights, batch, device):
    """Sample and score (the EDM protocol): N images per seed block, FID of each block, min and mean."""
    from .metrics import fid
    ref = ref or str(BUNDLED_REFERENCE)
    try:
        reference = fid.load_reference(ref)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    scores = []
    for k in range(blocks):
        block_dir = outdir / f"block{k}"
        args = ["--model", model, "--solver", solver, "--seeds", f"{k * num}-{(k + 1) * num - 1}",
                "--batch", str(sample_batch), "--outdir", str(block_dir), "--device", device, "--no-grid"]
        args += ["--nfe", str(nfe)] if nfe else []
        args += ["--schedule", schedule] if schedule else []
        args += [] if afs is None else (["--afs"] if afs else ["--no-afs"])
        args += ["--max-order", str(max_order)] if max_order else []
        args += ["--trust-pickle"] if trust_pickle else []
        ctx.invoke(sample_command, **sample_command.make_context("sample", args).params)
        try:
            scores.append(_score(open_images(block_dir), reference, batch, device, inception_weights, False, False))
        except (ValueError, RuntimeError) as err:
            raise click.UsageError(str(err)) from None
        click.echo(f"block {k}: FID {scores[-1]['fid']:.4f} ({reference['extractor']})")
    values = [s["fid"] for s in scores]
    summary = {"model": model, "solver": solver, "nfe": nfe, "schedule": schedule, "num": num, "blocks": blocks,
               "extractor": reference["extractor"], "fid": values, "fid_min": min(values),
               "fid_mean": float(np.mean(values)), "reference": ref}
    write_atomic(outdir / "fid.json", json.dumps(summary, indent=2).encode() + b"\n")
    click.echo(json.dumps(summary))


@main.command("analyze")
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="Model spec (as for sample; also bundled:NAME for a bundled checkpoint).")
@click.option("--solver", type=click.Choice(list(SOLVERS)), default="heun", show_default=True)
@click.option("--nfe", type=click.IntRange(min=1), default=None,
              help="Model evaluations per trajectory (default 60; more = finer trajectories).")
@click.option("--schedule", default=None, help="Schedule name or file; default: the solver's own.")
@click.option("--schedule-option", "schedule_option", multiple=True, metavar="KEY=VALUE",
              help="Schedule parameter, e.g. rho=5 (repeatable).")
@click.option("--max-order", type=int, default=None, help="Multistep order (solvers that have one).")
@click.option("--option", "solver_option", multiple=True, metavar="KEY=VALUE", help="Other solver option (repeatable).")
@click.option("--afs/--no-afs", default=False, show_default=True, help="Analytical first step.")
@click.option("--seeds", default="0-31", show_default=True, help="Seeds of the trajectories, e.g. 0-31 or 1,5,10-20.")
@click.option("--class", "class_label", type=int, default=None,
              help="Class index for a class-conditional model (default: a random class per seed, as sample).")
@click.option("--reference", default=None,
              help="Also compare the model's x0 estimates along its trajectories with this model spec's "
                   "(e.g. gmm:fashion-mnist, the optimal denoiser of the training set; evaluated unconditionally).")
@click.option("--show", type=click.IntRange(min=1), default=8, show_default=True, help="Trajectories in the 3-D figure.")
@click.option("--strips", type=click.IntRange(min=0), default=4, show_default=True, help="Seeds in the image strips.")
@click.option("--window", type=click.IntRange(min=4), default=7, show_default=True,
              help="Points per local cubic fit for curvature and torsion.")
@click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Folder for figures and numbers.json.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="float32", show_default=True, help="Dtype the model sees.")
def analyze_command(model, solver, nfe, schedule, schedule_option, max_order, solver_option, afs, seeds, class_label,
                    reference, show, strips, window, batch, out, device, dtype):
    """Trajectory geometry: record sampling/denoising trajectories and write figures and numbers.json."""
    import time as _time
    from .analysis import record_trajectories
    from .analysis.report import (add_reference_gap, compute_geometry, load_analysis_model, summary_line,
                                  write_report)
    from .seeds import seed_noise

    seed_list, options, schedule_options = _parse_request(seeds, solver_option, max_order, schedule_option)
    try:
        solver_obj = get_solver(solver, **options)
        denoiser = load_analysis_model(model)
        if getattr(denoiser, "shape", None) is None:
            raise ValueError(f"model {model!r} does not declare its sample shape")
        ref_model = load_analysis_model(reference) if reference else None
        if ref_model is not None and tuple(ref_model.shape or ()) != tuple(denoiser.shape):
            raise ValueError(f"--reference {reference!r} has sample shape {ref_model.shape}, "
                             f"the model {tuple(denoiser.shape)}")
        _, cond_fn, _ = _conditioning(denoiser, class_label, None, None, 1.0)
        schedule, afs = fixed_schedule_request(schedule, schedule_options, denoiser, denoiser.shape, afs)
        if nfe is None and not isinstance(schedule, Schedule):
            nfe = 60
        lo, hi = sigma_range(denoiser)
        grid_sigmas = resolve_grid(solver_obj, nfe, schedule, schedule_options or None, None, lo, hi, afs, False)
    except (ValueError, FileNotFoundError) as err:
        raise click.UsageError(str(err)) from None
    steps = len(grid_sigmas) - 1
    if steps < 3:
        raise click.UsageError(f"trajectory geometry needs at least 3 steps (4 points), but {solver} at NFE "
                               f"{nfe} takes {steps}; raise --nfe")
    if device != "cpu":
        denoiser = denoiser.to(device)
        ref_model = ref_model.to(device) if ref_model is not None else None
    cond = cond_fn(seed_list) if cond_fn is not None else None
    if cond is not None:
        cond = {k: v.to(device) for k, v in cond.items()}
    nfe_used = solver_obj.num_evals(steps, afs, False)
    click.echo(f"recording {len(seed_list)} trajectories: model {model}, {solver} NFE {nfe_used} ({steps} steps, "
               f"sigma {float(grid_sigmas[0]):g} -> {float(grid_sigmas[-1]):g})")
    start = _time.perf_counter()
    noise = seed_noise(seed_list, denoiser.shape, dtype=DTYPES[dtype], device=device)
    traj = record_trajectories(denoiser, noise, solver=solver_obj, sigmas=grid_sigmas, afs=afs, cond=cond,
                               batch_size=batch, store_device="cpu")
    recorded = _time.perf_counter() - start
    click.echo(f"measuring ({recorded:.1f} s so far)")
    geom = compute_geometry(traj, window=window, label=f"{model}, {solver} NFE {nfe_used}")
    if ref_model is not None:
        click.echo(f"comparing with {reference} along the trajectories")
        add_reference_gap(geom, traj, denoiser, ref_model, reference, cond=cond, batch_size=batch, dtype=DTYPES[dtype])
    labels = None
    if cond is not None:
        label_idx = cond["class_labels"].argmax(1).tolist()
        names = list(getattr(denoiser, "class_names", []) or [])
        labels = [f"seed {s}: {names[c] if c < len(names) else c}" for s, c in zip(seed_list, label_idx)]
    else:
        labels = [f"seed {s}" for s in seed_list]
    info = {"model": model, "solver": solver, "solver_options": options, "nfe": nfe_used, "steps": steps,
            "afs": afs, "schedule": str(schedule) if schedule is not None else solver_obj.default_schedule,
            "seeds": seed_list, "class_labels": None if cond is None else cond["class_labels"].argmax(1).tolist(),
            "shape": list(denoiser.shape), "dtype": dtype, "device": device, "diffsampler_version": __version__,
            "record_seconds": round(recorded, 3)}
    click.echo("writing figures")
    numbers = write_report(traj, geom, out, info=info, show=show, strips=strips, seed_names=labels, log=click.echo)
    click.echo(summary_line(numbers))
    click.echo(f"{len(seed_list)} trajectories analyzed in {_time.perf_counter() - start:.1f} s; "
               f"figures and numbers.json in {out}")


if __name__ == "__main__":
    main()
