"""``diffsampler analyze``: record sampling/denoising trajectories and measure their geometry."""
from __future__ import annotations

from pathlib import Path

import click

from .options import device_options, model_options, parse_seed_list, request_options, seeds_option

DEFAULT_SOLVER, DEFAULT_NFE = "heun", 60


@click.command("analyze")
@model_options
@request_options(default_solver_help=f"default {DEFAULT_SOLVER}, NFE {DEFAULT_NFE}")
@seeds_option("0-31")
@click.option("--class", "class_label", type=click.IntRange(min=0), default=None,
              help="Class index for a class-conditional model (default: a random class per seed, as sample).")
@click.option("--reference", default=None,
              help="Also compare the model's x0 estimates along its trajectories with this model spec's "
                   "(e.g. gmm:fashion-mnist, the optimal denoiser of the training set; evaluated unconditionally).")
@click.option("--show", type=click.IntRange(min=1), default=8, show_default=True, help="Trajectories in the 3-D figure.")
@click.option("--strips", type=click.IntRange(min=0), default=4, show_default=True, help="Seeds in the image strips.")
@click.option("--window", type=click.IntRange(min=4), default=7, show_default=True,
              help="Points per local cubic fit for curvature and torsion.")
@click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for figures and numbers.json.")
@device_options
def analyze_command(model, trust_pickle, height, width, seeds, class_label, reference, show, strips, window, batch, out, device,
                    dtype, **request):
    """Trajectory geometry: record sampling/denoising trajectories and write figures and numbers.json."""
    import time
    from . import runtime as rt
    from .. import __version__
    from ..analysis import record_trajectories
    from ..analysis.report import add_reference_gap, compute_geometry, summary_line, write_report
    from ..seeds import seed_noise

    seed_list = parse_seed_list(seeds)
    request["solver"] = request["solver"] or DEFAULT_SOLVER
    with rt.user_errors():
        device = rt.check_device(device)
        denoiser = rt.load_on_device(model, device, dtype, trust_pickle, height, width)
        ref_model = rt.load_on_device(reference, device, dtype, trust_pickle, height, width) if reference else None
        if ref_model is not None and tuple(ref_model.shape) != tuple(denoiser.shape):
            raise ValueError(f"--reference {reference!r} has sample shape {ref_model.shape}, "
                             f"the model {tuple(denoiser.shape)}")
        _, conditioning = rt.conditioning(denoiser, class_label)
        plan = rt.plan_from_options(denoiser, default_nfe=DEFAULT_NFE, device=device, **request)
        if plan.steps < 3:
            raise ValueError(f"trajectory geometry needs at least 3 steps (4 points), but {plan.solver.name} at NFE "
                             f"{plan.nfe} takes {plan.steps}; raise --nfe")
    cond = conditioning(seed_list)
    if cond is not None:
        cond = {k: v.to(device) for k, v in cond.items()}
    click.echo(f"recording {len(seed_list)} trajectories: model {model}, {plan.solver.name} NFE {plan.nfe} "
               f"({plan.steps} steps, sigma {plan.sigmas[0]:g} -> {plan.sigmas[-1]:g})")
    start = time.perf_counter()
    noise = seed_noise(seed_list, denoiser.shape, dtype=rt.DTYPES[dtype], device=device)
    traj = record_trajectories(denoiser, noise, plan=plan, cond=cond, batch_size=batch, store_device="cpu")
    recorded = time.perf_counter() - start
    click.echo(f"measuring ({recorded:.1f} s so far)")
    geom = compute_geometry(traj, window=window, label=f"{model}, {plan.solver.name} NFE {traj.nfe}")
    if ref_model is not None:
        click.echo(f"comparing with {reference} along the trajectories")
        add_reference_gap(geom, traj, denoiser, ref_model, reference, cond=cond, batch_size=batch,
                          dtype=rt.DTYPES[dtype])
    labels = conditioning.labels(seed_list)
    names = list(denoiser.class_names)
    seed_names = [f"seed {s}" + (f": {names[c] if c < len(names) else c}" if labels is not None else "")
                  for s, c in zip(seed_list, labels or [0] * len(seed_list))]
    info = {"model": model, **plan.record, "nfe": traj.nfe, "seeds": seed_list, "class_labels": labels,
            "shape": list(denoiser.shape), "dtype": dtype, "device": device, "diffsampler_version": __version__,
            "record_seconds": round(recorded, 3)}
    click.echo("writing figures")
    numbers = write_report(traj, geom, out, info=info, show=show, strips=strips, seed_names=seed_names, log=click.echo)
    click.echo(summary_line(numbers))
    click.echo(f"{len(seed_list)} trajectories analyzed in {time.perf_counter() - start:.1f} s; "
               f"figures and numbers.json in {out}")
