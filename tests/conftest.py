"""Shared fixtures: tiny offline models and small preference files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from compo.cli import CONFIG_DIR, run
from compo.encoding import encode_pairs
from compo.models import TinyModel
from compo.types import PreferencePair

EASY_PAIRS = [
    PreferencePair(
        "p1", "Name three primary colors.", "Red, blue and yellow.", "Bananas are tall."
    ),
    PreferencePair("p2", "What is 2 + 2?", "2 + 2 = 4.", "It is a fish."),
    PreferencePair("p3", "Say hello in French.", "Bonjour!", "Potato potato potato."),
    PreferencePair("p4", "Capital of Italy?", "Rome.", "I do not like questions."),
]

QUESTIONS = [
    ("Name a color.", "Blue."),
    ("What is 2+2?", "4."),
    ("Capital of Italy?", "Rome."),
    ("Name a fruit.", "Apple."),
    ("Opposite of hot?", "Cold."),
    ("Name a planet.", "Mars."),
]


def mixed_pair_rows() -> list[dict]:
    """12 rows: per question a clear pair (a long refusal loses) and a near-identical one.

    Under the tiny byte-level model (splitter.delta=10) they split 6 clean / 6 ambiguous.
    """
    refusal = "I refuse to answer that question, it is boring and far too long for me."
    rows = []
    for i, (question, answer) in enumerate(QUESTIONS):
        for pid, rejected in ((f"clear{i}", refusal), (f"amb{i}", answer + "!")):
            rows.append({"id": pid, "prompt": question, "chosen": answer, "rejected": rejected})
    return rows


@pytest.fixture
def one_thread():
    """One torch thread for the test (step-by-step decoding of a tiny model oversubscribes
    shared CPUs with more); the previous count is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny():
    """A fresh tiny model and its tokenizer (fresh per test: tests may train it)."""
    return TinyModel(seed=0).load()


@pytest.fixture
def easy_encoded(tiny):
    """The four easy pairs, encoded with the tiny tokenizer's chat template."""
    _, tokenizer = tiny
    encoded, _ = encode_pairs(EASY_PAIRS, tokenizer, max_length=256, max_prompt_length=128)
    return encoded


@pytest.fixture(params=["directory", "text file"])
def no_sqlite_file(request, tmp_path):
    """A path an sqlite store (verdict cache, label queue) cannot open, and how it is refused."""
    path = tmp_path / "store"
    if request.param == "directory":
        path.mkdir()
        return path, "is a directory"
    path.write_text("not a database\n")
    return path, "is not a sqlite database"


@pytest.fixture
def write_jsonl(tmp_path):
    """Writes rows (dicts, or raw strings/bytes as lines) to a JSONL file and returns its path."""

    def _write(rows, name: str = "pairs.jsonl") -> Path:
        path = tmp_path / name
        with open(path, "wb") as handle:
            for row in rows:
                if isinstance(row, bytes):
                    handle.write(row + b"\n")
                elif isinstance(row, str):
                    handle.write(row.encode() + b"\n")
                else:
                    handle.write(json.dumps(row).encode() + b"\n")
        return path

    return _write


def compose_config(*overrides: str):
    """The config ``compo model=tiny <overrides>`` would run (Hydra's own node left out)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=["model=tiny", *overrides])


def run_compo(run_dir, *overrides: str) -> dict:
    """Runs ``compo model=tiny <overrides>`` in this process (no interpreter start, no Hydra app)
    and returns its metrics. Subprocess tests are kept for what only a real process shows: exit
    status, one-line errors, Hydra's own files, torchrun and SIGKILL."""
    return run(compose_config(*overrides), Path(run_dir))
