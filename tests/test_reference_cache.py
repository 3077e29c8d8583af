"""The on-disk cache of the reference pass (``reference_cache``): it never changes a result."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from conftest import EASY_PAIRS, mixed_pair_rows, run_compo
from safetensors.torch import load_file

from compo import reference_cache, state
from compo.encoding import encode_examples, encode_pairs
from compo.models import TinyModel
from compo.reference import ReferenceScores, cached_scores
from compo.reference_cache import ReferenceCache
from compo.scoring import score_pairs
from compo.settings import SettingError
from compo.trunk import FrozenTrunkCache
from compo.types import UnpairedExample

FIELDS = ("sum_logps", "mean_logps", "n_tokens", "head_logps")


def _same_scores(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for field in FIELDS:
            assert torch.equal(getattr(x, field), getattr(y, field)), field


class Counting:
    """A reference pass (scores through ``trunk`` when given) that counts its calls."""

    def __init__(self, model, encoded, pad, batch_size=8, trunk=None):
        self.model, self.encoded, self.pad, self.batch_size, self.trunk = (
            model, encoded, pad, batch_size, trunk,
        )  # fmt: skip
        self.calls = 0

    def __call__(self):
        self.calls += 1
        scorer = self.model if self.trunk is None else self.trunk.filling()
        return score_pairs(scorer, self.encoded, self.pad, batch_size=self.batch_size)


def _fetch(cache, model, encoded, pad, batch_size=8, trunk=None):
    """(scores, hit, passes run) of one lookup."""
    compute = Counting(model, encoded, pad, batch_size, trunk)
    scores, hit = cache.fetch(model, encoded, pad, batch_size, trunk, compute)
    assert compute.calls == (0 if hit else 1)
    return scores, hit


def test_a_hit_returns_the_pass_bit_for_bit_and_fills_the_trunk_as_it_would(tiny, tmp_path):
    model, tokenizer = tiny
    pad = tokenizer.pad_token_id
    encoded, _ = encode_pairs(EASY_PAIRS * 2, tokenizer)  # repeated sequences: recorded once
    cache = ReferenceCache(tmp_path / "cache")  # created on the first write
    computed_trunk, loaded_trunk = FrozenTrunkCache(model, 1), FrozenTrunkCache(model, 1)
    computed, hit = _fetch(cache, model, encoded, pad, 3, computed_trunk)
    assert not hit
    loaded, hit = _fetch(cache, model, encoded, pad, 3, loaded_trunk)
    assert hit
    _same_scores(computed, loaded)
    assert list(loaded_trunk.states) == list(computed_trunk.states)  # same keys, same order
    for ids, recorded in computed_trunk.states.items():
        got = loaded_trunk.states[ids]
        assert got.dtype == recorded.dtype and torch.equal(got, recorded)
    # The loaded states serve the top blocks as the recorded ones do.
    _same_scores(
        score_pairs(computed_trunk.cached(), encoded, pad),
        score_pairs(loaded_trunk.cached(), encoded, pad),
    )


def test_unpaired_examples_are_cached_too(tiny, tmp_path):
    model, tokenizer = tiny
    examples = [
        UnpairedExample("a", "Hi", "Hello!", True),
        UnpairedExample("b", "Hi", "Go.", False),
    ]
    encoded, _ = encode_examples(examples, tokenizer)
    cache = ReferenceCache(tmp_path)
    first, hit = _fetch(cache, model, encoded, tokenizer.pad_token_id)
    again, hit_again = _fetch(cache, model, encoded, tokenizer.pad_token_id)
    assert len(first) == 1 and (hit, hit_again) == (False, True)
    _same_scores(first, again)


def test_whatever_changes_the_numbers_misses(tiny, tmp_path):
    model, tokenizer = tiny
    pad = tokenizer.pad_token_id
    encoded, _ = encode_pairs(EASY_PAIRS, tokenizer)
    cache = ReferenceCache(tmp_path)
    assert not _fetch(cache, model, encoded, pad)[1]
    assert _fetch(cache, model, encoded, pad)[1]
    shorter, _ = encode_pairs(EASY_PAIRS, tokenizer, max_length=30, max_prompt_length=20)
    other_seed, _ = TinyModel(seed=1).load()
    bf16, _ = TinyModel(seed=0, dtype="bfloat16").load()
    changes = {
        "another starting model (seed)": (other_seed, encoded, pad, 8, None),
        "another dtype": (bf16, encoded, pad, 8, None),
        "other pairs": (model, encoded[:3], pad, 8, None),
        "another pair order": (model, encoded[::-1], pad, 8, None),
        "another max_length": (model, shorter, pad, 8, None),
        "another batch size": (model, encoded, pad, 3, None),
        "another padding id": (model, encoded, pad - 1, 8, None),
        "a trunk to fill": (model, encoded, pad, 8, FrozenTrunkCache(model, 1)),
    }
    for what, args in changes.items():
        assert not _fetch(cache, *args)[1], what
    with torch.no_grad():  # one weight, by a hair
        model.lm_head.weight[0, 0] += 1e-6
    assert not _fetch(cache, model, encoded, pad)[1], "another weight"


@pytest.mark.parametrize(
    "damage",
    ["flip a byte", "truncate", "delete the data", "garbage json", "edit the parts", "swap files"],
)
def test_a_damaged_entry_is_one_warning_and_recomputed_never_used(tiny, tmp_path, caplog, damage):
    model, tokenizer = tiny
    pad = tokenizer.pad_token_id
    encoded, _ = encode_pairs(EASY_PAIRS, tokenizer)
    cache = ReferenceCache(tmp_path)
    trunk = FrozenTrunkCache(model, 1)
    computed, _ = _fetch(cache, model, encoded, pad, trunk=trunk)
    (index,) = tmp_path.glob("*.json")
    record = json.loads(index.read_text())
    data = tmp_path / record["file"]
    if damage == "flip a byte":
        blob = bytearray(data.read_bytes())
        blob[-5] ^= 0xFF
        data.write_bytes(bytes(blob))
    elif damage == "truncate":
        data.write_bytes(data.read_bytes()[:100])
    elif damage == "delete the data":
        data.unlink()
    elif damage == "garbage json":
        index.write_text("{not json")
    elif damage == "edit the parts":
        record["parts"]["batch_size"] = 3
        index.write_text(json.dumps(record))
    else:  # another entry's (valid) data under this entry's name
        _fetch(cache, model, encoded[:2], pad)
        other = next(p for p in tmp_path.glob("*.safetensors") if p != data)
        data.write_bytes(other.read_bytes())
    caplog.set_level(logging.INFO, logger="compo.reference_cache")
    again, hit = _fetch(cache, model, encoded, pad, trunk=FrozenTrunkCache(model, 1))
    assert not hit
    _same_scores(computed, again)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unusable" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()
    # Overwritten with a valid entry: the next lookup is a hit again.
    assert _fetch(cache, model, encoded, pad, trunk=FrozenTrunkCache(model, 1))[1]


def test_two_writers_of_one_entry_each_leave_a_valid_one(tiny, tmp_path, monkeypatch):
    """Whatever the interleaving, the entry's JSON names a complete data file matching it: here
    writer B stores its whole entry between writer A's data file and A's JSON."""
    model, tokenizer = tiny
    pad = tokenizer.pad_token_id
    encoded, _ = encode_pairs(EASY_PAIRS, tokenizer)
    cache = ReferenceCache(tmp_path)
    parts = reference_cache.key_parts(model, encoded, pad, 8)
    key = state.fingerprint(parts)
    scores_a = score_pairs(model, encoded, pad)
    scores_b = tuple(  # another writer's (different) numbers for the same entry
        type(s)(s.sum_logps + 1, s.mean_logps, s.n_tokens, head_logps=s.head_logps)
        for s in scores_a
    )
    real_write_json = reference_cache.atomic_write_json

    def a_then_b(path, record):
        monkeypatch.setattr(reference_cache, "atomic_write_json", real_write_json)
        cache._store(key, parts, scores_b, None, "b")  # B: data and JSON, all at once
        real_write_json(path, record)  # then A's JSON

    monkeypatch.setattr(reference_cache, "atomic_write_json", a_then_b)
    cache._store(key, parts, scores_a, None, "a")
    loaded, hit = _fetch(cache, model, encoded, pad)
    assert hit  # A's JSON won and names A's data, not B's
    _same_scores(loaded, scores_a)


def test_cached_scores_for_scripts(tiny, tmp_path):
    model, tokenizer = tiny
    pad = tokenizer.pad_token_id
    encoded, _ = encode_pairs(EASY_PAIRS, tokenizer)
    direct = score_pairs(model, encoded, pad, batch_size=4)
    for _ in range(2):  # a miss, then a hit: the same numbers
        _same_scores(cached_scores(model, encoded, pad, 4, tmp_path, desc=None), direct)
    assert len(list(tmp_path.glob("*.json"))) == 1
    _same_scores(cached_scores(model, encoded, pad, 4, None, desc=None), direct)
    # The same entry as a run's trunk-less reference pass of that batch size.
    reference = ReferenceScores(model, encoded, pad, 4, None, cache=ReferenceCache(tmp_path))
    reference.get()
    assert reference.cache_metrics() == {"cache_hit": 1}


def test_the_entry_records_key_parts_only(tiny, tmp_path):
    model, tokenizer = tiny
    encoded, _ = encode_pairs(EASY_PAIRS, tokenizer)
    _fetch(ReferenceCache(tmp_path), model, encoded, tokenizer.pad_token_id)
    (index,) = tmp_path.glob("*.json")
    record = json.loads(index.read_text())
    assert set(record) == {"format", "key", "parts", "file", "sha256", "bytes", "trunk_sequences"}
    assert set(record["parts"]) == {
        "format", "weights", "model", "runtime", "pad_token_id", "batch_size", "sequences", "trunk"
    }  # fmt: skip
    assert str(tmp_path) not in index.read_text()


def test_a_path_that_is_no_writable_directory_is_refused_where_built(tmp_path, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(SettingError, match=r"^reference_cache=.*/file: not a directory$"):
        ReferenceCache(str(a_file))
    with pytest.raises(SettingError, match=r"not a directory \(.*/file is a file\)$"):
        ReferenceCache(str(a_file / "below"))
    with pytest.raises(SettingError, match="must be a directory or null"):
        ReferenceCache("")
    with pytest.raises(SettingError, match="must be a string"):
        ReferenceCache(3)
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # root writes anywhere
    with pytest.raises(SettingError, match=r"is not writable$"):
        ReferenceCache(str(tmp_path / "new"))
    assert ReferenceCache.at(None) is None


def test_the_cli_refuses_a_file_as_the_cache_in_one_line(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    done = subprocess.run(
        [sys.executable, "-m", "compo", "model=tiny", f"hydra.run.dir={tmp_path / 'run'}",
         f"reference_cache={a_file}"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"compo: error: reference_cache={a_file}: not a directory"
    ]
    assert not (tmp_path / "run" / "metrics.json").exists()


# ---- end to end: a run with the cache on is the run with it off, on a miss and on a hit ----

RUNS = {
    # eval.before's pass fills the trunk (last_k=1 of 2 blocks), the splitter and DPO reuse it;
    # the held-out pairs have a pass of their own.
    "shared pass": [
        "splitter=likelihood_margin", "splitter.delta=10", "dpo.last_k=1", "dpo.lr=1e-3",
        "optimizer=compo_tiny", "oracle=likelihood", "data.eval_fraction=0.34",
    ],
    # Nothing asks before DPO, which runs its own pass (and fills its trunk).
    "DPO's own pass": [
        "eval=none", "splitter=none", "dpo.last_k=1", "dpo.lr=1e-3", "optimizer=none",
        "oracle=none",
    ],
}  # fmt: skip
HITS = {
    "shared pass": ("reference.cache_hit", "reference.heldout.cache_hit"),
    "DPO's own pass": ("dpo.reference_cache_hit",),
}


def _comparable(metrics: dict) -> dict:
    timing = ("seconds", "per_second")  # wall-clock measurements
    return {
        k: v
        for k, v in metrics.items()
        if not k.endswith(timing) and not k.startswith("reference.") and "cache_hit" not in k
    }


@pytest.mark.parametrize("case", list(RUNS))
def test_the_cache_changes_no_metric_and_no_weight(tmp_path, write_jsonl, case):
    pairs = write_jsonl(mixed_pair_rows())
    args = [f"data.path={pairs}", *RUNS[case]]
    cache = f"reference_cache={tmp_path / 'cache'}"
    off = run_compo(tmp_path / "off", *args)
    miss = run_compo(tmp_path / "miss", *args, cache)
    hit = run_compo(tmp_path / "hit", *args, cache)
    assert not any("cache_hit" in k for k in off) and off["dpo.steps_run"] > 0
    for key in HITS[case]:
        assert (miss[key], hit[key]) == (0, 1), key
    assert _comparable(off) == _comparable(miss) == _comparable(hit)
    weights = [
        load_file(tmp_path / d / "checkpoint" / "model.safetensors") for d in ("off", "miss", "hit")
    ]
    for other in weights[1:]:
        assert other.keys() == weights[0].keys()
        assert all(torch.equal(other[k], weights[0][k]) for k in other)
    # The training pairs' entry holds the trunk's states; the held-out pairs' none.
    records = [json.loads(p.read_text()) for p in (tmp_path / "cache").glob("*.json")]
    assert sorted(r["parts"]["trunk"] is not None for r in records) == (
        [False, True] if case == "shared pass" else [True]
    )
    assert all(r["trunk_sequences"] for r in records if r["parts"]["trunk"])
