"""Command line: thin commands over the package API (also ``python -m diffsampler``).

    diffsampler list | sample | schedule gits|show | learn METHOD | amed train | distill | fid ref|calc|run |
                analyze | train model|classifier

Each command is a module here; their shared option groups are :mod:`.options` (no torch import,
so ``--help`` and usage errors answer at once) and what they do with the parsed options is
:mod:`.runtime` (devices, processes, models, conditioning, plans).
"""
import click

from .. import __version__
from . import analyze, distill, fid, learn, listing, sample, schedule, tools


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="diffsampler")
def main():
    """Fast sampling of diffusion models by solving their probability-flow ODE."""


for command in (listing.list_command, sample.sample_command, schedule.schedule_group, learn.learn_command,
                learn.amed_group, distill.distill_command, fid.fid_group, analyze.analyze_command, tools.train_group):
    main.add_command(command)
