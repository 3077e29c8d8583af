"""The run directory: metrics, traces and rejected rows, all written atomically.

Every run dir holds ``metrics.json`` (flat ``stage.name`` keys), ``config.yaml`` (the resolved
config), ``trace/<stage>.jsonl`` (one row per step) and, when a stage changed the model,
``checkpoint/``. Whole files are written to a temporary name and renamed, so a reader (or a crash)
never sees half a file; JSONL traces are appended one complete line per ``write``. A run holds
:func:`lock_run_dir` for its whole life, so two runs never write one directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from compo.errors import CompoError
from compo.tracking import NO_TRACKING, Tracking


def _jsonable(value: Any) -> Any:
    """Converts tensors, numpy scalars and non-finite floats into plain JSON values."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it
    os.umask(mask)
    return mask


# Read once: os.umask is process-wide, so reading it while other threads create files would race.
# mkstemp creates files 0600; run-dir and data files get the mode a plain open() would give them,
# so colleagues, sweep tools and shipped data files can read them.
_FILE_MODE = 0o666 & ~_read_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` as UTF-8, atomically (see :func:`atomic_write_bytes`)."""
    # backslashreplace: a lone surrogate in a rejected row is written as its escape, not lost.
    # Bytes, so "\n" stays "\n" on every platform (data files are shipped and hashed).
    atomic_write_bytes(path, text.encode("utf-8", errors="backslashreplace"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes ``obj`` as indented JSON, atomically."""
    atomic_write_text(
        path, json.dumps(_jsonable(obj), indent=2, sort_keys=True, default=str) + "\n"
    )


def write_jsonl(path: str | os.PathLike, rows: list[Mapping[str, Any]]) -> None:
    """Writes a whole JSONL file atomically."""
    atomic_write_text(
        path,
        "".join(json.dumps(_jsonable(r), ensure_ascii=False, default=str) + "\n" for r in rows),
    )


@contextlib.contextmanager
def lock_run_dir(path: str | os.PathLike) -> Iterator[None]:
    """Holds an exclusive lock on the run dir (``<path>/.lock``) for the ``with`` block.

    Two runs in one directory would interleave trace rows, overwrite each other's metrics and
    resume from each other's state. The lock is ``flock``, so the kernel drops it when its holder
    dies (even by SIGKILL): a stale lock file never blocks a rerun. The holder's pid is written
    into the file for the refusal message.

    Raises:
        CompoError: Another process holds the lock.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise CompoError(f"cannot lock run dir {path}: {exc.strerror} ({exc.filename})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            raise CompoError(
                f"run dir {path} is in use by pid {holder} (another compo run); "
                "wait for it to finish or choose another hydra.run.dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (unlinking it would race a new holder)


class TraceWriter:
    """Appends one JSON object per line to ``trace/<name>.jsonl``.

    Each row opens the file, appends one complete line and closes it, so the writer follows the
    path rather than an inode: a resumed run's atomic truncation of the same trace (which replaces
    the file) never leaves a writer appending to a deleted file.
    """

    def __init__(self, path: Path, tracking: Tracking = NO_TRACKING) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.tracking = tracking

    def write(self, row: Mapping[str, Any]) -> None:
        """Appends ``row`` as one complete line, then hands it to the run's trackers."""
        with open(self.path, "a", encoding="utf-8", errors="backslashreplace") as handle:
            handle.write(json.dumps(_jsonable(row), ensure_ascii=False, default=str) + "\n")
        self.tracking.row(self.path.stem, row)

    def close(self) -> None:
        """Nothing stays open between rows."""

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RunDir:
    """One run's output directory and its flat metrics dictionary.

    Args:
        path: The directory (Hydra's output dir for the job); created if missing.
        tracking: The experiment trackers that get a copy of every trace row and of the final
            metrics (:mod:`compo.tracking`; none by default).
    """

    def __init__(self, path: str | os.PathLike, tracking: Tracking = NO_TRACKING) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics: dict[str, Any] = {}
        self.tracking = tracking

    def log_metrics(self, prefix: str, values: Mapping[str, Any]) -> None:
        """Records ``values`` under ``prefix.key`` (written by :meth:`save`)."""
        for key, value in values.items():
            self.metrics[f"{prefix}.{key}"] = value

    def save(self, config_yaml: str) -> None:
        """Writes ``config.yaml`` and ``metrics.json`` once the run has done its work.

        Not before: a run that fails or is refused (e.g. resume state of other settings) must
        leave the files of the run that produced this dir's checkpoint and state as they were.
        """
        self.tracking.metrics(self.metrics)
        self.log_metrics("report_to", self.tracking.problems())  # a tracker dropped on the way
        atomic_write_text(self.path / "config.yaml", config_yaml)
        atomic_write_json(self.path / "metrics.json", self.metrics)

    def trace(self, name: str) -> TraceWriter:
        """Opens ``trace/<name>.jsonl`` for appending."""
        return TraceWriter(self.path / "trace" / f"{name}.jsonl", self.tracking)

    def write_rows(self, name: str, rows: list[Mapping[str, Any]]) -> None:
        """Writes ``<name>.jsonl`` in the run dir atomically (a whole file, e.g. judged labels)."""
        write_jsonl(self.path / f"{name}.jsonl", rows)

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoint"
