"""Impressions: one shown list of responses and its clicks, validated, and the preferences
Joachims' rule reads off it.

An impression row (``{"id", "prompt", "responses", "clicks", "dwell"}``, the input format of
:mod:`compo.clicks`) becomes an :class:`Impression` (:func:`parse_impression`; a bad field is a
:class:`compo.readers.RowError` naming it). :func:`clicked` applies the dwell threshold and
:func:`impression_preferences` the rule: a clicked response beats every unclicked one shown above
it (``skip_above``), and under ``skip_next`` also the first unclicked one right below it.
Weighting and pooling across impressions are :mod:`compo.clicks`'.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from compo.errors import CompoError
from compo.readers import RowError, given
from compo.records import ROLES, as_object

RULES = ("skip_above", "skip_next")


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
    # given(): an empty CSV cell is an absent field (a CSV row cannot leave out a column).
    if not given(record, "responses"):
        raise RowError("responses", "is missing")
    responses = _number_list(record, "responses")
    if len(responses) < 2:
        raise RowError("responses", "needs at least two responses")
    for i, text in enumerate(responses):
        if not isinstance(text, str) or not text.strip():
            raise RowError("responses", f"entry {i}: expected a non-empty string")
    if len({t.strip() for t in responses}) < len(responses):
        raise RowError("responses", "holds the same response twice")
    if not given(record, "clicks"):
        raise RowError("clicks", "is missing (use [] for an impression without clicks)")
    clicks = _number_list(record, "clicks")
    for c in clicks:
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < len(responses):
            raise RowError("clicks", f"{c!r} is not a response index in [0, {len(responses) - 1}]")
    if len(set(clicks)) < len(clicks):
        raise RowError("clicks", "lists the same index twice")
    dwell = None
    if given(record, "dwell"):
        dwell = _number_list(record, "dwell")
        if len(dwell) != len(clicks):
            raise RowError("dwell", f"has {len(dwell)} entries for {len(clicks)} clicks")
        for d in dwell:
            if isinstance(d, bool) or not isinstance(d, int | float) or not d >= 0:
                raise RowError("dwell", f"{d!r} is not a non-negative number of seconds")
    raw_id = str(record["id"]) if given(record, "id") else None
    return Impression(prompt, responses, clicks, dwell, raw_id)


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
