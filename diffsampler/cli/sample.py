"""``diffsampler sample``: images (one PNG per seed), resumable, on one or many processes."""
from __future__ import annotations

from pathlib import Path

import click

from ..defaults import DEFAULT_NFE
from .options import (batch_option, conditioning_options, device_options, learned_options, model_options,
                      outdir_option, parse_seed_list, request_options, seeds_option)


@click.command("sample")
@model_options
@request_options()
@learned_options
@conditioning_options
@seeds_option("0-63")
@batch_option()
@outdir_option("Folder for the images, grid.png and settings.json.")
@click.option("--overwrite", is_flag=True, default=False,
              help="Delete images already in --outdir first (needed when they were made with other settings).")
@click.option("--grid/--no-grid", "write_grid", default=True, show_default=True, help="Also write grid.png.")
@click.option("--npz", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write all images as one .npz (samples: N x H x W x C uint8, seeds, labels).")
@device_options
def sample_command(model, trust_pickle, height, width, seeds, batch, outdir, overwrite, write_grid, npz, device, dtype,
                   class_label, prompt, negative_prompt, guidance, **request):
    """Sample images, one PNG per seed (in subfolders of 1000), plus a grid.

    Resumable: a rerun with the same settings skips the seeds already written (more seeds may be
    added); a folder holding images made with other settings is refused. Scale out with
    `torchrun --nproc_per_node N -m diffsampler sample ...` (seeds are split across processes).
    """
    plan, summary = sample_images(model, trust_pickle, height, width, seeds, batch, outdir, overwrite, write_grid, npz, device, dtype,
                                  class_label, prompt, negative_prompt, guidance, **request)
    from ..distributed import rank_and_world
    if rank_and_world()[0] == 0:
        rate = summary["new"] / summary["seconds"] if summary["seconds"] > 0 else float("nan")
        nfe = f"NFE per image {summary['nfe']}" if summary["nfe"] is not None else \
            f"NFE per image {plan.nfe} (by the plan; nothing new was sampled)"
        written = f"; wrote {npz}" if npz is not None else ""
        click.echo(f"{summary['images']} images in {outdir} ({summary['new']} new, "
                   f"{summary['images'] - summary['new']} already there); {nfe}; "
                   f"{summary['seconds']:.1f} s ({rate:.1f} images/s){written}")


def sample_images(model, trust_pickle, height, width, seeds, batch, outdir, overwrite, write_grid, npz, device, dtype, class_label,
                  prompt, negative_prompt, guidance, **request):
    """What ``sample`` does (also ``fid run``): (plan, summary of the run)."""
    seed_list = parse_seed_list(seeds)
    from . import runtime as rt
    from ..generate import SampleJob, StaleRunError, run
    with rt.user_errors():
        device = rt.init_distributed(device)
        denoiser = rt.load_on_device(model, device, dtype, trust_pickle, height, width)
        denoiser, cond = rt.conditioning(denoiser, class_label, prompt, negative_prompt, guidance)
        plan = rt.plan_from_options(denoiser, default_nfe=DEFAULT_NFE, device=device, **request)
        if denoiser.conditioning != "text" and denoiser.shape[0] not in (1, 3):
            raise ValueError(f"model {model!r} makes samples with {denoiser.shape[0]} channels, which cannot be "
                             "written as images (PNG needs 1 or 3 channels)")
        job = SampleJob(denoiser=denoiser, shape=denoiser.shape, plan=plan, seeds=seed_list, outdir=outdir,
                        batch=batch, dtype=rt.DTYPES[dtype], device=device, cond=cond, labels=cond.labels,
                        decode=denoiser.decode, settings=rt.run_settings(model, denoiser, plan, cond, dtype, device,
                                                                         seeds),
                        image_settings=rt.IMAGE_SETTINGS, write_grid=write_grid, npz=npz, overwrite=overwrite)
        try:
            return plan, run(job)
        except StaleRunError as err:
            raise click.UsageError(str(err)) from None
