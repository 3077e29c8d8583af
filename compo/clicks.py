"""Click logs -> preference pairs, or unpaired rows, with a confidence (command line:
:mod:`compo.clicks_cli`, ``compo-clicks``).

    compo-clicks impressions.jsonl --out pairs.jsonl
    compo-clicks impressions.jsonl --out pairs.jsonl --correction ipw --eta 1.0 --on-error skip
    compo-clicks impressions.jsonl --out thumbs.jsonl --unpaired     # KTO's data: dpo=kto

Input: one impression per row (JSONL, JSON, CSV or Parquet, read like preference files;
validated, and read by the rule below, in :mod:`compo.impressions`)::

    {"id": "imp-1",                  # optional; unique (a repeated id is a bad row)
     "prompt": "...",                # a string, or chat messages
     "responses": ["a", "b", "c"],   # in display order: index 0 was shown on top
     "clicks": [2],                  # indices into responses (may be empty)
     "dwell": [14.0]}                # optional: seconds per click, aligned with clicks

A CSV cell holds a list as JSON text; an empty cell is a field not given (a CSV row cannot leave
out a column), so a row without dwell times leaves its ``dwell`` cell empty.

Rule (Joachims et al. 2005, "clicked > skipped above"): a clicked response is preferred to every
unclicked response shown above it; ``--rule skip_next`` also prefers it to the first unclicked
response right below it. With ``--min-dwell S`` a click shorter than S seconds counts as no click
(refused for a log in which no row has ``dwell``: it would change nothing).

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
a = 1: uniform; :mod:`compo.beta_posterior`). One unopposed click gives 0.75, three give 0.9375;
a 3-to-1 split gives 0.8125. Pairs with exactly equal evidence in both directions carry no
preference: they are counted and reported, not written.

The command line is :mod:`compo.clicks_cli`. Numeric flags are checked when parsed (``--eta``
and ``--min-dwell`` finite and >= 0, ``--prior`` in (0, 1e6], each ``--propensities`` value in
(0, 1]; ``--eta``/``--propensities`` only with ``--correction ipw``, and not both); ``--out``
and the rejected-rows file must be writable ``*.jsonl`` files other than the input. Such mistakes
end in a one-line error, exit status 2.

Malformed rows follow ``compo.data``'s rules: the run stops with one line naming file, row and
field (exit status 2), or with ``--on-error skip`` the row goes to the rejected-rows file with the
reason (also when no row is usable: the error then names the first reason). Nothing is dropped
silently.

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
from compo.beta_posterior import MAX_PRIOR, beta_confidence
from compo.data import RejectedRow
from compo.errors import CompoError
from compo.impressions import Impression, clicked, impression_preferences, parse_impression
from compo.readers import RowError, bad_row, given

log = logging.getLogger(__name__)

CORRECTIONS = ("none", "ipw")


def examination_propensities(n: int, eta: float = 1.0) -> list[float]:
    """p_k = (1 / (k + 1)) ** eta for display positions k = 0 .. n-1."""
    return [(1.0 / (k + 1)) ** eta for k in range(n)]


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
    """Checks the settings, then validates every impression (bad rows: DataError or set aside).

    Raises:
        CompoError: A setting is invalid, or ``min_dwell`` is given for a log none of whose rows
            has dwell times (like ``--eta`` without ipw, it would change nothing).
    """
    settings.choice("correction", correction, CORRECTIONS)
    settings.choice("on_error", on_error, ("raise", "skip"))
    if propensities is not None and not all(0 < p <= 1 for p in propensities):
        raise CompoError("propensities: every value must be in (0, 1]")
    settings.number("eta", eta, ge=0)
    settings.number("min_dwell", min_dwell, ge=0, optional=True)
    settings.number("prior", prior, gt=0, le=MAX_PRIOR)
    log_ = _Log([], [])
    records = iter(records)  # once: a bad row's error reads the rows after it
    rows_by_id: dict[str, int] = {}  # an impression logged twice would count its clicks twice
    has_dwell = False
    for row, record in records:
        has_dwell = has_dwell or (isinstance(record, dict) and given(record, "dwell"))
        try:
            imp = parse_impression(record)
            if propensities is not None and len(imp.responses) > len(propensities):
                raise RowError(
                    "responses", f"{len(imp.responses)} shown, {len(propensities)} propensities"
                )
            if imp.id is not None:
                if imp.id in rows_by_id:
                    raise RowError("id", f"repeats the id of row {rows_by_id[imp.id]}")
                rows_by_id[imp.id] = row
        except RowError as err:
            if on_error == "raise":
                first = not log_.impressions
                raise bad_row(source, row, err, record, records, first, "--on-error skip") from None
            kept = record if not isinstance(record, RowError) else None
            log_.rejected.append(RejectedRow(source, row, err.field, err.reason, kept))
            continue
        prop = list(propensities or examination_propensities(len(imp.responses), eta))
        log_.impressions.append((row, imp, prop))
    if min_dwell is not None and not has_dwell:
        raise CompoError(
            f"--min-dwell: no row of {source} has a 'dwell' field, so it would change nothing "
            "(drop the flag, or log dwell seconds per click)"
        )
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
