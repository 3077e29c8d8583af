"""The benchmark's splitter study: its scores are the splitters' own, its statistics are right."""

from __future__ import annotations

import json
import sys
from itertools import product
from pathlib import Path

import numpy as np
import pytest

from compo.data import load_pairs
from compo.encoding import encode_pairs
from compo.evaluate import outcomes
from compo.models import TinyModel
from compo.rundir import write_jsonl
from compo.splitter import ChesSplitter, ConfidenceSplitter, LikelihoodMarginSplitter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments.benchmark import simulate, splitter_study, stats
from tests.test_benchmark import rows


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two seeds of a Bradley-Terry pairs file over the test prompts."""
    out = tmp_path_factory.mktemp("study")
    bt = simulate.NoiseModel("bt", temperature=0.5)
    paths = []
    for seed in (0, 1):
        _, pairs, _ = simulate.build(
            rows(), users=40, noise=bt, eta=1.0, seed=seed, correction="none"
        )
        paths.append(out / f"pairs_{bt.tag}_seed{seed}.jsonl")
        write_jsonl(paths[-1], pairs)
    return paths


def test_scores_and_sides_are_the_splitters_own(files):
    model, tokenizer = TinyModel().load()
    pairs = load_pairs(files[0]).pairs
    encoded, _ = encode_pairs(pairs, tokenizer)
    table = splitter_study.SequenceTable(model, tokenizer.pad_token_id)
    table.add(encoded)
    table.score()
    scores = table.pair_scores(encoded, [p.confidence for p in pairs])
    masks = splitter_study.ambiguous_masks(scores)
    pad = tokenizer.pad_token_id
    expected = {
        "margin_sum": LikelihoodMarginSplitter(delta=3.0),
        "margin_token": LikelihoodMarginSplitter(delta=0.1, per_token=True),
        "ches": ChesSplitter(fraction=0.25),
        "confidence": ConfidenceSplitter(),  # its default, as the study uses
    }
    for name, splitter in expected.items():
        split = splitter.split(model, pairs, encoded, pad)
        assert np.array_equal(masks[name], split.ambiguous_mask.numpy()), name
    margin = LikelihoodMarginSplitter().split(model, pairs, encoded, pad).scores.numpy()
    np.testing.assert_allclose(scores["margin_signed"], -margin, atol=1e-4)
    ches = ChesSplitter().split(model, pairs, encoded, pad).scores.numpy()
    np.testing.assert_allclose(scores["ches"], ches, rtol=1e-4, atol=1e-4)


def test_auroc_matches_counting_every_positive_negative_pair():
    rng = np.random.default_rng(0)
    score = rng.integers(0, 5, 60).astype(float)  # many ties
    positive = rng.random(60) < 0.3
    wins = [
        1.0 if a > b else 0.5 if a == b else 0.0
        for a, b in product(score[positive], score[~positive])
    ]
    assert splitter_study.auroc(score, positive) == pytest.approx(np.mean(wins))
    assert splitter_study.auroc(-score, positive) == pytest.approx(1 - np.mean(wins))
    assert np.isnan(splitter_study.auroc(score, np.zeros(60, dtype=bool)))


def test_precision_recall_and_grouped_bootstrap():
    wrong = np.array([True, True, False, False, False, True])
    mask = np.array([True, False, True, False, False, True])
    got = splitter_study.side_metrics(mask, wrong)
    assert got == {"n_ambiguous": 3, "precision": 2 / 3, "recall": 2 / 3}
    groups = np.array(["a", "a", "b", "b", "c", "c"])
    ci = stats.cluster_bootstrap(groups, lambda r: wrong[r].mean(), 500, seed=0)
    assert ci.value == wrong.mean()
    assert 0.0 <= ci.low <= ci.value <= ci.high <= 1.0
    assert stats.cluster_bootstrap(groups, lambda r: wrong[r].mean(), 500, 0) == ci


def test_cluster_bootstrap_keeps_a_group_together():
    # Two groups of identical rows: a resample draws whole groups, so its mean is 0, 1/2 or 1
    # (a row-level bootstrap would also give 1/4 and 3/4, and a narrower interval).
    values = np.array([1.0, 1.0, 0.0, 0.0])
    groups = np.array(["a", "a", "b", "b"])
    draws = []
    stats.cluster_bootstrap(groups, lambda r: draws.append(values[r].mean()) or 0.0, 200)
    assert set(draws) <= {0.0, 0.5, 1.0} and {0.0, 1.0} <= set(draws)
    ci = stats.cluster_bootstrap(groups, lambda r: values[r].mean(), 2000, seed=1)
    assert (ci.low, ci.value, ci.high) == (0.0, 0.5, 1.0)


def test_study_end_to_end_on_the_tiny_model(files, tmp_path):
    out = tmp_path / "study"
    args = ["--noise", "bt0.5", "--seeds", "0", "1", "--data", str(files[0].parent)]
    assert splitter_study.main([*args, "--out", str(out), "--resamples", "50", "--tiny"]) == 0
    results = json.loads(out.with_suffix(".json").read_text())
    res = results["bt0.5"]
    assert res["n_files"] == 2 and set(res["splitters"]) == set(splitter_study.SPLITTERS)
    assert res["n_pairs"] == sum(len(load_pairs(f).pairs) for f in files)
    assert 0 < res["label_noise"] < 1  # both classes present: every statistic is defined
    assert res["splitters"]["none"]["recall"] == 0.0
    assert 0 <= res["splitters"]["margin_signed"]["auroc"] <= 1
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "| bt0.5 |" in out.with_suffix(".md").read_text()


def test_two_way_bootstrap_covers_the_true_mean_under_seed_and_prompt_effects():
    """Data with a seed effect, a prompt effect and answer noise: the 95% interval of the mean
    covers the true mean (0) in most of 100 simulated benchmarks, and ignoring the seed axis
    (one seed) would be narrower."""
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(100):
        seed_effect = rng.normal(0, 0.5, (5, 1, 1))
        prompt_effect = rng.normal(0, 0.5, (1, 40, 1))
        cells = {"u": seed_effect + prompt_effect + rng.normal(0, 1, (5, 40, 3))}
        ci = stats.two_way_bootstrap(cells, stats.mean_of("u"), resamples=300)
        covered += ci.low <= 0 <= ci.high
    assert covered >= 85
    again = stats.two_way_bootstrap(cells, stats.mean_of("u"), resamples=300)
    assert again == ci  # seeded
    assert ci.low <= ci.value <= ci.high and ci.value == pytest.approx(cells["u"].mean())


def test_bootstrap_helpers():
    assert outcomes(np.array([1.0, 0.0, 0.5]), np.array([0.0, 1.0, 0.5 + 1e-6]), 1e-4).tolist() == [
        1.0,
        0.0,
        0.5,
    ]
    with pytest.raises(ValueError):
        stats.two_way_bootstrap({"a": np.zeros((2, 3)), "b": np.zeros((2, 4))}, stats.mean_of("a"))
    assert stats.Interval(0.1, 0.02, 0.2).excludes_zero()
    assert not stats.Interval(0.1, -0.02, 0.2).excludes_zero()
    assert stats.Interval(0.1, 0.02, 0.2).format(signed=True) == "+0.100 [+0.020, +0.200]"
