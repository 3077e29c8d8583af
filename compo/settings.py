"""Domain checks for settings, made where a setting is constructed.

Hydra hands constructors whatever the command line said: ``nan``, ``-3``, ``lots``. A value outside
its domain must stop the run with one line naming the config key and the allowed range, before any
work; a NaN step size that trains and saves a NaN model is the failure this prevents. Every
constructor checks its own numeric arguments with :func:`number` (one mechanism, one message shape)
and names the key as the user writes it (``optimizer.step_size``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from compo.errors import CompoError


class SettingError(CompoError):
    """A setting is outside its domain (the message names the config key and the range)."""


def _domain(integer: bool, gt, ge, lt, le) -> str:
    kind = "an integer" if integer else "a finite number"
    low = f"({gt}" if gt is not None else (f"[{ge}" if ge is not None else None)
    high = f"{lt})" if lt is not None else (f"{le}]" if le is not None else None)
    if low and high:
        return f"{kind} in {low}, {high}"
    if low:
        return f"{kind} {'>' if gt is not None else '>='} {low[1:]}"
    if high:
        return f"{kind} {'<' if lt is not None else '<='} {high[:-1]}"
    return kind


def number(
    key: str,
    value: Any,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    integer: bool = False,
    optional: bool = False,
) -> Any:
    """Returns ``value`` if it is a number in the domain, else raises :class:`SettingError`.

    Args:
        key: The config key as the user writes it, e.g. ``optimizer.step_size``.
        value: What the constructor received.
        gt: Exclusive lower bound.
        ge: Inclusive lower bound.
        lt: Exclusive upper bound.
        le: Inclusive upper bound.
        integer: Only integers (``2.0`` is refused: a count given as a float is a typo).
        optional: None is allowed (it means "off" for this setting).

    Returns:
        ``value``, an int when ``integer`` else a float.
    """
    if value is None and optional:
        return None
    domain = _domain(integer, gt, ge, lt, le) + (" or null" if optional else "")
    # bool is an int subclass; `true` for a count is a mistake, not 1. Python ints are finite
    # (and math.isfinite overflows on a 400-digit one).
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    finite = ok_type and (isinstance(value, int) or math.isfinite(value))
    if isinstance(value, bool) or not finite:
        raise SettingError(f"{key} must be {domain}, {_got(key, value)}")
    if (
        (gt is not None and not value > gt)
        or (ge is not None and not value >= ge)
        or (lt is not None and not value < lt)
        or (le is not None and not value <= le)
    ):
        raise SettingError(f"{key} must be {domain}, {_got(key, value)}")
    if not integer and isinstance(value, int) and abs(value) > 1e308:  # beyond float range
        raise SettingError(f"{key} must be {domain}, {_got(key, value)}")
    return value if integer else float(value)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _got(key: str, value: Any) -> str:
    """``got <value>``, and how to decode it when a number or flag arrived as text."""
    if isinstance(value, str) and _decodes(value):
        # Hydra's oc.env always gives text: seed=${oc.env:SEED,3} arrives as '3'. The single
        # quotes keep the shell off the $, the double ones make Hydra read the value whole.
        return (
            f"got {_shown(value)} (text, as ${{oc.env:...}} gives: decode it, on the command "
            f"line '{key}=\"${{oc.decode:${{oc.env:VAR,{value}}}}}\"')"
        )
    return f"got {_shown(value)}"


def _decodes(text: str) -> bool:
    """Whether ``text`` reads as a number or a boolean (what ``oc.decode`` would make of it)."""
    if text.strip().lower() in ("true", "false"):
        return True
    try:
        float(text)
    except ValueError:
        return False
    return True


SEED_MAX = 2**63 - 1  # torch.manual_seed takes a signed 64-bit integer


def seed(key: str, value: Any) -> int:
    """Returns ``value`` if it is a seed torch accepts: an integer in [0, 2**63 - 1]."""
    return number(key, value, integer=True, ge=0, le=SEED_MAX)


def flag(key: str, value: Any, *, optional: bool = False) -> bool | None:
    """Returns ``value`` if it is true or false (or None when ``optional``).

    A word such as ``no`` reaches a constructor as a string, and a non-empty string is truthy:
    it would switch the option on.
    """
    if (value is None and optional) or isinstance(value, bool):
        return value
    domain = "true or false" + (" or null" if optional else "")
    raise SettingError(f"{key} must be {domain}, {_got(key, value)}")


def text(key: str, value: Any, *, optional: bool = False) -> str | None:
    """Returns ``value`` if it is a string (or None when ``optional``), e.g. a file path."""
    if (value is None and optional) or isinstance(value, str):
        return value
    domain = "a string" + (" or null" if optional else "")
    raise SettingError(f"{key} must be {domain}, {_got(key, value)}")


def path(key: str, value: Any, *, null: str) -> str | None:
    """Returns ``value`` if it is a non-blank string or None, e.g. a data file.

    An empty path is refused rather than read as null: ``data.path=$DATA`` with ``DATA`` unset
    must not quietly use what null stands for.

    Args:
        key: The config key, for the message.
        value: The setting.
        null: What null means here, for the message (``none``, ``the embedded default set``).
    """
    if text(key, value, optional=True) is not None and not value.strip():
        raise SettingError(f"{key} is empty; give a file, or null for {null}")
    return value


def required(key: str, value: Any, *, missing: str) -> str:
    """Returns ``value`` if it is a non-blank string (a model to load, say).

    Args:
        key: The config key, for the message.
        value: The setting.
        missing: What to say when it is null, empty or blank, e.g. ``no model given; set it
            to ...``.
    """
    if not (text(key, value, optional=True) or "").strip():
        raise SettingError(f"{key}: {missing}")
    return value


def names(key: str, value: Any) -> list[str]:
    """Returns ``value`` as a list if it is a list of strings (``foo`` alone is not a list)."""
    # Sequence: Hydra hands over a ListConfig, not a list.
    if (
        not isinstance(value, str)
        and isinstance(value, Sequence)
        and all(isinstance(v, str) for v in value)
    ):
        return list(value)
    raise SettingError(f"{key} must be a list of names, e.g. [a.b, c.d], got {_shown(value)}")


def choice(key: str, value: Any, options: Iterable[Any]) -> Any:
    """Returns ``value`` if it is one of ``options``, else raises :class:`SettingError`."""
    options = list(options)
    if value not in options:
        raise SettingError(f"{key}: {value!r} is not one of {options}")
    return value


def device(key: str, value: Any) -> str:
    """Returns the device to run on: ``value`` if torch knows it and this machine has it.

    ``auto`` is ``cuda`` when a CUDA GPU is present, else ``cpu``. Apple's ``mps`` is used only
    when asked for by name: not every operation compo runs has an MPS kernel.

    Args:
        key: The config key (``device``).
        value: ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ``mps``...
    """
    import torch  # here, not at module level: oracles import this module without torch

    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(value)
    except (RuntimeError, TypeError):
        raise SettingError(
            f"{key}: {value!r} is not a device torch knows (auto, cpu, cuda, cuda:1, mps)"
        ) from None
    available = {
        "cpu": lambda: True,
        "cuda": lambda: (
            torch.cuda.is_available()
            and (parsed.index is None or parsed.index < torch.cuda.device_count())
        ),
        "mps": lambda: torch.backends.mps.is_available(),
    }
    # Other types torch parses (xpu, meta, ...) are not devices compo runs on.
    if not available.get(parsed.type, lambda: False)():
        raise SettingError(f"{key}={value}: this machine has no such device (use {key}=cpu)")
    return value


DTYPES = ("auto", "float32", "bfloat16", "float16")


def dtype(key: str, value: Any, on: str) -> str:
    """Returns the dtype name the model's trunk is loaded in.

    ``auto`` is ``bfloat16`` on a CUDA GPU that supports it, else ``float32`` (CPUs, older GPUs:
    ``float16`` must be asked for, its range overflows in some models).

    Args:
        key: The config key (``dtype``).
        value: One of :data:`DTYPES`.
        on: The resolved device (see :func:`device`).
    """
    choice(key, value, DTYPES)
    if value != "auto":
        return value
    import torch

    if torch.device(on).type == "cuda" and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"
