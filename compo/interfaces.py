"""The contract between ComPO and its comparison oracles: the only compo module oracles/ imports.

An oracle answers one question: is the perturbed model better than the current one? Two
protocols share one verdict type:

* :class:`ComparisonOracle` is what the optimizer talks to. It compares the current weights with
  ``weights + delta`` for many deltas at once: the likelihood oracle (Definition 3.1 of the
  paper), an output-level judge behind generated responses, judge-labelled pairs, judge-scored
  samples. Every hook it may have is declared here with a no-op default; the optimizer passes what
  an oracle needs (iteration, the cached head) as arguments and never writes into the oracle.
* :class:`OutputJudge` compares two responses to one prompt (reward model, LLM judge, human,
  scorer). It sees text only. A scoring judge also gives ``score(prompts, texts)``.

Votes follow Algorithm 2's sign convention: negative means the perturbed model is better.
``compare`` returns one number per perturbation, a :class:`Verdict` (-1, 0, +1) for one-bit
comparisons or a graded value (e.g. minus a score difference) when the oracle is asked for one.
Zero is a tie or an abstention and carries no vote. An oracle that cannot decide abstains or
raises :class:`OracleError`; it never makes a verdict up.

Outside code may implement the protocols structurally; subclassing them gives the defaults.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from compo import settings  # domain checks of numeric settings, for oracles' constructors
from compo.errors import CompoError

__all__ = [
    "AGGREGATIONS",
    "ComparisonOracle",
    "CompoError",
    "Judgement",
    "OracleError",
    "OutputJudge",
    "Verdict",
    "aggregate",
    "byte_tokenizer",
    "default_cache_dir",
    "finite_scores",
    "load_language_model",
    "local_generator",
    "plain_settings",
    "settings",
]


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


def finite_scores(judge: str, values: Sequence[Any]) -> list[float]:
    """``values`` as floats, if all are finite; else an :class:`OracleError` naming ``judge``.

    Every oracle that reads scores goes through this: a NaN or inf score is a broken scorer, and
    treated as a tie it would let a run end "successfully" having learnt nothing.
    """
    scores = [float(v) for v in values]
    if not all(math.isfinite(v) for v in scores):
        shown = ", ".join(map(str, scores[:4])) + (", ..." if len(scores) > 4 else "")
        raise OracleError(f"judge {judge}: non-finite score [{shown}]")
    return scores


@runtime_checkable
class OutputJudge(Protocol):
    """Compares two responses to one prompt; optionally scores single responses."""

    def judge(self, prompt: str, current: str, perturbed: str) -> Judgement:
        """PERTURBED_BETTER if ``perturbed`` is the better reply to ``prompt``."""
        ...

    def judge_batch(self, items: Sequence[tuple[str, str, str]]) -> list[Judgement]:
        """Judges many (prompt, current, perturbed) triples (default: one at a time)."""
        return [self.judge(*item) for item in items]

    def score(self, prompts: Sequence[str], texts: Sequence[str]) -> list[float] | None:
        """One score per (prompt, text), higher is better; None for a pairwise-only judge."""
        return None

    def check(self) -> None:
        """Fails fast (key, endpoint, model path) before any expensive work."""
        return None

    def usage(self) -> dict[str, Any]:
        """Counters for ``metrics.json`` (under ``oracle.judge.``)."""
        return {}

    def describe(self) -> dict[str, Any]:
        """What this judge's verdicts depend on (its oracle's ``describe`` holds it), so a ComPO
        state is never continued with another judge (default: :func:`plain_settings`). A judge
        leaves out what only decides how it runs (timeouts, budgets, ports): changing those
        must not refuse a resume."""
        return plain_settings(self)


@runtime_checkable
class ComparisonOracle(Protocol):
    """What ComPO asks: is ``theta + delta`` better than ``theta``, for a batch of deltas.

    Per iteration the optimizer calls ``begin`` once with the current weights, then ``compare``
    (and, with ``radius=auto``, ``differ``) on batches of perturbations, objects of
    :mod:`compo.zo.directions` already scaled by the radius.
    """

    #: ``parameter`` (reads the weights) or ``output`` (sees generated text).
    kind: str = "parameter"

    def bind(self, tokenizer: Any, run_dir: Any) -> None:
        """Receives the tokenizer (to decode) and the run dir (for ``trace/oracle.jsonl``)."""
        return None

    def check(self) -> None:
        """Fails fast (key, endpoint, model path) before any expensive work."""
        return None

    def prepare(self, pairs: list[Any]) -> list[Any]:
        """The pairs ComPO will run on, e.g. re-oriented by a judge (default: unchanged)."""
        return pairs

    def begin(
        self,
        model: Any,
        scope: Any,
        pairs: Sequence[Any],
        pad_token_id: int,
        *,
        iteration: int,
        head: Any,
    ) -> None:
        """Caches what does not depend on the perturbation for this iteration's pairs.

        Args:
            model: The policy at the current weights.
            scope: The perturbed parameters (:class:`compo.zo.scope.Scope`).
            pairs: This iteration's encoded pairs.
            pad_token_id: Padding id.
            iteration: The iteration index (seeds any sampling noise).
            head: The optimizer's :class:`compo.zo.head.HeadEvaluator`, already cached on
                ``pairs`` at the current weights.
        """
        ...

    def compare(self, deltas: Any) -> list[float]:
        """One vote per perturbation: negative when ``theta + delta`` is better, 0 a tie."""
        ...

    def differ(self, deltas: Any) -> list[float] | None:
        """Per perturbation, the share of this iteration's responses that change under it.

        Output-level oracles implement it so ``radius=auto`` can find a radius at which the judge
        sees different text; None (the default) means the radius needs no such search.
        """
        return None

    def support(self, top_k: int) -> Any:
        """Output-layer rows for support-restricted directions (None: the pairs' rows)."""
        return None

    def limit(self) -> list[Any] | None:
        """The r -> 0 limit of E[y z] (unit norm) when it can be computed exactly, else None."""
        return None

    def usage(self) -> dict[str, Any]:
        """Counters for ``metrics.json`` (under ``oracle.``)."""
        return {}

    def describe(self) -> dict[str, Any]:
        """What this oracle's verdicts depend on; part of ComPO's resume identity, so a state
        is never continued with another oracle or judge (default: :func:`plain_settings`).

        It is written to ``compo_state/progress.json`` as it is, like the config to
        ``config.yaml``: never put a secret in it (keys are read from the environment).
        """
        return plain_settings(self)


def plain_settings(obj: Any) -> dict[str, Any]:
    """An object's class and its public attributes holding plain values, its ``judge`` included
    (as the judge describes itself, when it can).

    Constructors keep their settings as such attributes; counters live in dicts and run state in
    private attributes, so neither is part of it.
    """
    out: dict[str, Any] = {"type": f"{type(obj).__module__}.{type(obj).__qualname__}"}
    for key, value in sorted(vars(obj).items()):
        if key == "judge":
            describe = getattr(value, "describe", None)
            out[key] = describe() if callable(describe) else plain_settings(value)
        elif not key.startswith("_") and isinstance(value, str | int | float | bool | None):
            out[key] = value
    return out


AGGREGATIONS = ("any", "majority", "all")


def aggregate(votes: Sequence[Verdict], rule: str) -> Verdict:
    """Combines per-pair verdicts of one perturbation into one.

    Args:
        votes: One verdict per pair.
        rule: ``any`` (the authors' code: one pair improving suffices), ``majority`` (strictly
            more pairs say PERTURBED_BETTER than CURRENT_BETTER) or ``all``.

    Returns:
        The combined verdict; TIE when every pair abstained.
    """
    settings.choice("oracle.aggregation", rule, AGGREGATIONS)
    better = sum(v == Verdict.PERTURBED_BETTER for v in votes)
    worse = sum(v == Verdict.CURRENT_BETTER for v in votes)
    if better == 0 and worse == 0:
        return Verdict.TIE
    if rule == "any":
        ok = better > 0
    elif rule == "majority":
        if better == worse:
            return Verdict.TIE
        ok = better > worse
    else:  # all
        ok = worse == 0
    return Verdict.PERTURBED_BETTER if ok else Verdict.CURRENT_BETTER


def local_generator(*key: int, device: Any = "cpu") -> Any:
    """A ``torch.Generator`` seeded from a hash of ``key``, e.g. (seed, iteration, index).

    Every random draw of compo and its oracles (directions, sampling noise) comes from one of
    these, never from the global RNG, so a draw depends on its key alone.
    """
    import torch  # here, not at the top: judges that only speak HTTP never load torch

    digest = hashlib.blake2b("/".join(map(str, key)).encode(), digest_size=8).digest()
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return gen


# --------------------------------------------------------------------------------------------
# What compo lends oracles: its cache directory and its model loaders (imported lazily, so an
# oracle that only speaks HTTP never loads torch or transformers).
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$COMPO_CACHE_DIR``, else ``$XDG_CACHE_HOME/compo``, else ``~/.cache/compo``."""
    if os.environ.get("COMPO_CACHE_DIR"):
        return Path(os.environ["COMPO_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "compo"


def load_language_model(spec: str) -> tuple[str, Any, Any]:
    """A causal LM's name, the model and its tokenizer.

    Args:
        spec: ``smollm2`` (the embedded default), ``tiny`` (random, offline) or a local directory.

    Raises:
        CompoError: The model is not installed or cannot be loaded.
    """
    from compo.models import EmbeddedSmolLM2, PretrainedModel, TinyModel

    known = {"smollm2": EmbeddedSmolLM2, "tiny": TinyModel}
    loader = known[spec]() if spec in known else PretrainedModel(spec)
    return loader.name, *loader.load()


def byte_tokenizer() -> Any:
    """compo's offline byte-level tokenizer with a ChatML template (what tiny models use)."""
    from compo.models import build_byte_tokenizer

    return build_byte_tokenizer()
