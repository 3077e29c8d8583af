"""A persistent verdict cache shared by reruns and sweep jobs (sqlite, safe across processes).

Keys are sha256 digests of (judge identity, prompt, first response, second response); the judge
identity holds everything else that determines a verdict (endpoint, model, prompt template,
sampling settings), so verdicts of a local test server never answer for the real API. Values are a
verdict with its confidence and reason. Nothing secret is stored: the key
material is the text being judged, never credentials. Looking up the swapped pair returns the
negated verdict, so a comparison is paid for once whichever side is "current".
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path

from compo.interfaces import CompoError, Judgement, Verdict, default_cache_dir


def default_verdict_cache() -> Path:
    """``<compo cache dir>/verdicts.sqlite``."""
    return default_cache_dir() / "verdicts.sqlite"


def open_sqlite(path: Path, schema: str, key: str) -> sqlite3.Connection:
    """Opens (creating) a sqlite file shared by threads and processes, with ``schema`` applied.

    One connection serves this process's threads (callers guard it with a lock); WAL and sqlite's
    file locking, with a generous timeout, serialise concurrent sweep jobs and survive a kill.

    Args:
        path: The sqlite file; created with its directory.
        schema: The ``CREATE TABLE IF NOT EXISTS`` statement.
        key: The setting that named ``path`` (``oracle.judge.cache_path``), for errors.

    Raises:
        CompoError: ``path`` is a directory, no sqlite database, or cannot be created.
    """
    if path.is_dir():
        raise CompoError(f"{key}: {path} is a directory, not a sqlite file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, timeout=60, check_same_thread=False)
        with db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(schema)
    except sqlite3.DatabaseError as exc:
        # sqlite reads the file only here: a text file or another format fails on first use.
        problem = "is not a sqlite database" if "not a database" in str(exc) else "cannot be used"
        raise CompoError(f"{key}: {path} {problem} ({exc})") from None
    except OSError as exc:
        raise CompoError(f"{key}: cannot create {path} ({exc.strerror or exc})") from None
    return db


def cache_key(judge: str, prompt: str, first: str, second: str) -> str:
    """sha256 of the JSON list of the four strings (unambiguous, unlike plain concatenation)."""
    blob = json.dumps([judge, prompt, first, second], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class VerdictCache:
    """Verdicts keyed by what was judged, in one sqlite file.

    Args:
        path: The sqlite file; created with its directory. ``None``: the default under
            :func:`compo.interfaces.default_cache_dir`.
        key: The setting that named ``path``, for errors.
    """

    def __init__(
        self, path: str | Path | None = None, key: str = "oracle.judge.cache_path"
    ) -> None:
        self.path = Path(path) if path else default_verdict_cache()
        self._lock = threading.Lock()
        self._db = open_sqlite(
            self.path,
            "CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, verdict INTEGER, "
            "confidence REAL, reason TEXT, created REAL)",
            key,
        )

    def get(self, judge: str, prompt: str, current: str, perturbed: str):
        """The cached judgement of (current, perturbed) by ``judge`` (its identity), else None."""
        keys = (
            cache_key(judge, prompt, current, perturbed),
            cache_key(judge, prompt, perturbed, current),
        )
        with self._lock:
            for sign, key in zip((1, -1), keys, strict=True):
                row = self._db.execute(
                    "SELECT verdict, confidence, reason FROM verdicts WHERE key = ?", (key,)
                ).fetchone()
                if row is not None:
                    return Judgement(Verdict(sign * row[0]), row[1], row[2])
        return None

    def put(self, judge: str, prompt: str, current: str, perturbed: str, judgement) -> None:
        """Stores ``judge``'s judgement of (current, perturbed)."""
        key = cache_key(judge, prompt, current, perturbed)
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?, ?)",
                (key, int(judgement.verdict), judgement.confidence, judgement.reason, time.time()),
            )

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
