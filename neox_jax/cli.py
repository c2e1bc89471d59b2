"""What every command shares: a usage mistake is one `error:` line and exit status 2; Ctrl-C exits with 130."""

from __future__ import annotations

import argparse
import os
import signal
import sys

INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (argparse prints the usage block, then `prog: error:`)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def exit_on_interrupt() -> None:
    """From now on Ctrl-C ends the process at once with status 130.

    Unwinding a KeyboardInterrupt while XLA's threads still run a computation, then finalizing the
    interpreter under them, ends about one run in seven in "pure virtual method called" or a segfault:
    `os._exit` skips both. Only for commands with nothing to clean up."""
    signal.signal(signal.SIGINT, _exit_interrupted)


def _exit_interrupted(signum, frame) -> None:
    try:
        sys.stdout.flush()  # what was generated so far
    except Exception:  # e.g. interrupted in the middle of a write to the same buffer
        pass
    os.write(2, b"\ninterrupted\n")
    os._exit(INTERRUPTED)
