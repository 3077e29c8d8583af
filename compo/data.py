"""Preference pairs: loading files of records (reading them: :mod:`compo.readers`; turning one
record into a pair: :mod:`compo.records`; tokenization: :mod:`compo.encoding`).

Supported files: JSONL, JSON (an array of objects, or one object per line), CSV and Parquet; also a
directory written by ``datasets.save_to_disk`` and a Hugging Face hub dataset id (with a split; see
:mod:`compo.sources`), whose rows are validated the same way (the schemas: :mod:`compo.records`).

A file holds one kind of row, preference pairs or unpaired examples: its first valid row decides,
and a row of the other kind is a bad row; :func:`load_pairs` reads files of unpaired rows only
when asked (``unpaired=True``; :class:`compo.types.UnpairedExample` items).

Rows are numbered from 1 in file order (for JSONL without blank lines, the row is the line
number); a row without ``id`` gets ``<file stem>-<row>``. Files are read afresh on every load:
nothing is cached.

A bad row (missing or empty field, wrong type, identical chosen and rejected, undecodable bytes,
invalid JSON, a JSON key written twice in one object, a duplicate id) stops the load with one
line naming file, row and field, or, with ``on_error="skip"``, is returned in
:attr:`LoadResult.rejected` with its reason. A file without a
valid row is a :class:`NoValidRowError` naming the first reason and holding the rejected rows,
which :func:`keep_rejected` still writes to the run dir.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compo import settings
from compo.encoding import CHAT_TEMPLATE_MODES, encode_rows
from compo.errors import DataError
from compo.heldout import split_by_prompt
from compo.readers import RowError, bad_row, read_source
from compo.records import example_from_record, is_unpaired_row, pair_from_record
from compo.types import PreferencePair, UnpairedExample

log = logging.getLogger(__name__)

ON_ERROR = ("raise", "skip")


@dataclass
class RejectedRow:
    """A row left out under ``on_error=skip``, with why."""

    source: str
    row: int
    field: str | None
    reason: str
    record: Any

    def describe(self) -> str:
        """Where and why, without the file: ``row 3: field 'rejected': is missing``."""
        return f"row {self.row}: " + (f"field '{self.field}': " if self.field else "") + self.reason

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "row": self.row,
            "field": self.field,
            "reason": self.reason,
            "record": self.record,
        }


class NoValidRowError(DataError):
    """A file without a single valid row; ``rejected`` holds its rows set aside (under
    ``on_error=skip``), so that the caller can still write them where their reasons can be read."""

    def __init__(self, source: str | Path, rejected: list[RejectedRow]) -> None:
        if rejected:
            first = rejected[0].describe()
            super().__init__(
                f"{source}: no valid row ({len(rejected)} rows rejected; the first: {first})"
            )
        else:
            super().__init__(f"{source}: holds no rows")
        self.rejected = rejected


def keep_rejected(out: Any, name: str, load: Callable[[], LoadResult]) -> LoadResult:
    """Runs ``load`` and writes its rejected rows to ``<name>.jsonl`` in the run dir ``out`` (a
    :class:`compo.rundir.RunDir`), also when no row was valid: their reasons are never lost.

    Raises:
        DataError: What ``load`` raises; for a file without a valid row, the message also names
            the file that now holds its rejected rows.
    """
    try:
        loaded = load()
    except NoValidRowError as err:
        if not err.rejected:
            raise
        out.write_rows(name, [r.to_dict() for r in err.rejected])
        raise DataError(f"{err}; every rejected row is in {out.path / name}.jsonl") from None
    if loaded.rejected:
        out.write_rows(name, [r.to_dict() for r in loaded.rejected])
    return loaded


@dataclass
class LoadResult:
    """The valid rows of a file (preference pairs, or unpaired examples) and the rejected ones.

    ``rejected`` holds the rows set aside from every file read (the training file, then the
    held-out file); the last ``n_heldout_rejected`` of them are the held-out file's.
    """

    pairs: list[PreferencePair] | list[UnpairedExample]
    rejected: list[RejectedRow]
    heldout: list[PreferencePair] = field(default_factory=list)
    n_heldout_rejected: int = 0

    @property
    def unpaired(self) -> bool:
        """Whether the file holds unpaired rows (``pairs`` are UnpairedExample items)."""
        return bool(self.pairs) and isinstance(self.pairs[0], UnpairedExample)


_KINDS = {False: "a preference pair", True: "an unpaired row (prompt, completion, label)"}


def load_pairs(
    path: str | Path | None = None,
    on_error: str = "raise",
    limit: int | None = None,
    split: str = "train",
    unpaired: bool = False,
) -> LoadResult:
    """Loads and validates a preference file (or ``save_to_disk`` directory, or hub dataset).

    Args:
        path: The file, directory or hub id (see :func:`read_source`); None means the embedded
            default data set.
        on_error: ``raise`` stops at the first bad row with a :class:`DataError` naming file, row
            and field; ``skip`` leaves bad rows out and returns them in ``rejected``.
        limit: Keep only the first ``limit`` valid pairs (None keeps all).
        split: The split of a hub dataset or saved ``DatasetDict``.
        unpaired: Also read a file of unpaired rows (the result's ``pairs`` are then
            :class:`UnpairedExample` items); otherwise such a file is a DataError.

    Returns:
        The valid pairs (or unpaired examples) and the rejected rows.

    Raises:
        DataError: On an unreadable file, a bad row (``on_error=raise``), no valid row at all, or
            unpaired rows when they are not asked for.
    """
    if on_error not in ON_ERROR:
        raise DataError(f"data.on_error: {on_error!r} is not one of {list(ON_ERROR)}")
    source, stem, records = read_source(path, split)
    pairs: list[PreferencePair] = []
    rejected: list[RejectedRow] = []
    seen: set[str] = set()
    first: tuple[bool, int] | None = None  # (unpaired?, row) of the first valid row: its kind
    for row, record in records:
        try:
            kind = is_unpaired_row(record)
            if first is not None and kind != first[0]:
                raise RowError(
                    None,
                    f"is {_KINDS[kind]}, but row {first[1]} is {_KINDS[first[0]]}: a file holds "
                    "one kind (write a pair as two unpaired rows, chosen with label true and "
                    "rejected with label false, or use two files)",
                )
            parse = example_from_record if kind else pair_from_record
            pair = parse(record, default_id=f"{stem}-{row}")
            if pair.id in seen:
                raise RowError("id", f"duplicate id {pair.id!r}")
        except RowError as err:
            if on_error == "raise":
                raise bad_row(
                    source, row, err, record, records, not pairs, "data.on_error=skip"
                ) from None
            kept = record if not isinstance(record, RowError) else None
            rejected.append(RejectedRow(str(source), row, err.field, err.reason, kept))
            continue
        if first is None:
            first = (kind, row)
            if kind and not unpaired:
                raise DataError(
                    f"{source}: holds unpaired rows (prompt, completion, label; row {row}), but "
                    "preference pairs (prompt, chosen, rejected) are needed here"
                )
        seen.add(pair.id)
        pairs.append(pair)
        if limit is not None and len(pairs) >= limit:
            break
    if not pairs:
        raise NoValidRowError(source, rejected)
    if rejected:
        log.warning("%s: %d bad rows set aside (see rejected_rows.jsonl)", source, len(rejected))
    return LoadResult(pairs, rejected)


@dataclass
class DataSpec:
    """The ``data`` config group: which file and how to read and tokenize it.

    Args:
        path: Preference file, ``save_to_disk`` directory or hub dataset id; None means the
            embedded default set.
        split: The split of a hub dataset or saved ``DatasetDict``.
        on_error: ``raise`` or ``skip`` (bad rows to ``rejected_rows.jsonl``).
        max_length: Longest prompt + reply in tokens.
        max_prompt_length: Longest prompt in tokens.
        chat_template: ``auto``, ``always`` or ``never``.
        limit: Use only the first ``limit`` valid pairs of ``path``.
        eval_path: A file of held-out pairs (same formats and checks as ``path``), or None.
        eval_fraction: Share of ``path``'s prompts held out with all their pairs, in (0, 1), or
            None. At most one of ``eval_path`` and ``eval_fraction``; neither: no held-out set.
        seed: Seeds the draw of the held-out prompts (the run seed).
    """

    path: str | None = None
    split: str = "train"
    on_error: str = "raise"
    max_length: int = 512
    max_prompt_length: int = 256
    chat_template: str = "auto"
    limit: int | None = None
    eval_path: str | None = None
    eval_fraction: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        settings.path("data.path", self.path, null="the embedded default set")
        settings.text("data.split", self.split)
        settings.choice("data.on_error", self.on_error, ON_ERROR)
        settings.choice("data.chat_template", self.chat_template, CHAT_TEMPLATE_MODES)
        settings.number("data.max_length", self.max_length, integer=True, ge=1)
        settings.number(
            "data.max_prompt_length", self.max_prompt_length, integer=True, ge=1, lt=self.max_length
        )
        settings.number("data.limit", self.limit, integer=True, ge=1, optional=True)
        settings.path("data.eval_path", self.eval_path, null="none")
        settings.number("data.eval_fraction", self.eval_fraction, gt=0, lt=1, optional=True)
        settings.seed("data.seed", self.seed)
        if self.eval_path is not None and self.eval_fraction is not None:
            raise settings.SettingError(
                "data.eval_path and data.eval_fraction are both set; choose one (a held-out "
                "file, or a share of data.path's prompts)"
            )

    def load(self) -> LoadResult:
        """The pairs of ``path`` (or its unpaired examples: the stages check they can use them),
        with the held-out pairs (if any) set apart."""
        loaded = load_pairs(self.path, self.on_error, self.limit, self.split, unpaired=True)
        if loaded.unpaired and (self.eval_path is not None or self.eval_fraction is not None):
            raise settings.SettingError(
                "data.eval_path / data.eval_fraction: held-out evaluation needs preference pairs "
                f"and {self.path} holds unpaired rows; set both to null"
            )
        if self.eval_path is not None:
            try:
                extra = load_pairs(self.eval_path, self.on_error)
            except NoValidRowError as err:  # the training file's rejected rows go out with it
                err.rejected[:0] = loaded.rejected
                raise
            loaded.heldout, loaded.rejected = extra.pairs, loaded.rejected + extra.rejected
            loaded.n_heldout_rejected = len(extra.rejected)
        elif self.eval_fraction is not None:
            loaded.pairs, loaded.heldout = split_by_prompt(
                loaded.pairs, self.eval_fraction, self.seed
            )
        return loaded

    def encode(self, pairs: list[PreferencePair] | list[UnpairedExample], tokenizer: Any):
        return encode_rows(
            pairs, tokenizer, self.max_length, self.max_prompt_length, self.chat_template
        )
