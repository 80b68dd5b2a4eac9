"""``diffsampler learn METHOD``: train a learned sampler by distillation (``amed train`` is the
first version's name for ``learn amed``)."""
from __future__ import annotations


import click

from .options import model_options, out_option, parse_options, stack

training_options = stack(
    click.option("--nfe", type=click.IntRange(min=1), required=True, help="Model evaluations per sample."),
    click.option("--schedule", default=None, help="Schedule name or file for the base grid (default: the solver's)."),
    click.option("--schedule-option", "schedule_option", multiple=True, metavar="KEY=VALUE"),
    click.option("--afs/--no-afs", default=None, help="Analytical first step (default: the method's rule)."),
    click.option("--teacher", default=None, help="Teacher solver (default: the method's)."),
    click.option("--M", "extra", type=click.IntRange(min=0), default=None,
                 help="Teacher points inserted between two student points (default: the method's minimum teacher "
                      "steps)."),
    click.option("--batch", type=click.IntRange(min=1), default=32, show_default=True),
    click.option("--iters", type=click.IntRange(min=1), default=None, help="Training batches (default: the method's)."),
    click.option("--train-images", type=click.IntRange(min=1), default=None,
                 help="Distinct training seeds, cycled (default: iters x batch, every batch fresh)."),
    click.option("--lr", type=float, default=None, help="Adam learning rate (default: the method's)."),
    click.option("--seed", "first_seed", type=click.IntRange(min=0), default=1_000_000, show_default=True,
                 help="First training seed."),
    click.option("--val-images", type=click.IntRange(min=0), default=None,
                 help="Held-out validation seeds (from 2,000,000) that pick the best iterate (default: the "
                      "method's, 256; AMED 64)."),
    click.option("--confirm-images", type=click.IntRange(min=0), default=None,
                 help="Fresh seeds (from 2,500,000) on which the chosen iterate must beat the base again, else the "
                      "base is kept (default 0: off; it kept the base in more cells without avoiding a loss, "
                      "evaluation/README.md)."),
    click.option("--guidance", type=click.FloatRange(min=0), default=1.0, show_default=True,
                 help="Classifier-free guidance scale to train with."),
    click.option("--device", default="cpu", show_default=True),
)


def _train(method, model, trust_pickle, device, guidance, out, extra, schedule_option, height=None, width=None,
           **options):
    from . import runtime as rt
    from ..learned import learn
    with rt.user_errors():
        device = rt.init_distributed(device)
        denoiser = rt.load_on_device(model, device, trust_pickle=trust_pickle, height=height, width=width)
        if denoiser.conditioning == "text":
            raise ValueError(f"learn from the CLI takes pixel-space models; train text-to-image models from Python "
                             f"with diffsampler.learn({method!r}, ..., cond=...)")
        denoiser, cond = rt.conditioning(denoiser, None, None, None, guidance)
        sampler = learn(method, denoiser, denoiser.shape, M=extra, cond=cond if cond.inputs is not None else None,
                        schedule_options=parse_options(schedule_option, "--schedule-option") or None,
                        device=device, model_name=model, progress=True, **options)
    from ..distributed import rank_and_world
    if rank_and_world()[0] != 0:
        return
    sampler.save(out)
    info = sampler.settings
    first = " with AFS" if info["afs"] else ""
    first += ", plain first step" if info.get("plain_first") else ""
    confirmed = info.get("confirmation")
    confirmed = "" if confirmed is None else (f"; on {info['confirm_images']} fresh seeds {confirmed['neutral']:.4g} -> "
                                              f"{confirmed['learned']:.4g}, " + ("kept" if confirmed["kept"] else
                                                                                 "not significant: the base is kept"))
    click.echo(f"wrote {out}: {sampler.step_rule().label} at NFE {info['nfe']}{first}, {sampler.describe()}; "
               f"validation RMSE {info['validation'][0][1]:.4g} (neutral) -> "
               f"{dict(info['validation'])[max(info['best_iteration'], 0)]:.4g} (kept: iteration "
               f"{info['best_iteration']}){confirmed}; {info['train_seconds']:.1f} s")


@click.command("learn", context_settings={"show_default": True})
@click.argument("method")
@model_options
@click.option("--solver", default=None, help="Base solver (default: the method's).")
@training_options
@click.option("--option", "method_option", multiple=True, metavar="KEY=VALUE",
              help="A method option (repeatable), e.g. plain_first=true, scale_dir=0.1 (see the method's docs).")
@out_option("Learned-sampler file to write.")
def learn_command(method, model, trust_pickle, solver, method_option, out, **options):
    """Train learned sampler METHOD (`diffsampler list` shows them) by distillation from a teacher.

    Data-free: the teacher runs on fresh seeds; held-out validation seeds pick the best iterate,
    so the result is never worse than the base solver on them.  Scale out with torchrun."""
    _train(method, model, trust_pickle, options.pop("device"), options.pop("guidance"), out, options.pop("extra"),
           options.pop("schedule_option"), solver=solver, **options, **parse_options(method_option, "--option"))


@click.group("amed")
def amed_group():
    """AMED predictors (the first version's commands; `diffsampler learn amed` is the same)."""


@amed_group.command("train")
@model_options
@click.option("--solver", type=click.Choice(["amed", "euler", "ipndm", "dpmpp", "dpm2"]), default="amed",
              show_default=True, help="amed = AMED-Solver; a solver name = AMED-Plugin on that solver.")
@training_options
@click.option("--plain-first", is_flag=True, default=False,
              help="Odd NFE without AFS: step 0 is the base update with one evaluation and no intermediate point "
                   "(for data whose mean is far from 0, where AFS's zero-mean guess is poor).")
@click.option("--scale-dir", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="Learn a direction scale in [1-c, 1+c] (0 = off).")
@click.option("--scale-time", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="Learn a time scale in [1-c, 1+c] (0 = off).")
@click.option("--feature-module", default=None,
              help="Module whose output feeds the predictor (default: the model's bottleneck; 'denoised' = fallback).")
@out_option("Predictor file to write.")
def amed_train(model, trust_pickle, out, **options):
    """Distill an AMED predictor from a teacher solver (progress bar shows the loss)."""
    _train("amed", model, trust_pickle, options.pop("device"), options.pop("guidance"), out, options.pop("extra"),
           options.pop("schedule_option"), **options)
