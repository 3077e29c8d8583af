"""Click logs -> preference pairs, or unpaired rows, with a confidence (command line:
:mod:`compo.clicks_cli`, ``compo-clicks``).

    compo-clicks impressions.jsonl --out pairs.jsonl
    compo-clicks impressions.jsonl --out pairs.jsonl --correction ipw --eta 1.0 --on-error skip
    compo-clicks impressions.jsonl --out thumbs.jsonl --unpaired     # KTO's data: dpo=kto

Input: one impression per row (JSONL, JSON, CSV or Parquet, read like preference files)::

    {"id": "imp-1",                  # optional
     "prompt": "...",                # a string, or chat messages
     "responses": ["a", "b", "c"],   # in display order: index 0 was shown on top
     "clicks": [2],                  # indices into responses (may be empty)
     "dwell": [14.0]}                # optional: seconds per click, aligned with clicks

Rule (Joachims et al. 2005, "clicked > skipped above"): a clicked response is preferred to every
unclicked response shown above it; ``--rule skip_next`` also prefers it to the first unclicked
response right below it. With ``--min-dwell S`` a click shorter than S seconds counts as no click.

Position bias (``--correction ipw``): a user examines position k (0 = top) with propensity
p_k = (1 / (k + 1)) ** eta (eta = 1 by default; eta = 0 means no position bias), or with the
propensities given by ``--propensities``. A preference derived from a click at position k gets
weight 1 / p_k (inverse propensity weighting, Joachims, Swaminathan, Schnabel 2017); weights are
then divided by their mean over the whole log (self-normalised), so the total evidence still equals
the number of derived preferences and confidences stay on the same scale as without correction.

Aggregation and confidence: preferences about the same (prompt, two responses) are pooled across
impressions in both directions. With w the (weighted) wins of one response and l those of the
other, chosen = the response with more weight, and::

    confidence = P(theta > 1/2 | w, l),  theta ~ Beta(a + w, a + l)
               = 1 - I_{1/2}(a + w, a + l)

the posterior probability that the preference holds under a Beta(a, a) prior (``--prior``,
a = 1: uniform). One unopposed click gives 0.75, three give 0.9375; a 3-to-1 split gives 0.8125.
Pairs with exactly equal evidence in both directions carry no preference: they are counted and
reported, not written.

The command line is :mod:`compo.clicks_cli`. Numeric flags are checked when parsed (``--eta``
and ``--min-dwell`` finite and >= 0, ``--prior`` in (0, 1e6], each ``--propensities`` value in
(0, 1]); ``--out`` and the rejected-rows file must be writable files other than the input. Such
mistakes end in a one-line error, exit status 2.

Malformed rows follow ``compo.data``'s rules: the run stops with one line naming file, row and
field (exit status 2), or with ``--on-error skip`` the row goes to the rejected-rows file with the
reason. Nothing is dropped silently.

Output: JSONL rows ``{"id", "prompt", "chosen", "rejected", "confidence", "n_impressions",
"n_wins", "n_losses", "weighted_wins", "weighted_losses"}``; ``compo.data.load_pairs`` reads them
and keeps the counts as each pair's metadata.

Unpaired output (``--unpaired``, :func:`clicks_to_unpaired`): one row per (prompt, response) with
evidence, ``{"id", "prompt", "completion", "label", "confidence", "n_impressions", "n_clicks",
"n_skips", "weighted_clicks", "weighted_skips"}``: a click is evidence that its response is
desirable; a response the rule says was examined and skipped, that it is undesirable (same
weights); the label follows the weightier side, the confidence the Beta posterior above. A click
on the top response, which yields no pair, is evidence here. ``compo dpo=kto splitter=none
optimizer=none data.path=<out>`` trains on them.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compo import settings
from compo.data import ROLES, RejectedRow, as_object
from compo.errors import CompoError, DataError
from compo.readers import RowError

log = logging.getLogger(__name__)

RULES = ("skip_above", "skip_next")
CORRECTIONS = ("none", "ipw")
# Beyond this the prior swamps any click log (every confidence rounds to 0.5) and the incomplete
# beta function loses accuracy; at 1e6 it still matches scipy to 1e-8.
MAX_PRIOR = 1e6


# --------------------------------------------------------------------------------------------
# Beta posterior
# --------------------------------------------------------------------------------------------


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Lentz's continued fraction for the incomplete beta function (Numerical Recipes 6.4)."""
    tiny, eps = 1e-300, 3e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for aa in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the Beta(a, b) distribution function at x."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_continued_fraction(a, b, x) / a
    return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b


