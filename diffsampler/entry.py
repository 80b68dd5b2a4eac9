"""The ``diffsampler`` command's entry point: imports nothing heavy before it can handle Ctrl-C.

An interrupt at any moment, start-up included (torch loads inside the commands), ends with one
line and a non-zero exit status, never a traceback (click reports one during a command as
"Aborted!").
"""
import sys


def main() -> None:
    try:
        from .cli import main as cli
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    cli(prog_name="diffsampler")
