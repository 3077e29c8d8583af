"""Reading preference files into records: one row at a time, each value with its own type.

:func:`iter_records` reads JSONL, JSON (an array of objects, or one object per line), CSV and
Parquet; :func:`read_source` also resolves ``save_to_disk`` directories and hub dataset ids
(:mod:`compo.sources`) and the embedded default set. A row that cannot be read becomes a
:class:`RowError` in place of its record, so one bad line spoils only its row; validating records
into pairs is :mod:`compo.records`' job, loading a file's rows :mod:`compo.data`'s (and
:mod:`compo.clicks`'; both stop at a bad row with :func:`bad_row`'s error).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from compo import sources
from compo.errors import DataError, first_line

_FORMATS = (".jsonl", ".json", ".csv", ".parquet")


def default_data_path() -> Path:
    """The embedded default data set shipped inside the package."""
    return Path(str(resources.files("compo") / "assets" / "default_pairs.jsonl"))


class RowError(Exception):
    """A row that cannot become a pair; ``field`` is None when the whole row is at fault."""

    def __init__(self, field: str | None, reason: str) -> None:
        super().__init__(reason)
        self.field, self.reason = field, reason

    def describe(self, source: Path, row: int) -> str:
        where = f"{source}: row {row}"
        return (
            f"{where}: field '{self.field}': {self.reason}"
            if self.field
            else f"{where}: {self.reason}"
        )


def given(record: dict[str, Any], name: str) -> bool:
    """Whether ``record`` gives a value for ``name``: a CSV row has every column of its file, so
    an empty (or blank) cell counts as absent, like a field left out of a JSON row."""
    value = record.get(name)
    return value is not None and not (isinstance(value, str) and not value.strip())


def bad_row(
    source: Any, row: int, err: RowError, record: Any, rest: Iterator, first: bool, skip: str
) -> DataError:
    """The error that stops a load at a bad row (bad rows not set aside).

    A field that ``row`` lacks ("is missing") or leaves empty, and that no later row gives a
    value either, is said of the file (a CSV header or a schema without it, a column left
    empty) when ``first`` (no valid row came before): setting bad rows aside, the usual advice,
    would set every row aside.

    Args:
        source: The file, as named in messages.
        row: The bad row's number.
        err: Why the row is bad.
        record: The row as read.
        rest: The rows after this one, ``(row, record)`` pairs; consumed.
        first: Whether no valid row came before this one.
        skip: The setting that sets bad rows aside, e.g. ``data.on_error=skip``.
    """
    field = err.field
    unset = err.reason.startswith("is missing") or err.reason == "is empty"  # "missing (use [])"
    # The last test reads the rest of the file: only on the way to an error.
    if (
        first
        and isinstance(record, dict)
        and unset
        and not given(record, field)
        and not any(isinstance(r, dict) and given(r, field) for _, r in rest)
    ):
        if field in record:  # keeps the reason's advice: "(use [] for ...)"
            advice = err.reason[err.reason.find("(") :] if "(" in err.reason else ""
            return DataError(f"{source}: '{field}' is empty in every row {advice}".rstrip())
        return DataError(
            f"{source}: no row has a '{field}' field (row {row} has: "
            f"{', '.join(sorted(map(str, record)))})"
        )
    return DataError(f"{err.describe(source, row)} ({skip} sets such rows aside)")


# Every format is read row by row with each value's own type, and nothing is cached. Readers that
# infer one type per column (pyarrow for JSON, pandas for CSV, both behind ``datasets``) let one odd
# value retype or reject the whole column, blamed on the wrong row, turn CSV replies such as "None"
# or "N/A" into missing values, and report errors in their own 0-based numbering; ``datasets``
# also caches by path and mtime, so a file rewritten with the same mtime was read stale.

_NUMERIC_CSV_COLUMNS = ("confidence",)  # every other CSV cell stays text, as written


def _decode(path: Path, raw: bytes) -> str:
    """A whole file as text (a leading byte-order mark dropped), or a DataError naming the line."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path}: line {line}: undecodable bytes (not UTF-8); fix the file"
        ) from None


class _RepeatedKeys(dict):
    """A JSON object that names a key more than once (``json`` would keep the last value and
    drop the others without a word): the row holding it is a bad row."""

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        super().__init__(pairs)
        seen: set[str] = set()
        self.repeated = sorted({k for k, _ in pairs if k in seen or seen.add(k)})


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    return obj if len(obj) == len(pairs) else _RepeatedKeys(pairs)


def _loads(text: str) -> Any:
    return json.loads(text, object_pairs_hook=_json_object)


def _unambiguous(record: Any) -> Any:
    """``record``, or a RowError when an object in it (at any depth) names a key twice."""
    stack = [record]  # a loop, not recursion: json accepts nesting deeper than Python's stack
    while stack:
        value = stack.pop()
        if isinstance(value, _RepeatedKeys):
            names = ", ".join(repr(k) for k in value.repeated)
            return RowError(None, f"names {names} more than once in one object; keep one")
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return record


def _read_jsonl(raw: bytes) -> Iterator[tuple[int, Any]]:
    """Yields (row, record or RowError) per non-blank line, so a bad line spoils only its row."""
    row = 0
    for line in raw.removeprefix(codecs.BOM_UTF8).splitlines():
        if not line.strip():
            continue
        row += 1
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield (
                row,
                RowError(None, f"undecodable bytes (not UTF-8) at byte {exc.start} of the line"),
            )
            continue
        try:
            record = _unambiguous(_loads(text))
        except json.JSONDecodeError as exc:
            record = RowError(None, f"invalid JSON: {exc.msg} at column {exc.colno}")
        except (ValueError, RecursionError) as exc:  # a huge integer, nesting too deep
            record = RowError(None, f"unreadable JSON: {first_line(exc)}")
        yield row, record


