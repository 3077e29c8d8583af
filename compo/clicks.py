"""Click logs -> preference pairs with a confidence (console script ``compo-clicks``).

    compo-clicks impressions.jsonl --out pairs.jsonl
    compo-clicks impressions.jsonl --out pairs.jsonl --correction ipw --eta 1.0 --on-error skip

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

Numeric flags are checked when parsed (``--eta`` and ``--min-dwell`` finite and >= 0, ``--prior``
in (0, 1e6], each ``--propensities`` value in (0, 1]); ``--out`` and the rejected-rows file must be
writable files other than the input. Such mistakes end in a one-line error, exit status 2.

Malformed rows follow ``compo.data``'s rules: the run stops with one line naming file, row and
field (exit status 2), or with ``--on-error skip`` the row goes to the rejected-rows file with the
reason. Nothing is dropped silently.

Output: JSONL rows ``{"id", "prompt", "chosen", "rejected", "confidence", "n_impressions",
"n_wins", "n_losses", "weighted_wins", "weighted_losses"}``; ``compo.data.load_pairs`` reads them
and keeps the counts as each pair's metadata.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compo import settings
from compo.data import ROLES, RejectedRow, RowError, as_object, iter_records
from compo.errors import CompoError, DataError
from compo.rundir import write_jsonl

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
    clicked = set(imp.clicks)
    if min_dwell is not None and imp.dwell is not None:
        clicked = {c for c, d in zip(imp.clicks, imp.dwell, strict=True) if d >= min_dwell}
    out = []
    for c in sorted(clicked):
        out += [(c, j, c) for j in range(c) if j not in clicked]
        if rule == "skip_next":
            below = [j for j in range(c + 1, len(imp.responses)) if j not in clicked]
            if below:
                out.append((c, below[0], c))
    return out


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------


@dataclass
class _Evidence:
    prompt: Any
    texts: tuple[str, str]  # sorted, so both directions share one record
    wins: list[int] = field(default_factory=lambda: [0, 0])
    weight: list[float] = field(default_factory=lambda: [0.0, 0.0])
    impressions: set[int] = field(default_factory=set)


@dataclass
class ClickResult:
    """Pairs (compo's schema), rejected rows and counts of one conversion."""

    pairs: list[dict[str, Any]]
    rejected: list[RejectedRow]
    stats: dict[str, int]


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
        records: ``(row, record)`` pairs, e.g. from :func:`compo.data.iter_records`.
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
    settings.choice("correction", correction, CORRECTIONS)
    settings.choice("on_error", on_error, ("raise", "skip"))
    if propensities is not None and not all(0 < p <= 1 for p in propensities):
        raise CompoError("propensities: every value must be in (0, 1]")
    settings.number("eta", eta, ge=0)
    settings.number("min_dwell", min_dwell, ge=0, optional=True)
    settings.number("prior", prior, gt=0, le=MAX_PRIOR)
    evidence: dict[tuple[str, str, str], _Evidence] = {}
    derived: list[tuple[tuple[str, str, str], int, float]] = []  # key, winner side, raw weight
    rejected: list[RejectedRow] = []
    stats = dict(n_impressions=0, n_rows_rejected=0, n_without_preference=0)
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
            rejected.append(RejectedRow(source, row, err.field, err.reason, kept))
            continue
        stats["n_impressions"] += 1
        prefs = impression_preferences(imp, rule, min_dwell)
        if not prefs:
            stats["n_without_preference"] += 1
        prop = propensities or examination_propensities(len(imp.responses), eta)
        prompt_key = json.dumps(imp.prompt, sort_keys=True, ensure_ascii=False)
        for winner, loser, position in prefs:
            a, b = imp.responses[winner].strip(), imp.responses[loser].strip()
            texts = (a, b) if a < b else (b, a)
            key = (prompt_key, *texts)
            ev = evidence.setdefault(key, _Evidence(imp.prompt, texts))
            ev.impressions.add(row)
            raw = 1.0
            if correction == "ipw":
                p_k = prop[position]
                raw = 1.0 / p_k if p_k > 0 else math.inf
                if not math.isfinite(raw):
                    fix = "larger --propensities" if propensities else f"an --eta below {eta:g}"
                    raise CompoError(
                        f"ipw: the propensity of position {position} ({p_k:.3g}) is too small to "
                        f"invert in floating point; use {fix}"
                    )
            derived.append((key, 0 if texts[0] == a else 1, raw))
    mean = sum(w for *_, w in derived) / len(derived) if derived else 1.0
    if not math.isfinite(mean):  # each 1/p_k is finite, their sum need not be
        raise CompoError(
            "ipw: the position weights 1/p_k sum beyond floating-point range; use larger "
            + ("--propensities" if propensities else "positions' propensities (a smaller --eta)")
        )
    for key, side, raw in derived:
        evidence[key].wins[side] += 1
        evidence[key].weight[side] += raw / mean
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
        n_rows_rejected=len(rejected),
        n_preferences=len(derived),
        n_pairs=len(pairs),
        n_ties=ties,
    )
    return ClickResult(pairs, rejected, stats)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _number(valid: str, ok: Callable[[float], bool]) -> Callable[[str], float]:
    """An argparse ``type``: a finite float for which ``ok`` holds, described by ``valid``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"must be {valid}, got {text!r}")
        return value

    return parse


def _propensity_list(text: str) -> list[float]:
    """An argparse ``type``: comma-separated examination propensities, each in (0, 1]."""
    values = []
    for part in text.split(","):
        try:
            values.append(float(part))
        except ValueError:
            values.append(math.nan)
    if not all(0 < v <= 1 for v in values):  # also false for NaN
        raise argparse.ArgumentTypeError(
            f"must be comma-separated numbers in (0, 1], one per position, got {text!r}"
        )
    return values


class _OneLineParser(argparse.ArgumentParser):
    """Reports a bad flag in one line (argparse prints the whole usage first); --help has it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``compo-clicks``."""
    p = _OneLineParser(
        prog="compo-clicks", description="Click logs -> preference pairs with a confidence."
    )
    p.add_argument("input", type=Path, help="impressions (JSONL, JSON, CSV or Parquet)")
    p.add_argument("-o", "--out", type=Path, required=True, help="output pairs (JSONL)")
    p.add_argument(
        "--rule",
        choices=RULES,
        default="skip_above",
        help="Joachims' rule: a click beats the skipped results above it (skip_above) or the next",
    )
    p.add_argument(
        "--correction",
        choices=CORRECTIONS,
        default="none",
        help="ipw: weight each click by 1 / its position's examination propensity",
    )
    p.add_argument(
        "--eta",
        type=_number("a finite number >= 0", lambda v: v >= 0),
        default=1.0,
        help="p_k = (1/(k+1))**eta; 0: no position bias",
    )
    p.add_argument(
        "--propensities", type=_propensity_list, default=None, help="comma-separated p_0,p_1,..."
    )
    p.add_argument(
        "--min-dwell",
        type=_number("a finite number of seconds >= 0", lambda v: v >= 0),
        default=None,
        help="shorter clicks do not count",
    )
    p.add_argument(
        "--prior",
        type=_number(f"a number in (0, {MAX_PRIOR:g}]", lambda v: 0 < v <= MAX_PRIOR),
        default=1.0,
        help="a of the Beta(a, a) prior",
    )
    p.add_argument(
        "--on-error",
        choices=("raise", "skip"),
        default="raise",
        help="raise: stop at the first bad row | skip: set bad rows aside in --rejected",
    )
    p.add_argument("--rejected", type=Path, default=None, help="default: <out>.rejected.jsonl")
    return p


def _same_file(a: Path, b: Path) -> bool:
    """True if ``a`` and ``b`` name one file, however spelled (relative, ``..``, symlinks)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)  # hard links, case-insensitive file systems
    except OSError:  # one of them does not exist yet
        return False


