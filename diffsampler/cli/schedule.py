"""``diffsampler schedule gits | show``: fit GITS schedules to a model, and print schedule files."""
from __future__ import annotations

from pathlib import Path

import click

from .options import conditioning_options, model_options, parse_options


@click.group("schedule")
def schedule_group():
    """Optimize (GITS) and inspect schedule files."""


def _parse_sweep(nfe_text, coeff_text, out):
    """The NFEs and coefficients of `schedule gits`, and a check that --out can name each file."""
    from ..seeds import parse_ranges
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


@schedule_group.command("gits")
@model_options
@click.option("--solver", default="ipndm", show_default=True, help="The solver the schedule is tuned for.")
@click.option("--nfe", required=True,
              help="Model evaluations per sample; several (e.g. 4-10 or 4,6,8) are fitted from one warm-up.")
@click.option("--afs/--no-afs", default=False, show_default=True, help="Tune for sampling with an analytical first step.")
@click.option("--coeff", default="1.15", show_default=True,
              help="DP coefficient on the remaining-path cost; several (e.g. 1.0,1.05,1.15) are fitted from one warm-up.")
@click.option("--metric", type=click.Choice(["l2", "l1", "dev", "solver"]), default="dev", show_default=True,
              help="Cost of a jump: dev (the paper's: an Euler jump's distance from the start-end chord vs the "
                   "teacher's; blind to error along the chord, so use l2 for models with nearly straight "
                   "trajectories), l2, l1 (of an Euler jump), or solver (the L2 error of the student's own update).")
@click.option("--teacher", default="ipndm", show_default=True, help="Teacher solver.")
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
@conditioning_options
@click.option("--device", default="cpu", show_default=True)
@click.option("--out", required=True,
              help="Schedule file to write (JSON); with several NFEs or coefficients a name with {nfe} and/or "
                   "{coeff}, e.g. ipndm_{nfe}_{coeff}.json.")
def schedule_gits(model, trust_pickle, height, width, solver, nfe, afs, coeff, metric, teacher, teacher_steps, base_schedule, warmup,
                  batch, max_order, solver_option, first_seed, class_label, prompt, negative_prompt, guidance, device,
                  out):
    """Fit a GITS schedule to a model (dynamic programming over its own teacher trajectories).

    The warm-up trajectories are conditioned as `diffsampler sample` conditions its samples (a
    random class per seed unless --class; --prompt for text-to-image models; --guidance).  Scale out
    with `torchrun --nproc_per_node N -m diffsampler schedule gits ...`: the warm-up seeds are split
    across processes and their costs summed; rank 0 writes the file.
    """
    options = parse_options(solver_option, "--option")
    if max_order is not None:
        options["max_order"] = max_order
    nfes, coeffs = _parse_sweep(nfe, coeff, out)
    from . import runtime as rt
    from .. import gits
    from ..distributed import rank_and_world
    with rt.user_errors():
        for n in nfes:                                  # refuse an NFE the solver cannot use before the warm-up
            gits.student_steps(n, solver, afs, teacher_steps + 1, options)
        device = rt.init_distributed(device)
        denoiser = rt.load_on_device(model, device, trust_pickle=trust_pickle, height=height, width=width)
        denoiser, cond = rt.conditioning(denoiser, class_label, prompt, negative_prompt, guidance)
        rank = rank_and_world()[0]
        warm = gits.warm_up(denoiser, denoiser.shape, teacher=teacher, teacher_steps=teacher_steps,
                            base_schedule=base_schedule, warmup=warmup, first_seed=first_seed, batch=batch,
                            metric=metric, cond=cond, device=device, model_name=model, progress=rank == 0,
                            keep_endpoints=afs, student=solver if metric == "solver" else None,
                            student_options=options if metric == "solver" else None)
        warm.settings["conditioning"] = cond.record          # recorded in every schedule file
        made = [(n, c, warm.schedule(n, solver, afs=afs, coeff=c, solver_options=options or None))
                for n in nfes for c in coeffs]          # every rank: the AFS search sums over ranks
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


@schedule_group.command("show")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--plain", is_flag=True, help="Print only the comma-separated sigmas (for diffusers sigmas= / ComfyUI).")
def schedule_show(path, plain):
    """Print a schedule file: how it was made, then the sigmas as a plain list."""
    from . import runtime as rt
    from ..schedules import Schedule
    with rt.user_errors():
        schedule = Schedule.load(path)
    if not plain:
        for key, value in schedule.info.items():
            click.echo(f"{key}: {value}")
        click.echo("sigmas:")
    click.echo(str(schedule))