def beta_confidence(wins: float, losses: float, prior: float = 1.0) -> float:
    """P(theta > 1/2) for theta ~ Beta(prior + wins, prior + losses)."""
    # Written so that NaN fails too: it would come out as a null confidence.
    if not (0 < prior <= MAX_PRIOR and 0 <= wins < math.inf and 0 <= losses < math.inf):
        raise ValueError(
            f"need prior in (0, {MAX_PRIOR:g}] and finite non-negative wins and losses, "
            f"got prior={prior}, wins={wins}, losses={losses}"
        )
    return 1.0 - regularized_beta(prior + wins, prior + losses, 0.5)


def examination_propensities(n: int, eta: float = 1.0) -> list[float]:
    """p_k = (1 / (k + 1)) ** eta for display positions k = 0 .. n-1."""
    return [(1.0 / (k + 1)) ** eta for k in range(n)]


# --------------------------------------------------------------------------------------------
# Impressions
# --------------------------------------------------------------------------------------------


@dataclass
class Impression:
    """One validated impression: what was shown, in which order, and what was clicked."""

    prompt: str | list[dict[str, str]]
    responses: list[str]
    clicks: list[int]
    dwell: list[float] | None = None
    id: str | None = None


def _prompt(record: dict[str, Any]) -> str | list[dict[str, str]]:
    value = record.get("prompt")
    if value is None:
        raise RowError("prompt", "is missing")
    if isinstance(value, str):
        if not value.strip():
            raise RowError("prompt", "is empty")
        return value
    if isinstance(value, list) and value:
        for i, m in enumerate(value):
            ok = (
                isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
            )
            if not ok:
                raise RowError(
                    "prompt", f"message {i}: expected an object with 'role' and 'content'"
                )
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise RowError("prompt", f"expected a string or chat messages, got {type(value).__name__}")


def _number_list(record: dict[str, Any], name: str) -> list:
    value = record.get(name)
    if isinstance(value, str):  # CSV cells hold JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RowError(name, "expected a list (CSV: a JSON list in the cell)") from None
    if not isinstance(value, list):
        raise RowError(name, f"expected a list, got {type(value).__name__}")
    return value


def parse_impression(record: Any) -> Impression:
    """Validates one impression row.

    Raises:
        RowError: Naming the field at fault and why.
    """
    record = as_object(record)
    prompt = _prompt(record)
    if record.get("responses") is None:
        raise RowError("responses", "is missing")
    responses = _number_list(record, "responses")
    if len(responses) < 2:
        raise RowError("responses", "needs at least two responses")
    for i, text in enumerate(responses):
        if not isinstance(text, str) or not text.strip():
            raise RowError("responses", f"entry {i}: expected a non-empty string")
    if len({t.strip() for t in responses}) < len(responses):
        raise RowError("responses", "holds the same response twice")
    if record.get("clicks") is None:
        raise RowError("clicks", "is missing (use [] for an impression without clicks)")
    clicks = _number_list(record, "clicks")
    for c in clicks:
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < len(responses):
            raise RowError("clicks", f"{c!r} is not a response index in [0, {len(responses) - 1}]")
    if len(set(clicks)) < len(clicks):
        raise RowError("clicks", "lists the same index twice")
    dwell = None
    if record.get("dwell") is not None:
        dwell = _number_list(record, "dwell")
        if len(dwell) != len(clicks):
            raise RowError("dwell", f"has {len(dwell)} entries for {len(clicks)} clicks")
        for d in dwell:
            if isinstance(d, bool) or not isinstance(d, int | float) or not d >= 0:
                raise RowError("dwell", f"{d!r} is not a non-negative number of seconds")
    raw_id = record.get("id")
    return Impression(prompt, responses, clicks, dwell, None if raw_id is None else str(raw_id))


