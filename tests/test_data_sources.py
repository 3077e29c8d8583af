"""data.path beyond files: a ``datasets.save_to_disk`` directory and a hub dataset id, whose rows
go through the same per-row validation as a file's; offline and unreachable hubs are one line."""

from __future__ import annotations

import os
import subprocess
import sys

import datasets
import pytest
from conftest import mixed_pair_rows

from compo import sources
from compo.data import DataSpec, load_pairs
from compo.errors import CompoError, DataError

ROWS = [{**row, "confidence": 0.5 + i / 40} for i, row in enumerate(mixed_pair_rows())]


@pytest.fixture
def offline(monkeypatch):
    """The hub unreachable by configuration, as HF_DATASETS_OFFLINE=1 at start-up makes it."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def _saved(tmp_path, rows, name="saved"):
    path = tmp_path / name
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def test_a_save_to_disk_directory_loads_like_the_same_rows_in_a_jsonl_file(tmp_path, write_jsonl):
    from_file = load_pairs(write_jsonl(ROWS))
    from_disk = load_pairs(_saved(tmp_path, ROWS))
    assert from_disk.pairs == from_file.pairs and not from_disk.rejected
    assert [p.confidence for p in from_disk.pairs] == [r["confidence"] for r in ROWS]


def test_conversational_rows_in_a_saved_dataset_are_parsed(tmp_path, write_jsonl):
    rows = [
        {
            "chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": "Yes."}],
            "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": "No."}],
        }
        for q in ("Is water wet?", "Is the sky blue?")
    ]
    from_disk = load_pairs(_saved(tmp_path, rows)).pairs
    assert [p.prompt for p in from_disk] == [[r["chosen"][0]] for r in rows]
    assert [p.id for p in from_disk] == ["saved-1", "saved-2"]  # default ids: directory name
    assert [(p.chosen, p.rejected) for p in from_disk] == [("Yes.", "No.")] * 2
    assert from_disk == [
        type(p)(**{**vars(p), "id": f"saved-{i}"})
        for i, p in enumerate(load_pairs(write_jsonl(rows)).pairs, start=1)
    ]


def test_a_bad_row_of_a_saved_dataset_is_an_error_of_its_own_row(tmp_path):
    rows = [dict(r) for r in ROWS]
    rows[2]["rejected"] = rows[2]["chosen"]
    rows[4]["rejected"] = None  # a null in an Arrow string column: a missing field
    path = _saved(tmp_path, rows)
    with pytest.raises(DataError) as info:
        load_pairs(path)
    assert str(info.value) == (
        f"{path}: row 3: field 'rejected': is identical to chosen "
        "(data.on_error=skip sets such rows aside)"
    )
    result = load_pairs(path, on_error="skip")
    assert [(r.row, r.field, r.reason) for r in result.rejected] == [
        (3, "rejected", "is identical to chosen"),
        (5, "rejected", "is missing"),
    ]
    assert len(result.pairs) == len(rows) - 2


def test_a_saved_dataset_dict_takes_data_split(tmp_path):
    path = tmp_path / "dd"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(ROWS[:4]),
            "test": datasets.Dataset.from_list(ROWS[4:]),
        }
    ).save_to_disk(str(path))
    assert len(DataSpec(path=str(path)).load().pairs) == 4
    assert [p.id for p in DataSpec(path=str(path), split="test").load().pairs] == [
        r["id"] for r in ROWS[4:]
    ]
    with pytest.raises(DataError, match=r"no split 'validation' \(data.split\); it has"):
        load_pairs(path, split="validation")
    with pytest.raises(CompoError, match=r"^data\.split must be a string"):
        DataSpec(path=str(path), split=3)


def test_a_plain_directory_is_not_taken_for_a_dataset(tmp_path):
    with pytest.raises(DataError, match="is a directory, and not one written by datasets"):
        load_pairs(tmp_path)


def test_an_unknown_hub_id_offline_is_one_line(offline):
    with pytest.raises(DataError) as info:
        load_pairs("nobody/no-such-preference-set")
    message = str(info.value)
    assert message.startswith("data.path='nobody/no-such-preference-set': no such local file")
    assert "offline" in message and "\n" not in message
    # A missing file with one of our extensions stays a missing file (no hub round trip).
    with pytest.raises(DataError, match="no such file"):
        load_pairs("nobody/pairs.jsonl")


@pytest.mark.parametrize(
    "path", ["d/pairs_typo", "d", "./pairs_typo", "~/no-such-pairs", "pairs.jsnol", "d/pairs.Json"]
)
def test_a_local_looking_path_never_tries_the_hub(tmp_path, monkeypatch, path):
    # Its first component exists here, or it starts with ./ or ~, or has a file extension.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "d").mkdir()

    def no_hub(name, split):
        raise AssertionError(f"tried the hub for {name!r}")

    monkeypatch.setattr(sources, "read_hub", no_hub)
    with pytest.raises(
        DataError, match=r"(no such file|not one written by datasets\.save_to_disk)$"
    ):
        load_pairs(path)


def test_trying_the_hub_logs_no_retries(monkeypatch, caplog):
    # The hub's retries (about 23 s, 11 warnings without a network) are not the user's news.
    import huggingface_hub

    def load_dataset(name, split):
        huggingface_hub.utils.logging.get_logger("huggingface_hub.utils._http").warning("Retry")
        raise ConnectionError(f"Couldn't reach {name!r} on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with caplog.at_level("INFO"), pytest.raises(DataError, match="ConnectionError: Couldn't"):
        load_pairs("nobody/no-such-preference-set")
    assert [r.name for r in caplog.records] == ["compo.sources"], caplog.records


def test_cli_with_an_unreachable_hub_id_ends_in_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "compo",
            "model=tiny",
            "data.path=nobody/no-such-pairs",
            "data.split=test",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "compo: error: data.path='nobody/no-such-pairs': no such local file or directory"
    ), lines