def _read_json(path: Path, raw: bytes) -> Iterator[tuple[int, Any]]:
    """Rows of a JSON array or, as ``datasets`` also accepts under ``.json``, of JSON Lines."""
    text = _decode(path, raw)
    if not text.strip():
        return  # no rows, as for an empty JSONL or CSV file
    try:
        data = _loads(text)
    except json.JSONDecodeError as exc:
        if text.lstrip().startswith("{"):  # several objects, one per line
            yield from _read_jsonl(raw)
            return
        raise DataError(
            f"{path}: line {exc.lineno}, column {exc.colno}: invalid JSON: {exc.msg}"
        ) from None
    except (ValueError, RecursionError) as exc:  # a huge integer, nesting too deep
        raise DataError(f"{path}: unreadable JSON: {first_line(exc)}") from None
    if isinstance(data, dict) and len(text.strip().splitlines()) == 1:
        data = [data]  # JSON Lines with a single line
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects, or one object per line")
    for row, record in enumerate(data, start=1):
        yield row, _unambiguous(record)


def _read_csv(path: Path, raw: bytes) -> Iterator[tuple[int, Any]]:
    """Yields (row, record or RowError) per non-blank CSV record; cells stay text, except numbers.

    An empty numeric cell means the value is not given (its default applies); a non-numeric one is
    kept as text for the row's validation to reject.
    """
    # The default limit (128 KiB per cell) would reject long replies that pandas accepted.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    reader = csv.reader(io.StringIO(_decode(path, raw), newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return
        duplicates = sorted({name for name in header if header.count(name) > 1})
        if duplicates:
            raise DataError(f"{path}: line 1: columns appear more than once: {duplicates}")
        row = 0
        for cells in reader:
            if not cells:  # a blank line, skipped like pandas does
                continue
            row += 1
            if len(cells) != len(header):
                yield row, RowError(None, f"has {len(cells)} cells, the header has {len(header)}")
                continue
            record: dict[str, Any] = dict(zip(header, cells, strict=True))
            for name in _NUMERIC_CSV_COLUMNS:
                if name in record:
                    record[name] = _csv_number(record[name])
            yield row, record
    except csv.Error as exc:  # e.g. a NUL byte or an unterminated quote: rows after it are lost
        raise DataError(f"{path}: line {reader.line_num}: unreadable CSV: {exc}") from None


def _csv_number(cell: str) -> float | str | None:
    """A CSV cell as a finite number, None when empty, else the cell's text for validation to
    reject (so ``nan`` stays text in the row and in ``rejected_rows.jsonl``, which is JSON)."""
    if not cell.strip():
        return None
    try:
        number = float(cell)
    except ValueError:
        return cell
    return number if math.isfinite(number) else cell


def _read_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    """Rows of a Parquet file, typed by the schema stored in the file (nothing is inferred)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: unreadable Parquet file: {first_line(exc)}") from None
    yield from enumerate(table.to_pylist(), start=1)


def read_source(
    path: str | Path | None, split: str = "train"
) -> tuple[str | Path, str, Iterator[tuple[int, Any]]]:
    """Resolves ``data.path`` and returns (label for messages, stem for default ids, rows).

    A path that exists locally is a file (read here) or a ``save_to_disk`` directory; a name
    that cannot be a local path (:func:`compo.sources.looks_like_hub_id`) is tried as a hub
    dataset id.

    Args:
        path: File, ``save_to_disk`` directory or hub id; None is the embedded default set (an
            empty path is a DataError, not the default set).
        split: The split of a hub dataset or of a saved ``DatasetDict``.
    """
    if path is None:
        source = default_data_path()
        return source, source.stem, iter_records(source)
    if not str(path).strip():  # e.g. an unset shell variable: never the default set instead
        raise DataError("empty path; give a file, a save_to_disk directory or a hub dataset id")
    source = Path(path).expanduser()
    if sources.is_saved_dataset(source):
        label, rows = sources.read_saved(source, split)
        return label, source.name, rows
    hub_id = str(path)
    if sources.looks_like_hub_id(hub_id):
        label, rows = sources.read_hub(hub_id, split)
        return label, hub_id.rpartition("/")[2], rows
    return source, source.stem, iter_records(source)


def iter_records(path: Path) -> Iterator[tuple[int, Any]]:
    """Yields ``(row, record)`` pairs of a file, rows numbered from 1; ``record`` is a RowError for
    an unreadable row.

    The file is read afresh on every call (no cache), and every row keeps its own value types.

    Raises:
        DataError: The file is missing, has an unknown extension or cannot be read at all.
    """
    if not path.is_file():
        what = (
            "is a directory, and not one written by datasets.save_to_disk"
            if path.is_dir()
            else "is not a regular file"
        )
        raise DataError(f"{path}: {what}" if path.exists() else f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in _FORMATS:
        raise DataError(f"{path}: unknown file type {path.suffix!r}; use one of {sorted(_FORMATS)}")
    if suffix == ".parquet":
        yield from _read_parquet(path)
        return
    raw = path.read_bytes()
    if suffix == ".jsonl":
        yield from _read_jsonl(raw)
    elif suffix == ".json":
        yield from _read_json(path, raw)
    else:
        yield from _read_csv(path, raw)
