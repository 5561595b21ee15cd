"""Errors raised for user mistakes.

The command line turns a :class:`LeanvitError` into a one-line message and a non-zero exit status,
never a traceback. Library users can catch it (it subclasses ``ValueError``).
"""


class LeanvitError(ValueError):
    """A problem with the user's input: a bad argument, file, checkpoint or configuration."""
