"""Resume state directories (``dpo_state/``, ``compo_state/``): atomic, hash-verified commits.

A commit writes each payload to a new file named after its step (temporary name, fsync, rename),
then ``progress.json`` (atomically, last) recording every file's name and sha256, then deletes
the files of earlier commits. Whenever the process dies (even SIGKILL, between any two writes),
``progress.json`` names complete files of one step, so a rerun resumes from the last commit.
Loading hashes the bytes before parsing them: a truncated or altered file raises one
:class:`CompoError` naming it and is never deserialised. ``progress.json`` carries the sha256 of
its own content and the step its files are named after, so an edited field (an iteration count
moved by hand) or a malformed structure is refused the same way. Nothing with a NaN or inf weight
is committed (:func:`check_finite`), and a state is resumed only by the setup that wrote it
(:func:`check_identity`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

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


def check_finite(tensors: Iterable[tuple[str, Any]], what: str) -> None:
    """Raises :class:`CompoError` naming the first tensor holding NaN or inf.

    A diverged run must not leave a model that loads and generates garbage, nor a state to resume
    from; every checkpoint and every resume state goes through this before it is written.

    Args:
        tensors: (name, tensor) pairs, e.g. ``model.named_parameters()``.
        what: What was about to be written, for the message.
    """
    for name, tensor in tensors:
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            bad = int((~tensor.isfinite()).sum())
            raise CompoError(
                f"{what} not written: {name} has {bad} NaN/inf of {tensor.numel()} entries "
                "(the run diverged: lower the step size or learning rate)"
            )


def digest_tensors(tensors: Iterable[Any]) -> str:
    """sha256 of tensors' fp32 values, in order."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().float().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def digest_named_tensors(tensors: Iterable[tuple[str, Any]]) -> str:
    """sha256 of named tensors, in order: each one's name, dtype, shape and raw bytes.

    Unlike :func:`digest_tensors` nothing is cast: two models differing only in a weight's dtype,
    in a buffer's name or in an integer buffer beyond fp32's precision differ here.
    """
    digest = hashlib.sha256()
    for name, t in tensors:
        flat = t.detach().cpu().contiguous().reshape(-1)
        header = json.dumps([name, str(t.dtype), list(t.shape)])
        digest.update(f"{len(header)}:{header}".encode())  # length-prefixed: no ambiguous joins
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def digest_pairs(pairs: Sequence[Any], extra: Sequence[Any] | None = None) -> str:
    """sha256 of encoded pairs (ids and token ids: swapping chosen and rejected changes it) or
    unpaired examples (ids, token ids and labels)."""
    rows = [dataclasses.astuple(p) for p in pairs]
    return hashlib.sha256(json.dumps([rows, extra]).encode()).hexdigest()


