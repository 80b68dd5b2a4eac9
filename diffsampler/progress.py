"""Progress bars (tqdm) that read well both on a terminal and in a log file.

On a terminal the bar redraws in place; when stderr is not a terminal (a CI log, ``nohup``, a
file) it writes a line at most every 30 seconds, so logs do not fill with repeated bar lines.
"""
from __future__ import annotations

import sys


def bar(iterable=None, *, total=None, desc: str = "", unit: str = "it", leave: bool = True, initial: int = 0):
    from tqdm.auto import tqdm
    interactive = sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, initial=initial,
                mininterval=0.1 if interactive else 30.0, dynamic_ncols=interactive)
