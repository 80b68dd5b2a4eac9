"""The ``diffsampler`` command's entry point: Ctrl-C at any moment ends with one line, never a traceback.

An interrupt arriving in the middle of an import (torch loads inside the commands, and a
half-finished C-extension import fails in odd ways afterwards) or in code that swallows
KeyboardInterrupt would not end the command cleanly, so SIGINT ends the process at once, with
exit status 130.  Nothing finished is lost: every file the commands write is written atomically
(a temporary file and a rename; a run's leftover temporaries are removed by the next run), and
resumable jobs continue where they stopped.
"""
import os
import signal
import sys


def _interrupted(signum, frame) -> None:
    try:
        sys.stdout.flush()
    finally:
        os.write(2, b"interrupted\n")
        os._exit(130)


def main() -> None:
    signal.signal(signal.SIGINT, _interrupted)
    from .cli import main as cli
    cli(prog_name="diffsampler")