def fingerprint(parts: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``parts`` (settings, data digest, start-weight digest)."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _checksum(progress: dict) -> str:
    body = {k: v for k, v in progress.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def commit(state_dir: Path, step: int, payloads: dict[str, tuple[str, bytes]], progress: dict):
    """Writes one consistent state.

    Args:
        state_dir: The directory (created if missing).
        step: Names the files (``<name>-<step>.<suffix>``), so a commit never overwrites the
            files the current ``progress.json`` points to.
        payloads: ``name -> (suffix, bytes)``, e.g. ``{"weights": ("safetensors", blob)}``.
        progress: Plain JSON values recorded alongside (step, settings, digests, ...).
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, (suffix, data) in payloads.items():
        file_name = f"{name}-{step:08d}.{suffix}"
        _write_file(state_dir / file_name, data)
        files[name] = {"file": file_name, "sha256": sha256_bytes(data), "bytes": len(data)}
    record = {**progress, "step": step, "files": files}
    record["checksum"] = _checksum(record)
    # The commit point: until this rename, the previous progress.json and its files stand.
    atomic_write_json(state_dir / PROGRESS, record)
    keep = {f["file"] for f in files.values()} | {PROGRESS}
    for stale in state_dir.iterdir():
        if stale.name not in keep:
            stale.unlink(missing_ok=True)


def load(state_dir: Path, files: Sequence[str]) -> tuple[dict[str, Any], dict[str, bytes]] | None:
    """The last committed state, verified; None when ``state_dir`` holds no commit.

    Args:
        state_dir: The directory.
        files: The payload names a commit of this kind holds (all of them, no other).

    Returns:
        ``(progress, {name: bytes})`` with every file's sha256 checked.

    Raises:
        CompoError: ``progress.json`` is unreadable, or a file it names is missing, truncated or
            does not match its recorded sha256.
    """
    marker = state_dir / PROGRESS
    if state_dir.exists() and not state_dir.is_dir():
        raise CompoError(f"{state_dir}: not a directory; remove it to start over")
    if not marker.is_file():
        return None
    progress = _read_progress(marker)
    if sorted(progress["files"]) != sorted(files):
        raise CompoError(
            f"{marker}: corrupt resume state (files {sorted(progress['files'])}, expected "
            f"{sorted(files)}); delete {state_dir} to start over"
        )
    blobs = {}
    for name, entry in progress["files"].items():
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


def _read_progress(marker: Path) -> dict[str, Any]:
    """``progress.json``, its structure and checksum verified (one CompoError line otherwise)."""

    def corrupt(reason: str) -> CompoError:
        return CompoError(
            f"{marker}: corrupt resume state ({reason}); delete {marker.parent} to start over"
        )

    try:
        progress = json.loads(marker.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise corrupt(f"not JSON: {exc}") from None
    if not isinstance(progress, dict):
        raise corrupt("not a JSON object")
    if progress.get("checksum") != _checksum(progress):
        raise corrupt("its checksum does not match its content: edited or from another version")
    step, files = progress.get("step"), progress.get("files")
    if not isinstance(step, int) or isinstance(step, bool) or not isinstance(files, dict):
        raise corrupt("'step' must be an integer and 'files' an object")
    for name, entry in files.items():
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("file"), str)
            and isinstance(entry.get("sha256"), str)
            and type(entry.get("bytes")) is int
        )
        if not ok:
            raise corrupt(f"entry {name!r} needs file, sha256 and bytes")
        # The files are named after the step they hold: the step is bound to the hashed files.
        if entry["file"] != f"{name}-{step:08d}.{entry['file'].rpartition('.')[2]}":
            raise corrupt(f"file {entry['file']!r} does not hold step {step}")
        if Path(entry["file"]).name != entry["file"]:
            raise corrupt(f"file {entry['file']!r} is not inside the state directory")
    return progress


def _first_difference(found: dict, expect: dict, prefix: str = "") -> tuple[str, Any, Any]:
    """The first differing key (dotted through nested settings, e.g. ``loss.beta``) and values.

    A differing ``type`` comes first: the other fields of another class (another oracle, another
    loss) differ because of it.
    """
    for key in sorted(set(found) | set(expect), key=lambda k: (k != "type", k)):
        was, now = found.get(key), expect.get(key)
        if was == now:
            continue
        if isinstance(was, dict) and isinstance(now, dict):
            return _first_difference(was, now, f"{prefix}{key}.")
        return f"{prefix}{key}", was, now
    raise ValueError("no difference")


def _as_config(value: Any) -> str:
    """A setting's value as a config writes it: ``true``, ``null``; other values as repr."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return repr(value)


def check_identity(state_dir: Path, progress: dict, expect: dict, option: str) -> None:
    """Refuses state written by a different setup (one line: which key, which values).

    ``expect`` maps keys to values or to dicts of settings; a differing setting is named by its
    config path (``dpo.lr``, ``optimizer.radius``), a differing digest (``data``, ``start``,
    ``blocks``) is described.
    """
    digests = {
        "data": "the training data (pairs or examples, labels, weights) or held-out split differ",
        "start": "the starting weights differ",
        "blocks": "the perturbed tensors' names or shapes differ",
    }
    for key, value in expect.items():
        if key not in progress:
            what = f"written by an earlier compo (it does not record {key})"
            raise CompoError(f"{state_dir}: {what}; use a new run dir or {option}=false")
        found = progress[key]
        if found == value:
            continue
        if isinstance(value, dict) and isinstance(found, dict):
            name, was, now = _first_difference(found, value, f"{key}.")
            what = f"written with {name}={_as_config(was)}, this run has {_as_config(now)}"
        elif key in digests:
            what = f"written by another setup: {digests[key]}"
        else:
            what = f"written for {key}={found!r}, this run has {value!r}"
        raise CompoError(f"{state_dir}: {what}; use a new run dir or {option}=false")


def truncate_trace(path: Path, keep: Callable[[dict], bool], key: str | None = None) -> list[dict]:
    """Keeps the rows of a JSONL trace that ``keep`` accepts (rewritten atomically); returns them.

    A process killed after writing a trace row but before committing its state left that row
    behind; the resumed run writes it again, so it is dropped here rather than duplicated. A
    torn last line (killed mid-write) is dropped too, and so is any line that is no row of the
    trace (damaged on disk or edited): not UTF-8 or not JSON, not an object, or, when ``key``
    is given, without an integer ``key`` (the step or iteration ``keep`` reads).
    """
    if not path.is_file():
        return []
    rows = []
    for line in path.read_bytes().splitlines():
        try:
            row = json.loads(line.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError is one
            continue
        if not isinstance(row, dict):
            continue
        if key is not None and (type(row.get(key)) is not int):
            continue
        if keep(row):
            rows.append(row)
    write_jsonl(path, rows)
    return rows
