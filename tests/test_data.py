"""Loading, validating and tokenizing preference files."""

from __future__ import annotations

import json

import pytest

from compo.data import PreferencePair, load_pairs
from compo.encoding import encode_pairs
from compo.errors import DataError

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