def clicked(imp: Impression, min_dwell: float | None = None) -> set[int]:
    """The positions that count as clicked: clicks shorter than ``min_dwell`` seconds do not."""
    if min_dwell is not None and imp.dwell is not None:
        return {c for c, d in zip(imp.clicks, imp.dwell, strict=True) if d >= min_dwell}
    return set(imp.clicks)


def impression_preferences(
    imp: Impression, rule: str = "skip_above", min_dwell: float | None = None
) -> list[tuple[int, int, int]]:
    """(winner, loser, position of the click) triples that Joachims' rule derives.

    Args:
        imp: A validated impression.
        rule: ``skip_above`` or ``skip_next`` (also the first unclicked response below).
        min_dwell: Clicks shorter than this many seconds count as no click.
    """
    if rule not in RULES:
        raise CompoError(f"rule: {rule!r} is not one of {list(RULES)}")
    hits = clicked(imp, min_dwell)
    out = []
    for c in sorted(hits):
        out += [(c, j, c) for j in range(c) if j not in hits]
        if rule == "skip_next":
            below = [j for j in range(c + 1, len(imp.responses)) if j not in hits]
            if below:
                out.append((c, below[0], c))
    return out


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------


@dataclass
class _Evidence:
    prompt: Any
    texts: tuple[str, ...]  # a pair: sorted, so both directions share one record; else one text
    wins: list[int] = field(default_factory=lambda: [0, 0])
    weight: list[float] = field(default_factory=lambda: [0.0, 0.0])
    impressions: set[int] = field(default_factory=set)


@dataclass
class ClickResult:
    """Rows written by one conversion (pairs in compo's schema, or unpaired rows), the rejected
    input rows and counts."""

    rows: list[dict[str, Any]]
    rejected: list[RejectedRow]
    stats: dict[str, int]


@dataclass
class _Log:
    """The validated impressions of a click log, with what conversion needs of each."""

    impressions: list[tuple[int, Impression, list[float]]]  # row, impression, propensities
    rejected: list[RejectedRow]


def _read_log(
    records: Iterable[tuple[int, Any]],
    source: str,
    correction: str,
    eta: float,
    propensities: Sequence[float] | None,
    min_dwell: float | None,
    prior: float,
    on_error: str,
) -> _Log:
    """Checks the settings, then validates every impression (bad rows: DataError or set aside)."""
    settings.choice("correction", correction, CORRECTIONS)
    settings.choice("on_error", on_error, ("raise", "skip"))
    if propensities is not None and not all(0 < p <= 1 for p in propensities):
        raise CompoError("propensities: every value must be in (0, 1]")
    settings.number("eta", eta, ge=0)
    settings.number("min_dwell", min_dwell, ge=0, optional=True)
    settings.number("prior", prior, gt=0, le=MAX_PRIOR)
    log_ = _Log([], [])
    for row, record in records:
        try:
            imp = parse_impression(record)
            if propensities is not None and len(imp.responses) > len(propensities):
                raise RowError(
                    "responses", f"{len(imp.responses)} shown, {len(propensities)} propensities"
                )
        except RowError as err:
            if on_error == "raise":
                raise DataError(
                    err.describe(Path(source), row) + " (--on-error skip sets such rows aside)"
                ) from None
            kept = record if not isinstance(record, RowError) else None
            log_.rejected.append(RejectedRow(source, row, err.field, err.reason, kept))
            continue
        prop = list(propensities or examination_propensities(len(imp.responses), eta))
        log_.impressions.append((row, imp, prop))
    return log_


def _raw_weight(position: int, prop: list[float], correction: str, explicit: bool, eta: float):
    """1 / p_k of evidence from a click at ``position`` under ``ipw``, else 1."""
    if correction != "ipw":
        return 1.0
    p_k = prop[position]
    raw = 1.0 / p_k if p_k > 0 else math.inf
    if not math.isfinite(raw):
        fix = "larger --propensities" if explicit else f"an --eta below {eta:g}"
        raise CompoError(
            f"ipw: the propensity of position {position} ({p_k:.3g}) is too small to "
            f"invert in floating point; use {fix}"
        )
    return raw


