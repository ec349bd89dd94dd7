"""Errors meant for the user: printed as one line, no traceback, with an exit code that tells them apart."""

import sys


class UserError(Exception):
    """Something in the user's config, paths or data is wrong; the message says where and what to do. ``code`` is
    the exit code (a subclass for what is not bad input, e.g. a full disk (finetune.disk.DiskFull), says 1)."""

    code = 2


class RunStopped(Exception):
    """Training stopped before its end on purpose: a signal (exit 128 + its number: 130 for Ctrl-C, 143 for SIGTERM)
    or a guard (exit 1); the message says what was kept and how to continue."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def run_cli(body) -> int:
    """Run a command's body: a UserError is one line on stderr and exit code 2 (a full disk 1), a stopped run its own
    code, Ctrl-C outside training 130."""
    try:
        return body() or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except RunStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
