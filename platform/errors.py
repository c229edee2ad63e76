"""Errors the CLI reports as one line with exit code 2 (bad input, nothing started)."""


class UsageError(Exception):
    """A request clgrid refuses before starting anything: the message says what was expected."""