def _pool(
    evidence: dict[tuple, _Evidence], derived: list[tuple[tuple, int, float]], explicit: bool
) -> None:
    """Adds each derived observation to its record, its raw weight divided by their mean over
    the whole log (self-normalised: the total evidence is the number of observations)."""
    mean = sum(w for *_, w in derived) / len(derived) if derived else 1.0
    if not math.isfinite(mean):  # each 1/p_k is finite, their sum need not be
        raise CompoError(
            "ipw: the position weights 1/p_k sum beyond floating-point range; use larger "
            + ("--propensities" if explicit else "positions' propensities (a smaller --eta)")
        )
    for key, side, raw in derived:
        evidence[key].wins[side] += 1
        evidence[key].weight[side] += raw / mean


def clicks_to_pairs(
    records: Iterable[tuple[int, Any]],
    source: str = "clicks",
    rule: str = "skip_above",
    correction: str = "none",
    eta: float = 1.0,
    propensities: Sequence[float] | None = None,
    min_dwell: float | None = None,
    prior: float = 1.0,
    on_error: str = "raise",
) -> ClickResult:
    """Turns impressions into aggregated preference pairs with a confidence.

    Args:
        records: ``(row, record)`` pairs, e.g. from :func:`compo.readers.iter_records`.
        source: File name used in error messages.
        rule: ``skip_above`` (Joachims) or ``skip_next``.
        correction: ``none`` or ``ipw`` (inverse examination propensity of the click's position).
        eta: Exponent of the default propensities p_k = (1 / (k + 1)) ** eta.
        propensities: Explicit p_k per display position (overrides ``eta``).
        min_dwell: Clicks shorter than this count as no click.
        prior: a of the Beta(a, a) prior.
        on_error: ``raise`` (DataError naming file, row, field) or ``skip``.

    Returns:
        Pairs in first-seen order, rejected rows and counts.
    """
    clicks = _read_log(records, source, correction, eta, propensities, min_dwell, prior, on_error)
    evidence: dict[tuple, _Evidence] = {}
    derived: list[tuple[tuple, int, float]] = []  # key, winner side, raw weight
    stats = dict(n_impressions=len(clicks.impressions), n_rows_rejected=0, n_without_preference=0)
    for row, imp, prop in clicks.impressions:
        prefs = impression_preferences(imp, rule, min_dwell)
        if not prefs:
            stats["n_without_preference"] += 1
        prompt_key = json.dumps(imp.prompt, sort_keys=True, ensure_ascii=False)
        for winner, loser, position in prefs:
            a, b = imp.responses[winner].strip(), imp.responses[loser].strip()
            texts = (a, b) if a < b else (b, a)
            key = (prompt_key, *texts)
            ev = evidence.setdefault(key, _Evidence(imp.prompt, texts))
            ev.impressions.add(row)
            raw = _raw_weight(position, prop, correction, propensities is not None, eta)
            derived.append((key, 0 if texts[0] == a else 1, raw))
    _pool(evidence, derived, propensities is not None)
    pairs, ties = [], 0
    for ev in evidence.values():
        if math.isclose(ev.weight[0], ev.weight[1], rel_tol=1e-12, abs_tol=1e-12):
            ties += 1
            continue
        win = 0 if ev.weight[0] > ev.weight[1] else 1
        w, lo = ev.weight[win], ev.weight[1 - win]
        pairs.append(
            {
                "id": f"{Path(source).stem}-pair{len(pairs) + 1:05d}",
                "prompt": ev.prompt,
                "chosen": ev.texts[win],
                "rejected": ev.texts[1 - win],
                "confidence": round(beta_confidence(w, lo, prior), 6),
                # Flat, so compo.data.load_pairs keeps them as the pair's metadata.
                "n_impressions": len(ev.impressions),
                "n_wins": ev.wins[win],
                "n_losses": ev.wins[1 - win],
                "weighted_wins": round(w, 6),
                "weighted_losses": round(lo, 6),
            }
        )
    stats |= dict(
        n_rows_rejected=len(clicks.rejected),
        n_preferences=len(derived),
        n_pairs=len(pairs),
        n_ties=ties,
    )
    return ClickResult(pairs, clicks.rejected, stats)


