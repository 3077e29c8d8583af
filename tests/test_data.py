"""Loading, validating and tokenizing preference files."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys

import pytest
from conftest import run_compo

from compo.clicks import clicks_to_pairs
from compo.data import load_pairs
from compo.encoding import encode_pairs
from compo.errors import DataError
from compo.readers import iter_records
from compo.rundir import write_jsonl
from compo.types import PreferencePair

GOOD = {"prompt": "Name a color.", "chosen": "Blue.", "rejected": "Seven."}


def test_default_data_loads_and_has_no_bad_rows():
    result = load_pairs()
    assert result.pairs and not result.rejected
    assert len({p.id for p in result.pairs}) == len(result.pairs)


def test_string_schema_with_optional_fields(write_jsonl):
    path = write_jsonl([{**GOOD, "id": 7, "confidence": 0.25, "clicks": 3}, GOOD])
    pairs = load_pairs(path).pairs
    assert [p.id for p in pairs] == ["7", "pairs-2"]
    assert pairs[0].confidence == 0.25 and pairs[0].metadata == {"clicks": 3}
    assert pairs[1].confidence == 1.0


def test_message_list_schema_shares_prompt_turns(write_jsonl):
    turns = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Capital of France?"},
    ]
    row = {
        "chosen": [*turns, {"role": "assistant", "content": "Paris."}],
        "rejected": [*turns, {"role": "assistant", "content": "Lyon."}],
    }
    pair = load_pairs(write_jsonl([row])).pairs[0]
    assert pair.prompt == turns and (pair.chosen, pair.rejected) == ("Paris.", "Lyon.")


def test_ultrafeedback_schema_prompt_string_and_two_message_lists(write_jsonl):
    row = {
        "prompt": "Capital of France?",
        "prompt_id": "abc",
        "chosen": [
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
        ],
        "rejected": [
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Lyon."},
        ],
        "score_chosen": 9.0,
        "score_rejected": 2.0,
    }
    pair = load_pairs(write_jsonl([row])).pairs[0]
    assert pair.prompt == [{"role": "user", "content": "Capital of France?"}]
    assert pair.metadata["score_chosen"] == 9.0


def _said(*contents):
    roles = ("user", "assistant")
    return [{"role": roles[i % 2], "content": c} for i, c in enumerate(contents)]


@pytest.mark.parametrize(
    ("prompt", "agrees"),
    [
        ("Capital of France?", True),
        ("  Capital of France?\n", True),
        (_said("Hi", "Hello", "Capital of France?"), True),
        ("Capital of Spain?", False),
        ("Hi", False),  # an earlier turn, not the question the replies answer
        (_said("Capital of France?"), False),  # the turns before it dropped
    ],
)
def test_a_given_prompt_must_agree_with_the_prompt_turns(write_jsonl, prompt, agrees):
    turns = _said("Hi", "Hello", "Capital of France?")
    row = {
        "prompt": prompt,
        "chosen": [*turns, {"role": "assistant", "content": "Paris."}],
        "rejected": [*turns, {"role": "assistant", "content": "Lyon."}],
    }
    path = write_jsonl([row])
    if agrees:
        assert load_pairs(path).pairs[0].prompt == turns
    else:
        with pytest.raises(DataError) as err:
            load_pairs(path)
        assert f"{path}: row 1: field 'prompt': differs from the prompt turns of 'chosen'" in str(
            err.value
        )


def test_hh_rlhf_raw_transcripts(write_jsonl):
    row = {
        "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?",
        "rejected": "\n\nHuman: Hi there\n\nAssistant: Go away.",
    }
    pair = load_pairs(write_jsonl([row])).pairs[0]
    assert pair.prompt == [{"role": "user", "content": "Hi there"}]
    assert pair.chosen == "Hello! How can I help?"


@pytest.mark.parametrize("fmt", ["json", "csv", "parquet"])
def test_other_formats(tmp_path, fmt):
    import datasets

    rows = [GOOD, {**GOOD, "chosen": "Red."}]
    path = tmp_path / f"pairs.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(rows))
    else:
        getattr(datasets.Dataset.from_list(rows), f"to_{fmt}")(str(path))
    assert [p.chosen for p in load_pairs(path).pairs] == ["Blue.", "Red."]


BAD_ROWS = [
    ({"chosen": "a", "rejected": "b"}, "field 'prompt': is missing"),
    ({"prompt": "q", "chosen": "   ", "rejected": "b"}, "field 'chosen': is empty"),
    ({"prompt": "q", "chosen": "a", "rejected": 5}, "field 'rejected'"),
    (
        {"prompt": "q", "chosen": "same", "rejected": "same"},
        "field 'rejected': is identical to chosen",
    ),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "confidence": 3}, "field 'confidence'"),
    ({"prompt": 12, "chosen": "a", "rejected": "b"}, "field 'prompt': expected a string"),
]


@pytest.mark.parametrize(("row", "message"), BAD_ROWS)
def test_bad_row_names_file_row_and_field(write_jsonl, row, message):
    path = write_jsonl([GOOD, row, GOOD])
    with pytest.raises(DataError) as err:
        load_pairs(path)
    text = str(err.value)
    assert str(path) in text and "row 2" in text and message in text
    assert "\n" not in text


def test_undecodable_bytes_and_invalid_json_are_located(write_jsonl):
    path = write_jsonl([GOOD, b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}', GOOD])
    with pytest.raises(DataError, match=r"row 2: undecodable bytes"):
        load_pairs(path)
    path = write_jsonl([GOOD, GOOD, '{"prompt": "q", "chosen": '], name="broken.jsonl")
    with pytest.raises(DataError, match=r"row 3: invalid JSON"):
        load_pairs(path)


def test_skip_mode_sets_every_bad_row_aside_with_reason(write_jsonl):
    rows = [GOOD, *(r for r, _ in BAD_ROWS), b"\xff\xfe not utf8", GOOD]
    result = load_pairs(write_jsonl(rows), on_error="skip")
    assert len(result.pairs) == 2
    assert len(result.rejected) == len(BAD_ROWS) + 1
    assert [r.row for r in result.rejected] == list(range(2, len(BAD_ROWS) + 3))
    assert all(r.reason for r in result.rejected)


def test_unreadable_and_unknown_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_pairs(tmp_path / "missing.jsonl")
    (tmp_path / "pairs.txt").write_text("x")
    with pytest.raises(DataError, match="unknown file type"):
        load_pairs(tmp_path / "pairs.txt")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"bad\.parquet"):
        load_pairs(tmp_path / "bad.parquet")


def test_duplicate_ids_are_errors(write_jsonl):
    with pytest.raises(DataError, match="duplicate id"):
        load_pairs(write_jsonl([{**GOOD, "id": "a"}, {**GOOD, "id": "a"}]))


def _write_rows(path, rows):
    """Writes dict rows in the format named by the path's extension."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# Type inference over a whole column must not change what any single row holds.


