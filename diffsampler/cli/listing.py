"""``diffsampler list``: the solvers, their aliases, the schedules and the learned samplers."""
from __future__ import annotations

import click


def _first_line(text: str) -> str:
    """The first sentence-line of a docstring, without reST markup."""
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line.replace("``", "").replace(":func:", "").replace("`", "")


def _table(rows):
    widths = [max(len(str(r[k])) for r in rows) for k in range(len(rows[0]))]
    return ["  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


@click.command("list")
def list_command():
    """List the solvers (order, NFE rule, default schedule), aliases, schedules and learned samplers."""
    from ..learned import LEARNED
    from ..schedules import SCHEDULE_ALIASES, SCHEDULES
    from ..solvers import ALIASES, SOLVERS
    click.echo("Solvers:")
    rows = [("name", "order", "NFE rule", "default schedule", "method")]
    for name, cls in SOLVERS.items():
        solver = cls()
        schedule = cls.default_schedule + "".join(f" {k}={v}" for k, v in cls.default_schedule_options.items())
        rows.append((name, solver.order, cls.nfe_rule(), schedule, cls.summary))
    for line in _table(rows):
        click.echo(line)
    click.echo("Aliases:")
    for line in _table([(alias, f"= {target}" + "".join(f" {k}={v}" for k, v in fixed.items()), text)
                        for alias, (target, fixed, text) in ALIASES.items()]):
        click.echo(line)
    click.echo("Schedules:")
    rows = [(name, _first_line(fn.__doc__)) for name, fn in SCHEDULES.items()]
    rows += [(alias, f"= {target}") for alias, target in SCHEDULE_ALIASES.items()]
    for line in _table(rows):
        click.echo(line)
    click.echo("  (or a schedule file: JSON written by `diffsampler schedule gits` or Schedule.save)")
    click.echo("Learned samplers (diffsampler learn METHOD):")
    for line in _table([(name, cls.summary) for name, cls in LEARNED.items()]):
        click.echo(line)
