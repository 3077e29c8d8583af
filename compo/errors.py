"""Errors a user can cause.

Anything raised as :class:`CompoError` is a user mistake (bad file, missing field, model not
installed, unreachable server) rather than a bug. The CLI prints its message as a single line and
exits with status 2, without a traceback; every other exception is a bug and keeps its traceback.
"""

MAX_LINE = 300  # characters of a library's message kept in a one-line error


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none): libraries'
    messages run to several lines, and compo's errors are one.

    A first line ending in a colon announces what follows ("Error loading 'x.Y':", "from one
    of:"): the lines after it are joined to it, up to :data:`MAX_LINE` characters.
    """
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if not lines[0].endswith(":"):
        return lines[0]
    text = " ".join(lines)
    return text if len(text) <= MAX_LINE else text[: MAX_LINE - 3] + "..."


class CompoError(Exception):
    """A user-facing error whose message says what went wrong and where.

    Attributes:
        secrets: Values of the config the error refused because they look secret (a key typed
            where a variable name belongs, credentials in a URL). The message never repeats
            them; the CLI scrubs them from Hydra's copy of the config, written before any check.
    """

    secrets: tuple[str, ...] = ()


class DataError(CompoError):
    """A preference file (or one of its rows) cannot be used."""


class ModelLoadError(CompoError):
    """A policy or reference model cannot be located or loaded."""
