"""Resume state directories (``dpo_state/``, ``compo_state/``): atomic, hash-verified commits.

A commit writes each payload to a new file named after its step (temporary name, fsync, rename),
then ``progress.json`` (atomically, last) recording every file's name and sha256, then deletes
the files of earlier commits. Whenever the process dies (even SIGKILL, between any two writes),
``progress.json`` names complete files of one step, so a rerun resumes from the last commit.
Loading hashes the bytes before parsing them: a truncated or altered file raises one
:class:`CompoError` naming it and is never deserialised.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compo.errors import CompoError
from compo.rundir import atomic_write_json, write_jsonl

PROGRESS = "progress.json"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_file(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def commit(state_dir: Path, step: int, payloads: dict[str, tuple[str, bytes]], progress: dict):
    """Writes one consistent state.

    Args:
        state_dir: The directory (created if missing).
        step: Names the files (``<name>-<step>.<suffix>``), so a commit never overwrites the
            files the current ``progress.json`` points to.
        payloads: ``name -> (suffix, bytes)``, e.g. ``{"weights": ("safetensors", blob)}``.
        progress: Plain JSON values recorded alongside (step, fingerprint, ...).
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, (suffix, data) in payloads.items():
        file_name = f"{name}-{step:08d}.{suffix}"
        _write_file(state_dir / file_name, data)
        files[name] = {"file": file_name, "sha256": sha256_bytes(data), "bytes": len(data)}
    # The commit point: until this rename, the previous progress.json and its files stand.
    atomic_write_json(state_dir / PROGRESS, {**progress, "files": files})
    keep = {f["file"] for f in files.values()} | {PROGRESS}
    for stale in state_dir.iterdir():
        if stale.name not in keep:
            stale.unlink(missing_ok=True)


def load(state_dir: Path) -> tuple[dict[str, Any], dict[str, bytes]] | None:
    """The last committed state, verified; None when ``state_dir`` holds no commit.

    Returns:
        ``(progress, {name: bytes})`` with every file's sha256 checked.

    Raises:
        CompoError: ``progress.json`` is unreadable, or a file it names is missing, truncated or
            does not match its recorded sha256.
    """
    marker = state_dir / PROGRESS
    if not marker.is_file():
        return None
    try:
        progress = json.loads(marker.read_text(encoding="utf-8"))
        files = progress["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CompoError(f"{marker}: corrupt resume state ({exc}); delete {state_dir}") from None
    blobs = {}
    for name, entry in files.items():
        path = state_dir / entry["file"]
        if not path.is_file():
            raise CompoError(f"{path}: missing; the resume state is incomplete, delete {state_dir}")
        data = path.read_bytes()
        if len(data) != entry["bytes"] or sha256_bytes(data) != entry["sha256"]:
            raise CompoError(
                f"{path}: corrupt checkpoint ({len(data)} bytes, sha256 does not match "
                f"{marker.name}); refusing to load it, delete {state_dir} to start over"
            )
        blobs[name] = data
    return progress, blobs


def check_identity(state_dir: Path, progress: dict, expect: dict, option: str) -> None:
    """Refuses state written by a different setup (one line: which key, which values)."""
    for key, value in expect.items():
        if progress.get(key) != value:
            raise CompoError(
                f"{state_dir}: written for {key}={progress.get(key)!r}, this run has {value!r}; "
                f"use a new run dir or {option}=false"
            )


def truncate_trace(path: Path, keep: Callable[[dict], bool]) -> list[dict]:
    """Keeps the rows of a JSONL trace that ``keep`` accepts (rewritten atomically); returns them.

    A process killed after writing a trace row but before committing its state left that row
    behind; the resumed run writes it again, so it is dropped here rather than duplicated. A
    torn last line (killed mid-write) is dropped too.
    """
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and keep(row):
            rows.append(row)
    write_jsonl(path, rows)
    return rows
