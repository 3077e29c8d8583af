"""The ``compo-clicks`` command: click logs -> preference pairs, or unpaired rows (``--unpaired``).

    compo-clicks impressions.jsonl --out pairs.jsonl
    compo-clicks impressions.jsonl --out pairs.jsonl --correction ipw --eta 1.0 --on-error skip
    compo-clicks impressions.jsonl --out thumbs.jsonl --unpaired     # KTO's data: dpo=kto

The rules are :mod:`compo.clicks`'. Every numeric flag is checked when parsed; ``--eta`` and
``--propensities`` only with ``--correction ipw`` (elsewhere they would change nothing), and not
both; ``--min-dwell`` only for a log in which some row has ``dwell``; ``--out`` and the
rejected-rows file must be writable ``*.jsonl`` files other than the input.
Such mistakes, and a malformed impression, end in one line and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from compo.beta_posterior import MAX_PRIOR
from compo.clicks import CORRECTIONS, clicks_to_pairs, clicks_to_unpaired
from compo.errors import CompoError, DataError
from compo.impressions import RULES
from compo.readers import iter_records
from compo.rundir import write_jsonl

DEFAULT_ETA = 1.0


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
    """The flags, refusing the position-bias ones where they would be silently ignored."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.correction != "ipw":
        for flag, value in (("--eta", args.eta), ("--propensities", args.propensities)):
            if value is not None:
                parser.error(f"{flag} only applies with --correction ipw")
    elif args.eta is not None and args.propensities is not None:
        parser.error("--eta and --propensities are both given; --propensities replaces eta's p_k")
    if args.eta is None:
        args.eta = DEFAULT_ETA
    return args


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``compo-clicks``."""
    p = _OneLineParser(
        prog="compo-clicks",
        description="Click logs -> preference pairs (or, --unpaired, KTO's unpaired rows) with a "
        "confidence.",
    )
    p.add_argument("input", type=Path, help="impressions (JSONL, JSON, CSV or Parquet)")
    p.add_argument("-o", "--out", type=Path, required=True, help="output pairs (*.jsonl)")
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
        default=None,  # None: not given, so that it can be refused without --correction ipw
        help=f"with ipw: p_k = (1/(k+1))**eta (default {DEFAULT_ETA:g}); 0: no position bias",
    )
    p.add_argument(
        "--propensities",
        type=_propensity_list,
        default=None,
        help="with ipw, instead of --eta: comma-separated p_0,p_1,...",
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
    p.add_argument(
        "--rejected", type=Path, default=None, help="*.jsonl; default: <out>.rejected.jsonl"
    )
    p.add_argument(
        "--unpaired",
        action="store_true",
        help="write unpaired rows {prompt, completion, label} for dpo=kto instead of pairs: "
        "clicked -> desirable, examined and skipped (by --rule) -> undesirable, same weights "
        "and confidence",
    )
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
    """Raises CompoError unless ``path`` can become a JSON Lines file (named so: a ``.csv`` that
    holds JSON would mislead every reader); missing parents are created later."""
    if path.is_dir():
        raise CompoError(f"{what}: {path} is a directory, not a file name")
    if path.suffix.lower() != ".jsonl":
        raise CompoError(f"{what}: {path}: compo-clicks writes JSON Lines; name it *.jsonl")
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
        convert = clicks_to_unpaired if args.unpaired else clicks_to_pairs
        result = convert(
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
        # Rejected rows first: a pairs file, once there, always comes with its rejected rows;
        # and without a single pair they are what says why.
        if result.rejected:
            rejected_path, what = rejected_to  # rows are only set aside with --on-error skip
            _write(what, rejected_path, [r.to_dict() for r in result.rejected])
        if not result.rows:
            what = "unpaired row" if args.unpaired else "preference pair"
            why = (
                f"; the first rejected: {result.rejected[0].describe()}; every rejected row is "
                f"in {rejected_path}"
                if result.rejected
                else ""
            )
            raise DataError(f"{args.input}: no {what} could be derived ({result.stats}){why}")
        _write("--out", args.out, result.rows)
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
