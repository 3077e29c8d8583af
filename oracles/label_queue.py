"""The human oracle's queue: comparisons waiting for (or holding) a label, in one sqlite file.

The run that asks (:class:`oracles.human.HumanJudge`) and the page that answers
(:mod:`oracles.label_server`, in the same process or in ``compo-label``) share nothing but this
file, so either side can restart without losing a label. Besides the comparisons, the file holds
one status row written by the asking run (waiting, working, ended; its counts and budget), which
is how the page can tell a labeller what happens next. Nothing secret is stored: the page's token
lives only in the serving process.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from compo.interfaces import Judgement, Verdict, default_cache_dir
from oracles.cache import open_sqlite

ANSWERS = ("1", "2", "tie", "skip")  # 1: the response shown first (left), 2: the second (right)
_COLUMNS = ("id", "prompt", "first", "second", "swapped", "label", "created", "labelled", "asked")


def comparison_key(prompt: str, current: str, perturbed: str) -> str:
    """The queue id of a comparison: the same texts are the same item in any run."""
    return hashlib.sha256(json.dumps([prompt, current, perturbed]).encode()).hexdigest()[:24]


def shown_swapped(seed: int, key: str) -> bool:
    """Whether the perturbed response is shown first: a coin seeded by (seed, comparison), so a
    restarted run shows a comparison as it was shown before."""
    return random.Random(f"{seed}/{key}").random() < 0.5


class LabelQueue:
    """Comparisons waiting for (or holding) a human label, and the asking run's status.

    Args:
        path: The sqlite file; None: ``<compo cache dir>/labels.sqlite``.
        key: The setting that named ``path``, for errors.
    """

    def __init__(
        self, path: str | Path | None = None, key: str = "oracle.judge.queue_path"
    ) -> None:
        if path is None:
            path = default_cache_dir() / "labels.sqlite"
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = open_sqlite(
            self.path,
            "CREATE TABLE IF NOT EXISTS items (id TEXT PRIMARY KEY, prompt TEXT, first TEXT, "
            "second TEXT, swapped INTEGER, label TEXT, created REAL, labelled REAL, asked REAL)",
            key,
        )
        with self._lock, self._db:
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(items)")}
            if "asked" not in columns:  # a queue written before runs recorded when they asked
                self._db.execute("ALTER TABLE items ADD COLUMN asked REAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS status (id INTEGER PRIMARY KEY CHECK (id = 0), "
                "value TEXT)"
            )

    def add(self, prompt: str, current: str, perturbed: str, swapped: bool) -> str:
        """Queues a comparison (kept as is if already queued) and returns its id."""
        key = comparison_key(prompt, current, perturbed)
        first, second = (perturbed, current) if swapped else (current, perturbed)
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR IGNORE INTO items VALUES (?, ?, ?, ?, ?, NULL, ?, NULL, NULL)",
                (key, prompt, first, second, int(swapped), time.time()),
            )
        return key

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM items WHERE id = ?", (key,)
            ).fetchone()
        return dict(zip(_COLUMNS, row, strict=True)) if row else None

    def labels(self, keys: Iterable[str]) -> dict[str, str | None]:
        """The label (None: not yet) of each of ``keys``, all queued."""
        keys = list(dict.fromkeys(keys))
        with self._lock:
            rows = self._db.execute(
                f"SELECT id, label FROM items WHERE id IN ({', '.join('?' * len(keys))})", keys
            ).fetchall()
        return dict(rows)

    def ask(self, keys: Iterable[str]) -> float:
        """Marks ``keys`` as asked now (the page shows the latest asked first); returns the time."""
        now = time.time()
        with self._lock, self._db:
            rows = [(now, key) for key in keys]
            self._db.executemany("UPDATE items SET asked = ? WHERE id = ?", rows)
        return now

    def pending(self) -> list[dict[str, Any]]:
        """Unlabelled comparisons: the most recently asked batch first, each batch oldest first
        (comparisons a stopped run left behind come after those a run is waiting for)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM items WHERE label IS NULL "
                "ORDER BY asked IS NULL, asked DESC, created, id"
            ).fetchall()
        return [dict(zip(_COLUMNS, row, strict=True)) for row in rows]

    def label(self, key: str, answer: str) -> bool:
        """Stores ``answer`` (1, 2, tie, skip) for item ``key`` if it has no label yet.

        Returns:
            False if there is no such item or it was labelled before (the first answer stands:
            a run may already have used it).
        """
        if answer not in ANSWERS:
            raise ValueError(f"answer must be one of {ANSWERS}, got {answer!r}")
        with self._lock, self._db:
            cur = self._db.execute(
                "UPDATE items SET label = ?, labelled = ? WHERE id = ? AND label IS NULL",
                (answer, time.time(), key),
            )
        return cur.rowcount == 1

    def count(self) -> dict[str, int]:
        """How many comparisons are labelled and unlabelled in the whole queue."""
        with self._lock:
            labelled, pending = self._db.execute(
                "SELECT COUNT(label), COUNT(*) - COUNT(label) FROM items"
            ).fetchone()
        return {"labelled": labelled, "pending": pending}

    def set_status(self, *, new_run: bool = False, **changes: Any) -> None:
        """Merges ``changes`` (plain JSON values) into the asking run's status and stamps it.

        Args:
            new_run: Start from nothing: a new run forgets the last run's status.
            **changes: The fields to set.
        """
        with self._lock, self._db:
            row = None if new_run else self._db.execute("SELECT value FROM status").fetchone()
            status = {**(json.loads(row[0]) if row else {}), **changes, "updated": time.time()}
            self._db.execute("INSERT OR REPLACE INTO status VALUES (0, ?)", (json.dumps(status),))

    def status(self) -> dict[str, Any] | None:
        """The asking run's last status, or None if no run has asked through this queue."""
        with self._lock:
            row = self._db.execute("SELECT value FROM status WHERE id = 0").fetchone()
        return json.loads(row[0]) if row else None

    def close(self) -> None:
        with self._lock:
            self._db.close()


def verdict_of(item: dict[str, Any]) -> Judgement:
    """Turns a labelled item into a judgement of (current, perturbed)."""
    answer = item["label"]
    if answer == "skip":
        return Judgement(Verdict.TIE, None, "abstain: skipped by the human")
    if answer == "tie":
        return Judgement(Verdict.TIE, 1.0, "human: tie")
    first_wins = answer == "1"
    perturbed_wins = first_wins == bool(item["swapped"])
    verdict = Verdict.PERTURBED_BETTER if perturbed_wins else Verdict.CURRENT_BETTER
    side = "left (first)" if first_wins else "right (second)"
    return Judgement(verdict, 1.0, f"human chose the {side} response")
