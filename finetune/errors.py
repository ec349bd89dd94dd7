"""Errors meant for the user: printed as one line, exit code 2, no traceback."""


class UserError(Exception):
    """Something in the user's config, paths or data is wrong; the message says where and what to do."""
