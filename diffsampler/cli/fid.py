"""``diffsampler fid ref | calc | run``: reference statistics, scoring, sample-and-score."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..metrics import CLASSIFIER, FEATURE_LAYERS
from .options import (conditioning_options, learned_options, model_options, out_option, outdir_option,
                      request_options, stack)

extractor_options = stack(
    click.option("--device", default="cpu", show_default=True),
    click.option("--batch", type=click.IntRange(min=1), default=250, show_default=True),
    click.option("--inception-weights", type=click.Path(dir_okay=False), default=None,
                 help="Local Inception-v3 weights (or set DIFFSAMPLER_INCEPTION_WEIGHTS)."),
)


@click.group("fid")
def fid_group():
    """FID (and KID, precision/recall) on torch-fidelity: reference statistics, scoring, sample-and-score."""


@fid_group.command("ref")
@click.option("--data", required=True, help="Folder of images, .npz, or a bundled dataset (fashion-mnist:train, ...).")
@out_option("Reference .npz to write.")
@click.option("--extractor", type=click.Choice(list(FEATURE_LAYERS)), default=CLASSIFIER, show_default=True)
@click.option("--keep-features", type=click.IntRange(min=0), default=2000, show_default=True,
              help="Also store this many features (for KID / precision-recall against the reference).")
@extractor_options
def fid_ref(data, out, extractor, keep_features, inception_weights, batch, device):
    """Compute reference statistics (mu, sigma) of a dataset."""
    from . import runtime as rt
    from ..distributed import rank_and_world
    from ..metrics import pipeline
    with rt.user_errors():
        device = rt.init_distributed(device)
        features = pipeline.features(data, extractor, batch=batch, device=device, inception_weights=inception_weights,
                                     progress=True)
    if rank_and_world()[0] == 0:
        pipeline.save_reference(out, features, extractor, keep_features, source=str(data))
        click.echo(f"wrote {out}: {len(features)} images, {features.shape[1]} features ({extractor})")


@fid_group.command("calc")
@click.option("--images", required=True, help="Folder of images or .npz.")
@click.option("--ref", type=click.Path(dir_okay=False), required=True, help="Reference statistics (.npz).")
@click.option("--kid", "with_kid", is_flag=True, help="Also KID (needs reference features).")
@click.option("--prc", "with_prc", is_flag=True, help="Also precision/recall (needs reference features).")
@extractor_options
def fid_calc(images, ref, with_kid, with_prc, inception_weights, batch, device):
    """Score a set of images against reference statistics (the extractor is the reference's)."""
    from . import runtime as rt
    from ..distributed import rank_and_world
    from ..metrics import pipeline
    metrics = ["fid"] + (["kid"] if with_kid else []) + (["prc"] if with_prc else [])
    with rt.user_errors():
        device = rt.init_distributed(device)
        result = pipeline.score(images, ref, metrics, batch=batch, device=device, inception_weights=inception_weights,
                                progress=True)
    if rank_and_world()[0] == 0:
        _warn_if_small(result)
        click.echo(json.dumps(result))


def _warn_if_small(result) -> None:
    if "warning" in result:
        click.echo(f"warning: {result['warning']}", err=True)


@fid_group.command("run")
@model_options
@request_options()
@learned_options
@conditioning_options
@click.option("--num", type=click.IntRange(min=2), default=10000, show_default=True, help="Images per seed block.")
@click.option("--blocks", type=click.IntRange(min=1), default=1, show_default=True,
              help="Seed blocks (block k uses seeds k*num .. (k+1)*num-1); each is scored, then min and mean.")
@click.option("--ref", type=click.Path(dir_okay=False), default=None, help="Reference statistics (default: the bundled model's).")
@outdir_option("Folder for the image blocks and fid.json.")
@click.option("--sample-batch", type=click.IntRange(min=1), default=64, show_default=True)
@extractor_options
def fid_run(model, trust_pickle, height, width, class_label, prompt, negative_prompt, guidance, num, blocks, ref, outdir,
            sample_batch, inception_weights, batch, device, **request):
    """Sample and score (the EDM protocol): N images per seed block, FID of each block, min and mean."""
    from . import runtime as rt
    from ..fileio import write_atomic
    from ..metrics import pipeline
    from .sample import sample_images
    ref = ref or str(pipeline.BUNDLED_REFERENCE)
    scores, plan = [], None
    with rt.user_errors():
        reference = pipeline.load_reference(ref)
    for k in range(blocks):
        block_dir = Path(outdir) / f"block{k}"
        plan, _ = sample_images(model, trust_pickle, height, width, f"{k * num}-{(k + 1) * num - 1}", sample_batch, block_dir, False,
                                False, None, device, "float32", class_label, prompt, negative_prompt, guidance, **request)
        with rt.user_errors():
            scores.append(pipeline.score(block_dir, reference, ["fid"], batch=batch, device=device,
                                         inception_weights=inception_weights, progress=True))
        _warn_if_small(scores[-1])
        click.echo(f"block {k}: FID {scores[-1]['fid']:.4f} ({reference['extractor']})")
    values = [s["fid"] for s in scores]
    record = plan.record
    summary = {"model": model, "solver": record["solver"], "nfe": record["nfe"], "schedule": record["schedule"],
               "sigmas": record["sigmas"], "afs": record["afs"], "learned": record["learned"],
               "conditioning": {"class": class_label, "prompt": prompt, "guidance": guidance},
               "num": num, "blocks": blocks, "extractor": reference["extractor"], "fid": values,
               "fid_min": min(values), "fid_mean": sum(values) / len(values), "reference": ref,
               **({"warning": scores[0]["warning"]} if "warning" in scores[0] else {})}
    write_atomic(Path(outdir) / "fid.json", json.dumps(summary, indent=2, default=str).encode() + b"\n")
    click.echo(json.dumps(summary, default=str))