def _check_writable(what: str, path: Path) -> None:
    """Raises CompoError unless ``path`` can become a file; missing parents are created later."""
    if path.is_dir():
        raise CompoError(f"{what}: {path} is a directory, not a file name")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CompoError(f"{what}: cannot create {path}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise CompoError(f"{what}: cannot create {path}: {ancestor} is not writable")


def _destinations(args: argparse.Namespace) -> tuple[Path, str] | None:
    """Checks where the run will write, before any work.

    Returns:
        The rejected-rows file and how to name it in messages; None without ``--on-error skip``.

    Raises:
        CompoError: A destination is the input, a directory, or cannot be created.
    """
    _check_writable("--out", args.out)
    if _same_file(args.out, args.input):
        raise CompoError(f"--out: {args.out} is the input {args.input}; it would be overwritten")
    if args.on_error != "skip":
        return None  # the first bad row stops the run: no rejected-rows file
    rejected = args.rejected or args.out.with_suffix(".rejected.jsonl")
    what = "--rejected" if args.rejected else "rejected-rows file (from --out; set --rejected)"
    _check_writable(what, rejected)
    if _same_file(rejected, args.input):
        raise CompoError(f"{what}: {rejected} is the input {args.input}; it would be overwritten")
    if _same_file(rejected, args.out):
        raise CompoError(f"{what}: {rejected} is also --out")
    return rejected, what


def _write(what: str, path: Path, rows: list[dict[str, Any]]) -> None:
    """Writes ``rows`` atomically; an OS failure becomes one line naming ``what``."""
    try:
        write_jsonl(path, rows)
    except OSError as exc:
        raise CompoError(f"{what}: cannot write {path}: {exc.strerror or exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point; user errors end in one line and exit status 2."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        rejected_to = _destinations(args)
        result = clicks_to_pairs(
            iter_records(args.input),
            str(args.input),
            rule=args.rule,
            correction=args.correction,
            eta=args.eta,
            propensities=args.propensities,
            min_dwell=args.min_dwell,
            prior=args.prior,
            on_error=args.on_error,
        )
        if not result.pairs:
            raise DataError(f"{args.input}: no preference pair could be derived ({result.stats})")
        # Rejected rows first: a pairs file, once there, always comes with its rejected rows.
        if result.rejected:
            rejected_path, what = rejected_to  # rows are only set aside with --on-error skip
            _write(what, rejected_path, [r.to_dict() for r in result.rejected])
        _write("--out", args.out, result.pairs)
    except CompoError as exc:
        print(f"compo-clicks: error: {exc}", file=sys.stderr)
        return 2
    if result.rejected:
        print(f"compo-clicks: {len(result.rejected)} bad rows set aside in {rejected_path}")
    print("compo-clicks: " + ", ".join(f"{k}={v}" for k, v in result.stats.items()))
    print(f"compo-clicks: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
