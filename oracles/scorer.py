"""A judge from any Python callable ``text -> score`` (a rule, a classifier, a heuristic).

    compo model=tiny optimizer=compo oracle=scorer oracle.judge.scorer=mypkg.rules.politeness

The callable is named by a dotted import path (``package.module.function``) so the config stays
plain text; it may also be passed directly when building the judge in Python. The higher score
wins; scores within ``epsilon`` of each other are a tie.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from hydra.utils import get_object

from compo.interfaces import (
    CompoError,
    Judgement,
    OracleError,
    OutputJudge,
    Verdict,
    finite_scores,
    settings,
)

_WORD = re.compile(r"[A-Za-z]+")
_PLAIN = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?'\"-:;()\n")


def readable_text(text: str) -> float:
    """A simple rule: rewards readable, non-repetitive text of moderate length.

    Score in [0, 1]: (share of plain ASCII characters) x (share of distinct words) x (a length
    factor that saturates at 20 characters). A tiny random model's byte soup scores low, a fluent
    sentence high; it is a plumbing test, not a measure of quality.
    """
    if not text.strip():
        return 0.0
    plain = sum(ch in _PLAIN for ch in text) / len(text)
    words = _WORD.findall(text.lower())
    distinct = len(set(words)) / len(words) if words else 0.0
    return plain * (0.5 + 0.5 * distinct) * min(1.0, len(text.strip()) / 20.0)


def prompt_overlap(prompt: str, text: str, target_length: int = 200) -> float:
    """For ``with_prompt: true``: share of the prompt's words echoed, minus a length penalty."""
    words, ref = set(_WORD.findall(text.lower())), set(_WORD.findall(prompt.lower()))
    overlap = len(words & ref) / len(ref) if ref else readable_text(text)
    return overlap - max(0, len(text) - target_length) / max(target_length, 1)


def _locate(path: str) -> Any:
    """``hydra.utils.get_object`` without its error log (the caller reports in one line)."""
    hydra_log = logging.getLogger("hydra.utils")
    disabled, hydra_log.disabled = hydra_log.disabled, True
    try:
        return get_object(path)
    finally:
        hydra_log.disabled = disabled


def resolve_callable(path: str, where: str) -> Callable[..., Any]:
    """The callable that the dotted path ``package.module.name`` names.

    Also found in the working directory, as ``python -m`` would: the ``compo`` console script does
    not put it on ``sys.path``, and a scorer in the user's own project (``mypkg.rules.score`` next
    to their data) should still be found.

    Raises:
        CompoError: One line naming ``where``, the path and why it cannot be used.
    """
    try:
        try:
            target = _locate(path)
        except ImportError:
            if os.getcwd() in sys.path:
                raise
            sys.path.append(os.getcwd())
            target = _locate(path)
    except (ImportError, ValueError) as exc:
        # Hydra's messages run over several lines; the cause (or the first line) says it all.
        reason = str(exc.__cause__ or exc).strip().splitlines() or [type(exc).__name__]
        raise CompoError(f"{where}: cannot load {path!r}: {reason[0]}") from None
    if not callable(target):
        raise CompoError(f"{where}: {path!r} is a {type(target).__name__}, not callable")
    return target


class ScorerJudge(OutputJudge):
    """Judges two responses by a score function of the response text.

    Args:
        scorer: Dotted import path of a callable ``text -> float`` (or the callable itself).
        epsilon: Scores closer than this are a tie.
        with_prompt: Call ``scorer(prompt, text)`` instead of ``scorer(text)``.
        batched: The callable takes lists, ``scorer(prompts, texts) -> list[float]``: one call
            per batch of texts (e.g. a neural scorer); implies ``with_prompt``.
    """

    name = "scorer"

    def __init__(
        self,
        scorer: str | Callable[..., Any] = "oracles.scorer.readable_text",
        epsilon: float = 0.0,
        with_prompt: bool = False,
        batched: bool = False,
    ) -> None:
        if callable(scorer):
            self.scorer, self._scorer = getattr(scorer, "__name__", "?"), scorer
        else:
            self.scorer, self._scorer = settings.text("oracle.judge.scorer", scorer), None
        self.epsilon = settings.number("oracle.judge.epsilon", epsilon, ge=0)
        self.with_prompt = settings.flag("oracle.judge.with_prompt", with_prompt)
        self.batched = settings.flag("oracle.judge.batched", batched)
        self._lock = threading.Lock()
        self.counts = {"calls": 0, "identical": 0, "texts_scored": 0}

    def check(self) -> None:
        """Resolves the scorer (a bad import path fails here, before any model work)."""
        if self._scorer is None:
            self._scorer = resolve_callable(self.scorer, "oracle.judge.scorer")

    def _call(self, prompts: Sequence[str], texts: Sequence[str]) -> list[float]:
        """The scorer's values; a failure or a non-finite value is an :class:`OracleError`."""
        try:
            if self.batched:
                values = list(self._scorer(list(prompts), list(texts)))
                if len(values) != len(texts):
                    raise ValueError(f"returned {len(values)} scores for {len(texts)} texts")
            elif self.with_prompt:
                values = [self._scorer(p, t) for p, t in zip(prompts, texts, strict=True)]
            else:
                values = [self._scorer(t) for t in texts]
            values = [float(v) for v in values]
        except Exception as exc:  # the scorer is user code: report it, never guess a verdict
            raise OracleError(
                f"oracle.scorer: {self.scorer} failed: {type(exc).__name__}: {exc}"
            ) from exc
        return finite_scores(f"{type(self).__name__} ({self.scorer})", values)

    def score(self, prompts: Sequence[str], texts: Sequence[str]) -> list[float]:
        """The scorer's value of each (prompt, text); a non-finite one is an OracleError."""
        self.check()
        with self._lock:
            self.counts["texts_scored"] += len(texts)
        return self._call(prompts, texts) if texts else []

    def judge(self, prompt: str, current: str, perturbed: str) -> Judgement:
        """PERTURBED_BETTER when ``perturbed`` scores more than ``epsilon`` above ``current``."""
        if current == perturbed:
            with self._lock:
                self.counts["identical"] += 1
            return Judgement(Verdict.TIE, 1.0, "identical responses")
        self.check()
        with self._lock:
            self.counts["calls"] += 1
            self.counts["texts_scored"] += 2
        a, b = self._call([prompt, prompt], [current, perturbed])
        if abs(a - b) <= self.epsilon:
            return Judgement(Verdict.TIE, None, f"scores {a:.4g} vs {b:.4g} within epsilon")
        verdict = Verdict.PERTURBED_BETTER if b > a else Verdict.CURRENT_BETTER
        return Judgement(verdict, None, f"scores current {a:.4g}, perturbed {b:.4g}")

    def usage(self) -> dict[str, int]:
        """Counters for ``metrics.json``."""
        with self._lock:
            return dict(self.counts)
