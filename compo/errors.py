"""Errors a user can cause.

Anything raised as :class:`CompoError` is a user mistake (bad file, missing field, model not
installed, unreachable server) rather than a bug. The CLI prints its message as a single line and
exits with status 2, without a traceback; every other exception is a bug and keeps its traceback.
"""


class CompoError(Exception):
    """A user-facing error whose message says what went wrong and where."""


class DataError(CompoError):
    """A preference file (or one of its rows) cannot be used."""


class ModelLoadError(CompoError):
    """A policy or reference model cannot be located or loaded."""
