"""Comparison oracles: one verdict type, two structural protocols.

An oracle answers one question: is the perturbed model better than the current one? Two kinds
share :class:`Verdict`:

* :class:`ParameterOracle` compares the current perturbed weights with ``weights + delta`` on a few
  preference pairs, for many deltas at once (the likelihood oracle, ``oracles/likelihood.py``);
* :class:`OutputJudge` compares two responses to one prompt (reward model, LLM judge, human,
  scorer); it sees text only, so any outside code can implement it without importing compo.

Both are ``typing.Protocol`` classes: a backend is one module plus one YAML file with
``_target_``, nothing to register. An oracle that cannot decide (server down, unparsable answer)
abstains with ``Verdict.TIE`` and a ``reason``, or raises :class:`OracleError`; it never makes a
verdict up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Protocol, runtime_checkable


class Verdict(IntEnum):
    """The oracle's answer, valued as ComPO's y in Algorithm 2."""

    PERTURBED_BETTER = -1
    TIE = 0
    CURRENT_BETTER = 1


@dataclass(frozen=True)
class Judgement:
    """A verdict with optional confidence in [0, 1] and a human-readable reason."""

    verdict: Verdict
    confidence: float | None = None
    reason: str | None = None


class OracleError(RuntimeError):
    """The oracle failed and has no verdict to give (never replaced by a made-up one)."""


@runtime_checkable
class ParameterOracle(Protocol):
    """Compares the current weights with perturbed ones on preference pairs.

    ``begin`` is called once per iteration with the current weights; everything that does not
    depend on the perturbation is cached there. ``compare`` is then called with batches of
    perturbations (objects of :mod:`compo.zo.directions`, already scaled by the radius) and
    returns one verdict per perturbation: PERTURBED_BETTER when ``theta + delta`` beats ``theta``.
    """

    def begin(self, model: Any, params: Any, pairs: Sequence[Any], pad_token_id: int) -> Any:
        """Caches the state of the current weights for this iteration's pairs."""
        ...

    def compare(self, deltas: Any) -> list[Verdict]:
        """One verdict per perturbation in ``deltas``."""
        ...


@runtime_checkable
class OutputJudge(Protocol):
    """Compares two responses to one prompt (implemented by a later issue)."""

    def judge(self, prompt: str, current: str, perturbed: str) -> Judgement:
        """PERTURBED_BETTER if ``perturbed`` is the better reply to ``prompt``."""
        ...


def aggregate(votes: Sequence[Verdict], rule: str) -> Verdict:
    """Combines per-pair verdicts of one perturbation into one.

    Args:
        votes: One verdict per pair.
        rule: ``any`` (the authors' code: one pair improving suffices), ``majority`` (strictly
            more pairs say PERTURBED_BETTER than CURRENT_BETTER) or ``all``.

    Returns:
        The combined verdict; TIE when every pair abstained.
    """
    better = sum(v == Verdict.PERTURBED_BETTER for v in votes)
    worse = sum(v == Verdict.CURRENT_BETTER for v in votes)
    if better == 0 and worse == 0:
        return Verdict.TIE
    if rule == "any":
        ok = better > 0
    elif rule == "majority":
        ok = better > worse
    elif rule == "all":
        ok = worse == 0
    else:
        raise ValueError(f"aggregation {rule!r} is not one of any, majority, all")
    return Verdict.PERTURBED_BETTER if ok else Verdict.CURRENT_BETTER