def test_one_float_id_is_an_error_of_its_own_row_only(write_jsonl):
    path = write_jsonl([{**GOOD, "id": 1}, {**GOOD, "id": 2.5}, {**GOOD, "id": 3}])
    result = load_pairs(path, on_error="skip")
    assert [p.id for p in result.pairs] == ["1", "3"]
    assert [(r.row, r.field) for r in result.rejected] == [(2, "id")]
    with pytest.raises(DataError, match=r"row 2: field 'id': expected a string or integer"):
        load_pairs(path)


def test_one_float_count_leaves_the_other_rows_untouched(write_jsonl):
    rows = [
        {**GOOD, "chosen": c, "clicks": n} for c, n in [("Blue.", 1), ("Red.", 2.5), ("Tan.", 3)]
    ]
    pairs = load_pairs(write_jsonl(rows)).pairs
    assert [type(p.metadata["clicks"]) for p in pairs] == [int, float, int]
    # A click log: one float click index is its own row's error, not every row's.
    log_rows = [{"prompt": "Q?", "responses": ["a", "b"], "clicks": c} for c in ([1], [1.5], [1])]
    path = write_jsonl(log_rows, name="clicks.jsonl")
    result = clicks_to_pairs(iter_records(path), str(path), on_error="skip")
    assert [(r.row, r.field) for r in result.rejected] == [(2, "clicks")]
    assert result.stats["n_impressions"] == 2