def clicks_to_unpaired(
    records: Iterable[tuple[int, Any]],
    source: str = "clicks",
    rule: str = "skip_above",
    correction: str = "none",
    eta: float = 1.0,
    propensities: Sequence[float] | None = None,
    min_dwell: float | None = None,
    prior: float = 1.0,
    on_error: str = "raise",
) -> ClickResult:
    """Turns impressions into unpaired rows (KTO's data): clicked responses are desirable,
    responses examined and skipped undesirable, with a confidence.

    A click is evidence for its response (weight 1/p_k of its position k under ``ipw``); a
    response that ``rule`` says was examined and skipped (shown above a click; with
    ``skip_next`` also right below one) is evidence against it, once per impression, with the
    weight of the first click that reveals it (as the pair it loses in :func:`clicks_to_pairs`).
    Evidence about one (prompt, response) is pooled over impressions: with w the weighted clicks
    and l the weighted skips, label = w > l and confidence = P(theta > 1/2) under
    Beta(a + max(w, l), a + min(w, l)), the rule of the paired output. Equal evidence gives no
    row (counted in ``n_ties``). Arguments as :func:`clicks_to_pairs`.

    Returns:
        Rows ``{id, prompt, completion, label, confidence, n_impressions, n_clicks, n_skips,
        weighted_clicks, weighted_skips}`` in first-seen order, rejected rows and counts.
    """
    clicks = _read_log(records, source, correction, eta, propensities, min_dwell, prior, on_error)
    evidence: dict[tuple, _Evidence] = {}
    derived: list[tuple[tuple, int, float]] = []  # key, side (0: click, 1: skip), raw weight
    stats = dict(n_impressions=len(clicks.impressions), n_rows_rejected=0, n_without_evidence=0)
    explicit = propensities is not None
    for row, imp, prop in clicks.impressions:
        seen: dict[int, tuple[int, int]] = {c: (0, c) for c in sorted(clicked(imp, min_dwell))}
        for _, loser, position in impression_preferences(imp, rule, min_dwell):
            seen.setdefault(loser, (1, position))  # its first revealing click's weight
        if not seen:
            stats["n_without_evidence"] += 1
        prompt_key = json.dumps(imp.prompt, sort_keys=True, ensure_ascii=False)
        for index, (side, position) in seen.items():
            text = imp.responses[index].strip()
            key = (prompt_key, text)
            evidence.setdefault(key, _Evidence(imp.prompt, (text,))).impressions.add(row)
            derived.append((key, side, _raw_weight(position, prop, correction, explicit, eta)))
    _pool(evidence, derived, explicit)
    out, ties = [], 0
    for ev in evidence.values():
        w, lo = ev.weight
        if math.isclose(w, lo, rel_tol=1e-12, abs_tol=1e-12):
            ties += 1
            continue
        out.append(
            {
                "id": f"{Path(source).stem}-ex{len(out) + 1:05d}",
                "prompt": ev.prompt,
                "completion": ev.texts[0],
                "label": w > lo,
                "confidence": round(beta_confidence(max(w, lo), min(w, lo), prior), 6),
                # Flat, so compo.data.load_pairs keeps them as the example's metadata.
                "n_impressions": len(ev.impressions),
                "n_clicks": ev.wins[0],
                "n_skips": ev.wins[1],
                "weighted_clicks": round(w, 6),
                "weighted_skips": round(lo, 6),
            }
        )
    stats |= dict(
        n_rows_rejected=len(clicks.rejected),
        n_observations=len(derived),
        n_examples=len(out),
        n_desirable=sum(r["label"] for r in out),
        n_undesirable=sum(not r["label"] for r in out),
        n_ties=ties,
    )
    return ClickResult(out, clicks.rejected, stats)
