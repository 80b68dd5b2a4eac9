"""Option groups shared by the commands, and parsers of their values.

Nothing here imports torch: ``--help`` and usage errors answer at once.  Names that come from a
registry (solvers, schedules, learned methods) are plain strings here and are checked when the
command runs, with an error that lists the valid names (``diffsampler list`` shows them all).
"""
from __future__ import annotations

from pathlib import Path

import click

from ..defaults import DEFAULT_MODEL

DTYPE_NAMES = ("float32", "float64", "float16", "bfloat16")


def parse_value(text: str):
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


def parse_options(pairs, flag: str) -> dict:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint=flag)
        options[key.replace("-", "_")] = parse_value(value)
    return options


def parse_sigmas(text):
    if text is None:
        return None
    try:
        return [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint="--sigmas") from None


def parse_seed_list(text: str, flag: str = "--seeds"):
    from ..seeds import parse_seeds
    try:
        return parse_seeds(text)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint=flag) from None


def stack(*decorators):
    """One decorator applying several option decorators in the order written."""
    def apply(f):
        for decorator in reversed(decorators):
            f = decorator(f)
        return f
    return apply


model_options = stack(
    click.option("--model", default=DEFAULT_MODEL, show_default=True,
                 help="Model spec: fashion-mnist, digits, gmm:digits[:STD], gmm:synthetic:K:CxHxW[:SEED], "
                      "diffusers:DIR, edm:PATH.pkl (README, Models)."),
    click.option("--trust-pickle", is_flag=True, default=False,
                 help="Allow pickled models (edm:PATH.pkl): unpickling runs code from the file, so only for files "
                      "you trust."),
    click.option("--height", type=click.IntRange(min=1), default=None,
                 help="Image height of a latent pipeline (Stable Diffusion, SDXL, SD3, Flux; default its own)."),
    click.option("--width", type=click.IntRange(min=1), default=None,
                 help="Image width of a latent pipeline (default its own)."),
)

device_options = stack(
    click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, mps, ..."),
    click.option("--dtype", type=click.Choice(DTYPE_NAMES), default="float32", show_default=True,
                 help="Dtype the model sees (solver arithmetic is float64 where the device has it)."),
)

conditioning_options = stack(
    click.option("--class", "class_label", type=click.IntRange(min=0), default=None,
                 help="Class index for a class-conditional model (default: a random class per seed)."),
    click.option("--prompt", default=None, help="Text prompt (text-to-image models)."),
    click.option("--negative-prompt", default=None, help="Negative prompt: the unconditional half of guidance."),
    click.option("--guidance", type=click.FloatRange(min=0), default=1.0, show_default=True,
                 help="Classifier-free guidance scale (1 = none, 0 = unconditional). NFE counts guided "
                      "evaluations, each one batched cond+uncond model call."),
)


def request_options(default_solver_help: str = "default ipndm"):
    """--solver, --nfe/--steps, the grid, solver options, AFS and denoise-to-zero."""
    return stack(
        click.option("--solver", default=None,
                     help=f"Solver name or alias ({default_solver_help}; `diffsampler list` shows all)."),
        click.option("--nfe", type=click.IntRange(min=1), default=None, help="Model evaluations per sample."),
        click.option("--steps", type=click.IntRange(min=1), default=None,
                     help="Solver steps instead of --nfe (k-diffusion/ComfyUI's count)."),
        click.option("--schedule", default=None,
                     help="Schedule name (polynomial/karras, logsnr/exponential, ...; `diffsampler list`) or a "
                          "schedule file; default: the solver's own."),
        click.option("--schedule-option", "schedule_option", multiple=True, metavar="KEY=VALUE",
                     help="Schedule parameter, e.g. rho=5 (repeatable)."),
        click.option("--sigmas", default=None,
                     help="Explicit descending grid, e.g. 80,10.9,1.6,0.2,0.002 (replaces --nfe/--schedule)."),
        click.option("--sigma-min", type=float, default=None, help="Default: the model's."),
        click.option("--sigma-max", type=float, default=None, help="Default: the model's."),
        click.option("--max-order", type=int, default=None, help="Multistep order (solvers that have one)."),
        click.option("--option", "solver_option", multiple=True, metavar="KEY=VALUE",
                     help="Other solver option, e.g. r=0.5 or variant=bh1 (repeatable)."),
        click.option("--afs/--no-afs", default=None,
                     help="Analytical first step (saves one evaluation). Default: off, or what a schedule file records."),
        click.option("--denoise-to-zero/--no-denoise-to-zero", default=False, show_default=True,
                     help="End with one more evaluation, x = D(x, sigma_min)."),
    )


def learned_options(f):
    f = click.option("--amed", "amed_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="AMED predictor file (same as --learned).")(f)
    f = click.option("--learned", "learned_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="Learned-sampler file (diffsampler learn ...): samples with the solver, grid and AFS it "
                          "was trained for.")(f)
    return f


def seeds_option(default: str):
    return click.option("--seeds", default=default, show_default=True,
                        help="Seeds: ranges and lists, e.g. 0-63 or 1,5,10-20.")


def batch_option(default: int = 64):
    return click.option("--batch", type=click.IntRange(min=1), default=default, show_default=True,
                        help="Samples per batch (per process).")


def outdir_option(help_text: str):
    """A folder to write: ``--outdir``."""
    return click.option("--outdir", type=click.Path(file_okay=False, path_type=Path), required=True, help=help_text)


def out_option(help_text: str, required: bool = True):
    """A file to write: ``--out`` (``--dest`` is EDM's name for it)."""
    return click.option("--out", "--dest", "out", type=click.Path(dir_okay=False, path_type=Path),
                        required=required, help=help_text)