def test_csv_cells_are_text_never_missing_values_or_numbers(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text(
        "id,prompt,chosen,rejected,confidence\n"
        "007,Name a color.,None,N/A,0.5\n"
        "2,NA,42,41,\n"
        "3,What is 6 x 7?,null,NaN,1\n"
    )
    pairs = load_pairs(path).pairs
    assert [(p.id, p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ("007", "Name a color.", "None", "N/A"),
        ("2", "NA", "42", "41"),
        ("3", "What is 6 x 7?", "null", "NaN"),
    ]
    assert [p.confidence for p in pairs] == [0.5, 1.0, 1.0]  # an empty cell: not given


def test_csv_rejected_row_keeps_its_text(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected\nQ,Blue.,Red.\nQ,None,None\n")
    (bad,) = load_pairs(path, on_error="skip").rejected
    assert (bad.row, bad.field) == (2, "rejected")
    assert bad.record == {"prompt": "Q", "chosen": "None", "rejected": "None"}


def test_csv_confidence_is_a_number_checked_per_row(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text(
        "prompt,chosen,rejected,confidence\nQ,a,b,0.25\nQ,c,b,high\nQ,d,b,1.5\nQ,e,b,1\nQ,f,b,nan\n"
    )
    result = load_pairs(path, on_error="skip")
    assert [(p.chosen, p.confidence) for p in result.pairs] == [("a", 0.25), ("e", 1.0)]
    assert [(r.row, r.field) for r in result.rejected] == [
        (2, "confidence"),
        (3, "confidence"),
        (5, "confidence"),
    ]
    assert result.rejected[2].record["confidence"] == "nan"  # text: rejected_rows.jsonl is JSON
    with pytest.raises(DataError, match=r"row 2: field 'confidence': expected a number"):
        load_pairs(path)


def test_csv_row_with_extra_cells_is_an_error_of_its_own_row(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected\nQ,a,b\nQ,c,b,extra\nQ,d,b\n")
    result = load_pairs(path, on_error="skip")
    assert [p.chosen for p in result.pairs] == ["a", "d"]
    assert [(r.row, r.field) for r in result.rejected] == [(2, None)]
    assert "4 cells" in result.rejected[0].reason


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_json_number_as_reply_is_an_error_of_its_own_row(tmp_path, fmt):
    rows = [GOOD, {**GOOD, "chosen": 42}, {**GOOD, "rejected": 41.5}, GOOD]
    result = load_pairs(_write_rows(tmp_path / f"pairs.{fmt}", rows), on_error="skip")
    assert len(result.pairs) == 2
    assert [(r.row, r.field, r.reason) for r in result.rejected] == [
        (2, "chosen", "expected a string or chat messages, got int"),
        (3, "rejected", "expected a string or chat messages, got float"),
    ]


def test_json_lines_under_a_json_name_still_load(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "chosen": "Red."}) + "\n")
    assert [p.chosen for p in load_pairs(path).pairs] == ["Blue.", "Red."]


# Invalid JSON: one message, with compo's numbering, and nothing else printed or logged.

INVALID_JSON = [
    (
        "jsonl",
        '{"prompt": "q", "chosen": "a", "rejected": "b"}\n' * 2 + '{"prompt": "q", "chosen": \n',
    ),
    ("json", '[\n{"prompt": "q", "chosen": "a", "rejected": "b"},\n{"prompt": "q", "chosen": }\n]'),
]


@pytest.mark.parametrize(("fmt", "text"), INVALID_JSON)
def test_invalid_json_is_reported_once_with_compo_numbering(tmp_path, caplog, capfd, fmt, text):
    path = tmp_path / f"broken.{fmt}"
    path.write_text(text)
    with caplog.at_level(logging.DEBUG), pytest.raises(DataError) as err:
        load_pairs(path)
    where = "row 3: invalid JSON" if fmt == "jsonl" else "line 3, column 27: invalid JSON"
    assert str(err.value).startswith(f"{path}: {where}")
    assert "\n" not in str(err.value)
    out, errs = capfd.readouterr()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "row 2" not in out + errs + logged and "pyarrow" not in (out + errs + logged).lower()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


COMPO = [sys.executable, "-m", "compo", "model=tiny"]


def test_cli_prints_invalid_json_once(tmp_path, write_jsonl):
    data = write_jsonl([GOOD, GOOD, '{"prompt": "q", "chosen": '], name="bad.jsonl")
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [*COMPO, f"data.path={data}", "optimizer=none", "eval=none", f"hydra.run.dir={run_dir}"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"compo: error: {data}: row 3: invalid JSON: Expecting value at column 27 "
        "(data.on_error=skip sets such rows aside)"
    ]
    logs = "".join(p.read_text() for p in run_dir.rglob("*.log"))
    everything = proc.stdout + proc.stderr + logs
    assert "row 2" not in everything and "pyarrow" not in everything.lower()


# A file's content, not its path and mtime, decides what is loaded.


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_file_rewritten_with_the_same_mtime_is_read_again(tmp_path, fmt):
    path = _write_rows(
        tmp_path / f"pairs.{fmt}", [{**GOOD, "chosen": "Blue.", "rejected": "Green"}]
    )
    assert load_pairs(path).pairs[0].chosen == "Blue."
    before = path.stat()
    for chosen, rejected in [("Green", "Blue."), ("Turquoise.", "Blue.")]:  # same size, then not
        _write_rows(path, [{**GOOD, "chosen": chosen, "rejected": rejected}])
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert load_pairs(path).pairs[0].chosen == chosen


def test_encoding_applies_chat_template_and_ends_replies_with_eos(tiny):
    _, tokenizer = tiny
    pair = PreferencePair("x", "Hi?", "Hello.", "Bye.")
    (enc,), report = encode_pairs([pair], tokenizer, max_length=128, max_prompt_length=64)
    prompt = tokenizer.decode(enc.prompt_ids)
    assert prompt == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(enc.chosen_ids) == "Hello.<|im_end|>"
    assert report.n_prompt_truncated == report.n_chosen_truncated == 0
    (plain,), _ = encode_pairs([pair], tokenizer, 128, 64, chat_template="never")
    assert tokenizer.decode(plain.prompt_ids) == "Hi?"


def test_truncation_cuts_prompt_left_and_reply_right_and_counts(tiny):
    _, tokenizer = tiny
    pair = PreferencePair("x", "abcdefghijklmnopqrstuvwxyz", "0123456789" * 3, "short")
    (enc,), report = encode_pairs([pair], tokenizer, 30, 10, chat_template="never")
    assert tokenizer.decode(enc.prompt_ids) == "qrstuvwxyz"
    assert tokenizer.decode(enc.chosen_ids) == ("0123456789" * 2)
    assert tokenizer.decode(enc.rejected_ids) == "short<|im_end|>"
    assert (report.n_prompt_truncated, report.n_chosen_truncated, report.n_rejected_truncated) == (
        1,
        1,
        0,
    )


def test_identical_after_truncation_is_counted(tiny):
    _, tokenizer = tiny
    pair = PreferencePair("x", "q", "same prefix, then A", "same prefix, then B")
    _, report = encode_pairs([pair], tokenizer, 8, 2, chat_template="never")
    assert report.n_identical_after_truncation == 1


# ---------------------------------------------------------------- found by a hostile probe
GOOD_ROW = {"prompt": "Name a color.", "chosen": "Blue.", "rejected": "Seven."}


@pytest.mark.parametrize(
    "line",
    [
        '{"prompt": "q", "chosen": "a", "rejected": "b", "n": ' + "9" * 5000 + "}",  # int limit
        "[" * 100_000 + "]" * 100_000,  # nesting deeper than the recursion limit
        '{"prompt": "q", "chosen": "a", "rejected": "b", "confidence": 1' + "0" * 400 + "}",
        '{"prompt": "q\\ud800", "chosen": "a", "rejected": "b"}',  # a lone surrogate
        '{"prompt": "q", "chosen": "a", "rejected": "b", "note": "\\udc80"}',
    ],
    ids=["huge-int", "deep", "huge-confidence", "surrogate-text", "surrogate-metadata"],
)
def test_hostile_rows_are_errors_of_their_own_row(write_jsonl, tmp_path, line):
    path = write_jsonl([GOOD_ROW, line, {**GOOD_ROW, "chosen": "Red."}])
    with pytest.raises(DataError, match=rf"{path.name}: row 2"):
        load_pairs(path)
    loaded = load_pairs(path, on_error="skip")
    assert [p.chosen for p in loaded.pairs] == ["Blue.", "Red."]
    assert [r.row for r in loaded.rejected] == [2]
    write_jsonl_file = tmp_path / "rejected.jsonl"
    from compo.rundir import write_jsonl as write_rows

    write_rows(write_jsonl_file, [r.to_dict() for r in loaded.rejected])  # the record is writable


def test_parquet_metadata_of_any_type_reaches_the_run_dir(tmp_path):
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    from compo.rundir import write_jsonl as write_rows

    table = pa.table(
        {
            "prompt": ["q1", "q2"],
            "chosen": ["a", "c"],
            "rejected": ["b", "d"],
            "when": [datetime.datetime(2026, 1, 1), datetime.datetime(2026, 1, 2)],
            "blob": [b"\x00\x01", b"\xff"],
        }
    )
    path = tmp_path / "pairs.parquet"
    pq.write_table(table, path)
    pairs = load_pairs(path).pairs
    write_rows(tmp_path / "split.jsonl", [p.to_dict() for p in pairs])  # used to raise TypeError
    rows = [json.loads(x) for x in (tmp_path / "split.jsonl").read_text().splitlines()]
    assert rows[0]["when"].startswith("2026-01-01")


@pytest.mark.parametrize("unpaired", [False, True])
def test_a_written_row_reads_back_as_the_same_item(tmp_path, unpaired):
    # A run's split/ambiguous.jsonl is a valid data file (e.g. for optimizer.pairs_path): reading
    # it back must give the same items, not metadata nested under a "metadata" key.
    row = {"id": "r1", "prompt": "q", "confidence": 0.75, "prompt_id": "p7", "label_correct": True}
    row |= {"completion": "a", "label": False} if unpaired else {"chosen": "a", "rejected": "b"}
    source = tmp_path / "source.jsonl"
    source.write_text(json.dumps(row) + "\n", encoding="utf-8")
    first = load_pairs(source, unpaired=unpaired).pairs
    again = tmp_path / "again.jsonl"
    write_jsonl(again, [p.to_dict() for p in first])
    second = load_pairs(again, unpaired=unpaired).pairs
    assert second == first
    assert first[0].metadata == {"prompt_id": "p7", "label_correct": True}


def test_a_directory_or_device_is_named_as_such(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        load_pairs(tmp_path)
    with pytest.raises(DataError, match="is not a regular file"):
        load_pairs("/dev/null")


@pytest.mark.parametrize("path", ["", "  "])
def test_an_empty_path_is_an_error_not_the_default_set(path):
    with pytest.raises(DataError, match=r"^empty path; give a file"):
        load_pairs(path)


ALL_BAD = [{"prompt": "q", "chosen": "a"}, {"prompt": "q", "chosen": "a", "rejected": "a"}]


def test_no_valid_row_names_the_first_rejected_row(write_jsonl):
    path = write_jsonl(ALL_BAD, name="allbad.jsonl")
    with pytest.raises(DataError) as err:
        load_pairs(path, on_error="skip")
    message = str(err.value)
    assert message == (
        f"{path}: no valid row (2 rows rejected; the first: row 1: field 'rejected': is missing)"
    )
    assert [r.row for r in err.value.rejected] == [1, 2]


@pytest.mark.parametrize(
    ("setting", "written"),
    [("data.path", "rejected_rows"), ("optimizer.pairs_path", "rejected_rows.optimizer")],
)
def test_a_run_without_a_valid_row_still_writes_the_rejected_rows(
    write_jsonl, tmp_path, setting, written
):
    path = write_jsonl(ALL_BAD, name="allbad.jsonl")
    run_dir = tmp_path / "run"
    stages = ["eval=none", "splitter=none", "dpo=none", "data.limit=4"]
    optimizer = (
        ["optimizer=compo_tiny", "oracle=likelihood"]
        if "optimizer" in setting
        else ["optimizer=none"]
    )
    with pytest.raises(DataError, match=rf"row 1: field 'rejected': is missing.*{written}\.jsonl"):
        run_compo(run_dir, f"{setting}={path}", "data.on_error=skip", *stages, *optimizer)
    rejected = [json.loads(line) for line in (run_dir / f"{written}.jsonl").open()]
    assert [(r["row"], r["field"]) for r in rejected] == [(1, "rejected"), (2, "rejected")]


# A key written twice: json keeps the last value and drops the other without a word.
DUPLICATE_KEYS = [
    ("jsonl", '{"prompt": "q", "chosen": "a", "rejected": "b"}\n' * 2
     + '{"prompt": "q", "chosen": "a", "chosen": "c", "rejected": "b"}\n'),
    ("json", '[{"prompt": "q", "chosen": "a", "rejected": "b"},\n'
     '{"prompt": "q", "chosen": "a", "rejected": "b"},\n'
     '{"prompt": "q", "chosen": "a", "chosen": "c", "rejected": "b"}]'),
    ("jsonl", '{"prompt": "q", "chosen": "a", "rejected": "b"}\n' * 2
     + '{"prompt": [{"role": "user", "content": "q", "content": "r"}], '
     '"chosen": "a", "rejected": "b"}\n'),
]  # fmt: skip


@pytest.mark.parametrize(("fmt", "text"), DUPLICATE_KEYS)
def test_a_key_written_twice_in_a_row_is_a_row_error(tmp_path, fmt, text):
    path = tmp_path / f"dup.{fmt}"
    path.write_text(text)
    with pytest.raises(DataError, match=r"row 3: .*more than once") as err:
        load_pairs(path)
    assert "\n" not in str(err.value)
    loaded = load_pairs(path, on_error="skip")
    assert len(loaded.pairs) == 2 and [r.row for r in loaded.rejected] == [3]


@pytest.mark.parametrize(("name", "text"), [
    ("e.jsonl", ""), ("e.jsonl", "\n  \n"), ("e.json", ""), ("e.json", "[]"), ("e.json", " \n"),
    ("e.csv", ""), ("e.csv", "prompt,chosen,rejected\n"),
])  # fmt: skip
def test_a_file_without_rows_says_so_in_the_same_words_in_every_format(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError) as err:
        load_pairs(path, on_error="skip")
    assert str(err.value) == f"{path}: holds no rows"


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_a_field_no_row_has_is_said_of_the_file_not_of_row_1(tmp_path, fmt):
    # A CSV header (or a schema) without 'rejected' was "row 1: field 'rejected': is missing
    # (data.on_error=skip sets such rows aside)": skipping would set every row aside.
    rows = [
        {"prompt": "Q", "chosen": "a", "other": "b"},
        {"prompt": "R", "chosen": "c", "other": "d"},
    ]
    path = _write_rows(tmp_path / f"pairs.{fmt}", rows)
    with pytest.raises(DataError) as info:
        load_pairs(path)
    assert str(info.value) == (
        f"{path}: no row has a 'rejected' field (row 1 has: chosen, other, prompt)"
    )


def test_a_field_missing_from_some_rows_stays_an_error_of_the_first_such_row(write_jsonl):
    path = write_jsonl([{"prompt": "Q", "chosen": "a"}, GOOD])
    with pytest.raises(DataError, match=r"row 1: field 'rejected': is missing \(data\.on_error"):
        load_pairs(path)


def test_a_column_empty_in_every_row_is_said_of_the_file(tmp_path):
    # "row 1: field 'rejected': is empty (data.on_error=skip sets such rows aside)": skipping
    # would set every row aside.
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected\nQ,a,\nR,b, \n")
    with pytest.raises(DataError) as info:
        load_pairs(path)
    assert str(info.value) == f"{path}: 'rejected' is empty in every row"
    path.write_text("prompt,chosen,rejected\nQ,a,\nR,b,c\n")  # one row has it: that row's error
    with pytest.raises(DataError, match=r"row 1: field 'rejected': is empty \(data\.on_error"):
        load_pairs(path)
