"""``diffsampler train model | classifier``: the training programs of :mod:`diffsampler.tools`."""
from __future__ import annotations

import sys

import click

FORWARD = {"context_settings": {"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []}}


@click.group("train")
def train_group():
    """Train the bundled models (the diffusion U-Net, the FID classifier)."""


@train_group.command("model", **FORWARD)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def train_model(args):
    """Train (or resume) an EDM U-Net on a small dataset; `diffsampler train model --help` lists its options."""
    from ..tools.train_unet import main
    from .runtime import user_errors
    with user_errors():
        code = main(list(args))
    sys.exit(code)


@train_group.command("classifier", **FORWARD)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def train_classifier(args):
    """Train the Fashion-MNIST classifier; `diffsampler train classifier --help` lists its options."""
    from ..tools.train_classifier import main
    from .runtime import user_errors
    with user_errors():
        code = main(list(args))
    sys.exit(code)
