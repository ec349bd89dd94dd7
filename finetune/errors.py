"""Errors meant for the user: printed as one line, exit code 2, no traceback."""

import sys


class UserError(Exception):
    """Something in the user's config, paths or data is wrong; the message says where and what to do."""


def run_cli(body) -> int:
    """Run a command's body: a UserError is one line on stderr and exit code 2, Ctrl-C exit code 130."""
    try:
        return body() or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
