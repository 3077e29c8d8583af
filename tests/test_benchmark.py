"""The noisy-feedback benchmark: utility rules, simulated users, determinism, the aggregator."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import pytest

from compo.data import load_pairs
from compo.rundir import write_jsonl

# The benchmark scripts live in experiments/ (not an installed package): import from the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments.benchmark import aggregate, simulate
from experiments.benchmark.utility import (
    HiddenUtility,
    hashed_encoder,
    is_complete,
    overlength,
    repetition,
)

PROMPTS = [
    ("What is the capital of France?", ["Paris is the capital.", "France capital", "I like cats."]),
    ("Name a color.", ["Blue is a color.", "a color a color a color a color a color", "Red."]),
    ("Say hi.", ["Hi!", "Hello there, how are you doing today", "Hi hi."]),
]


def rows(split="train"):
    utility = HiddenUtility(encoder=hashed_encoder)
    return [
        {
            "prompt_id": f"q{i}",
            "prompt": prompt,
            "split": split,
            "responses": responses,
            "utility": utility([prompt] * len(responses), responses),
        }
        for i, (prompt, responses) in enumerate(PROMPTS)
    ]


def test_utility_rule_terms():
    assert is_complete("Done.") == 1.0 and is_complete('He said "yes."') == 1.0
    assert is_complete("and then the") == 0.0
    assert repetition("a b c a b c a b c a b c") > 0.5
    assert repetition("one two three four five six") == 0.0
    assert overlength("word " * 60) == 0.0 and overlength("word " * 90) == pytest.approx(0.5)
    u = HiddenUtility(encoder=hashed_encoder)
    prompt = "What is the capital of France?"
    good, cut = u([prompt, prompt], ["The capital of France is Paris.", "The capital of France is"])
    assert good > cut  # same relevance ballpark, the second is unfinished


def test_users_follow_utility_without_noise_or_bias():
    rng = random.Random(0)
    exact = simulate.NoiseModel("uniform", eps=0.0)
    clicks = [
        simulate.simulate_user([0.1, 0.9, 0.5], [2, 0, 1], exact, 0.0, rng) for _ in range(20)
    ]
    assert all(c == [2] for c in clicks)  # response 1 (best) is shown at position 2


def test_bradley_terry_users_err_where_the_responses_are_close():
    """P(better clicked) = sigmoid(gap / T): 0.55 at gap 0.02, 0.98 at gap 0.4 (T = 0.1)."""
    bt, rng, n = simulate.NoiseModel("bt", temperature=0.1), random.Random(0), 4000
    for gap in (0.02, 0.1, 0.4):
        better = sum(bt.choose([0.5, 0.5 + gap], rng) == 1 for _ in range(n)) / n
        assert better == pytest.approx(1 / (1 + math.exp(-gap / 0.1)), abs=0.025)


def test_position_mixture_clicks_the_top_examined_response_at_its_rate():
    pos, rng, n = simulate.NoiseModel("position", eps=0.3, temperature=1e-3), random.Random(1), 4000
    # The top-most response is the worse one; the rest of the time T -> 0 picks the better.
    top = sum(pos.choose([0.0, 1.0], rng) == 0 for _ in range(n)) / n
    assert top == pytest.approx(0.3, abs=0.025)


@pytest.mark.parametrize(
    "kind, eps, temperature",
    [("gumbel", 0.1, 0.1), ("uniform", 1.5, 0.1), ("bt", 0.1, 0.0), ("bt", 0.1, math.nan)],
)
def test_bad_noise_models_are_refused(kind, eps, temperature):
    with pytest.raises(ValueError):
        simulate.NoiseModel(kind, eps, temperature)


@pytest.mark.parametrize("tag", ["eps0.1", "eps0.3", "bt0.1", "pos0.2-bt0.1", "bt0.05"])
def test_noise_tags_name_their_model(tag):
    assert simulate.NoiseModel.from_tag(tag).tag == tag
    with pytest.raises(ValueError):
        simulate.NoiseModel.from_tag("gumbel0.1")


def test_label_noise_is_reported_by_utility_gap():
    bt = simulate.NoiseModel("bt", temperature=0.05)
    _, pairs, stats = simulate.build(rows(), users=6, noise=bt, eta=1.0, seed=3, correction="none")
    bins = stats["label_noise_by_gap"]
    assert sum(b["n"] for b in bins.values()) == len(pairs)
    wrong = sum(b["n"] * b["label_noise"] for b in bins.values())
    assert wrong == pytest.approx(sum(not p["label_correct"] for p in pairs), abs=0.01)


NOISY = simulate.NoiseModel("uniform", eps=0.3)


def test_benchmark_is_deterministic_and_noise_is_measured():
    a = simulate.build(rows(), users=6, noise=NOISY, eta=1.0, seed=7, correction="none")
    b = simulate.build(rows(), users=6, noise=NOISY, eta=1.0, seed=7, correction="none")
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    c = simulate.build(rows(), users=6, noise=NOISY, eta=1.0, seed=8, correction="none")
    assert json.dumps(a[0]) != json.dumps(c[0])
    _, pairs, stats = a
    assert pairs and 0.0 <= stats["label_noise"] <= 1.0
    assert stats["label_noise"] == pytest.approx(
        sum(not p["label_correct"] for p in pairs) / len(pairs), abs=1e-4
    )
    for p in pairs:
        assert p["label_correct"] == (p["true_margin"] > 0)
    # Noise-free users without position bias produce only correct labels.
    exact = simulate.NoiseModel("uniform", eps=0.0)
    _, clean, stats = simulate.build(
        rows(), users=6, noise=exact, eta=0.0, seed=7, correction="none"
    )
    assert clean and stats["label_noise"] == 0.0


def test_written_files_load_as_pairs(tmp_path):
    _, pairs, _ = simulate.build(
        rows(), users=6, noise=simulate.NoiseModel(eps=0.2), eta=1.0, seed=0, correction="ipw"
    )
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    write_jsonl(tmp_path / "heldout.jsonl", simulate.heldout_pairs(rows("heldout")))
    loaded = load_pairs(tmp_path / "pairs.jsonl").pairs
    assert len(loaded) == len(pairs) and all(0.5 < p.confidence <= 1 for p in loaded)
    assert "true_margin" in loaded[0].metadata
    held = load_pairs(tmp_path / "heldout.jsonl").pairs
    assert all(p.metadata["true_margin"] > 0 for p in held)


def fake_job(path, arm, noise, seed, win, with_heldout=True, variant=None):
    path.mkdir(parents=True)
    config = f"seed: {seed}\nbench:\n  arm: {arm}\n  noise: {noise}\n"
    if variant is not None:
        config += f"  variant: {variant}\n"
    (path / "config.yaml").write_text(config)
    metrics = {"split.n_ambiguous": 10, "run.seconds": 120.0, "eval.after.accuracy": 0.5}
    (path / "metrics.json").write_text(json.dumps(metrics))
    if with_heldout:
        held = {"heldout.win_rate": win, "ambiguous.delta_logp_chosen": -1.0}
        (path / "heldout_metrics.json").write_text(json.dumps(held))


def test_aggregator_on_fake_run_dirs(tmp_path):
    multirun = tmp_path / "multirun"
    fake_job(multirun / "0", "dpo_all", 0.1, 0, 0.4)
    fake_job(multirun / "1", "dpo_all", 0.1, 1, 0.6)
    fake_job(multirun / "2", "dpo_compo", 0.1, 0, 0.7, with_heldout=False)
    (multirun / "3").mkdir()  # a crashed job without files is ignored
    out = tmp_path / "results"
    assert aggregate.main([str(multirun), "--out", str(out)]) == 0
    md = (out / "results.md").read_text()
    lines = md.splitlines()
    dpo_all = next(line for line in lines if line.startswith("| dpo_all"))
    assert "| 0.1 | 2 | 0.500 ± 0.141 |" in dpo_all  # mean and sample std of 0.4 and 0.6
    assert "2.000 ± 0.000" in dpo_all  # minutes
    dpo_compo = next(line for line in lines if line.startswith("| dpo_compo"))
    assert "| 1 | n/a |" in dpo_compo
    assert (out / "win_rates.png").stat().st_size > 0
    assert len((out / "runs.csv").read_text().splitlines()) == 4
    assert aggregate.main([str(tmp_path / "empty"), "--out", str(out)]) == 2


def test_aggregator_says_how_many_runs_a_partial_metric_covers():
    assert aggregate.cell([0.4, None, 0.6]) == "0.500 ± 0.141 (n=2)"
    assert aggregate.cell([0.4, None]) == "0.400 (n=1)"
    assert aggregate.cell([0.4, 0.6]) == "0.500 ± 0.141"
    assert aggregate.cell([None, None]) == "n/a"
    assert aggregate.cell([0.1, -0.2, 0.3], signed=True) == "+0.067 ± 0.252 [2+ 1-]"


def test_aggregator_pairs_contrasts_by_noise_and_seed(tmp_path):
    multirun = tmp_path / "multirun"
    # seed 0: compo - clean = +0.2; seed 1: +0.0; seed 2 has no dpo_clean run and is left out
    for index, (arm, seed, win) in enumerate(
        [
            ("dpo_clean", 0, 0.4),
            ("dpo_compo", 0, 0.6),
            ("dpo_clean", 1, 0.5),
            ("dpo_compo", 1, 0.5),
            ("dpo_compo", 2, 0.9),
        ]
    ):
        fake_job(multirun / str(index), arm, 0.1, seed, win)
    md = aggregate.paired_table(aggregate.collect([multirun]))
    row = next(line for line in md.splitlines() if line.startswith("| dpo_compo - dpo_clean"))
    assert row.startswith("| dpo_compo - dpo_clean | 0.1 | 2 | +0.100 ± 0.141 [1+ 0-] |")
    assert "dpo_clean - dpo_all" not in md  # no dpo_all run: no row
    (multirun / "1" / "heldout_metrics.json").unlink()  # seed 0's dpo_compo not evaluated yet
    md = aggregate.paired_table(aggregate.collect([multirun]))
    assert "| dpo_compo - dpo_clean | 0.1 | 2 | +0.000 (n=1) |" in md


def test_aggregator_compares_every_variant_with_the_plain_baseline(tmp_path):
    multirun = tmp_path / "multirun"
    fake_job(multirun / "0", "dpo_clean", 0.3, 0, 0.5)
    fake_job(multirun / "1", "dpo_compo", 0.3, 0, 0.5)
    fake_job(multirun / "2", "dpo_compo", 0.3, 0, 0.75, variant="step=1")
    records = aggregate.collect([multirun])
    assert "| dpo_compo [step=1] | 0.3 | 1 | 0.750 |" in aggregate.table(records)
    md = aggregate.paired_table(records)
    assert "| dpo_compo - dpo_clean | 0.3 | 1 | +0.000 |" in md
    assert "| dpo_compo [step=1] - dpo_clean | 0.3 | 1 | +0.250 |" in md
    # a variant run for both arms is compared with itself, not with the plain baseline
    fake_job(multirun / "3", "dpo_clean", 0.3, 0, 0.25, variant="all")
    fake_job(multirun / "4", "dpo_compo", 0.3, 0, 0.5, variant="all")
    md = aggregate.paired_table(aggregate.collect([multirun]))
    assert "| dpo_compo [all] - dpo_clean [all] | 0.3 | 1 | +0.250 |" in md
    assert "| dpo_compo [step=1] - dpo_clean | 0.3 | 1 | +0.250 |" in md


def test_aggregator_utility_gain_over_the_starting_model(tmp_path):
    job = tmp_path / "0"
    fake_job(job, "dpo_all", 0.1, 0, 0.5)
    held = {"heldout.mean_utility": 0.8, "heldout.base_mean_utility": 0.75}
    (job / "heldout_metrics.json").write_text(json.dumps(held))
    (record,) = aggregate.collect([tmp_path])
    assert record["heldout.delta_utility"] == pytest.approx(0.05)


def test_every_benchmark_arm_file_is_in_the_tables():
    """Each configs/experiment/bench_<arm>.yaml is an arm the aggregator orders, and every arm
    of the first-order family is compared with DPO on the same pairs."""
    import yaml

    files = sorted((Path(__file__).resolve().parents[1] / "configs" / "experiment").glob("bench_*"))
    arms = [yaml.safe_load(p.read_text())["bench"]["arm"] for p in files if p.stem != "bench_base"]
    assert [f"bench_{a}" for a in arms] == [p.stem for p in files if p.stem != "bench_base"]
    assert sorted(arms) == sorted(aggregate.ARM_ORDER)
    assert {arm for arm, base in aggregate.CONTRASTS if base == "dpo_all"} >= set(aggregate.FAMILY)
