"""Errors the CLI reports with exit code 2 (bad input, nothing started). Imports nothing heavy."""


class UsageError(Exception):
    """A request clgrid refuses before starting anything: the message says what was expected."""


class SpecError(Exception):
    """A spec that cannot run; ``problems`` holds every ``file:line: field.path: message`` line."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems
