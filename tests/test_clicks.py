"""Click logs -> pairs: Joachims' rule, position-bias weights, aggregation, confidence, errors."""

from __future__ import annotations

import json

import pytest

from compo.clicks import (
    Impression,
    beta_confidence,
    clicks_to_pairs,
    examination_propensities,
    impression_preferences,
    main,
    regularized_beta,
)
from compo.data import load_pairs
from compo.errors import DataError


def imp(clicks, n=4, prompt="Q?", dwell=None, **extra):
    return {
        "prompt": prompt,
        "responses": [f"r{i}" for i in range(n)],
        "clicks": clicks,
        **({"dwell": dwell} if dwell is not None else {}),
        **extra,
    }


def rows(*records):
    return list(enumerate(records, start=1))


def test_joachims_clicked_over_skipped_above():
    shown = Impression("Q", ["a", "b", "c", "d"], clicks=[2])
    assert impression_preferences(shown) == [(2, 0, 2), (2, 1, 2)]
    # A clicked response above another click is not a loser; the top click yields nothing.
    shown = Impression("Q", ["a", "b", "c", "d"], clicks=[0, 3])
    assert impression_preferences(shown) == [(3, 1, 3), (3, 2, 3)]
    assert impression_preferences(Impression("Q", ["a", "b"], clicks=[0])) == []
    # skip_next: also the first unclicked response below.
    shown = Impression("Q", ["a", "b", "c", "d"], clicks=[1])
    assert impression_preferences(shown, "skip_next") == [(1, 0, 1), (1, 2, 1)]


def test_short_dwell_counts_as_no_click():
    shown = Impression("Q", ["a", "b", "c"], clicks=[0, 2], dwell=[1.0, 30.0])
    assert impression_preferences(shown, min_dwell=5.0) == [(2, 0, 2), (2, 1, 2)]
    assert impression_preferences(shown) == [(2, 1, 2)]


def test_propensities_and_ipw_weights():
    assert examination_propensities(3, eta=1.0) == pytest.approx([1.0, 0.5, 1 / 3])
    assert examination_propensities(3, eta=2.0) == pytest.approx([1.0, 0.25, 1 / 9])
    assert examination_propensities(3, eta=0.0) == [1.0, 1.0, 1.0]
    # Click at position 1 (weight 1/p_1 = 2) and at position 2 on other responses (1/p_2 = 3,
    # two preferences): raw weights 2, 3, 3 -> mean 8/3 -> normalised 0.75, 1.125, 1.125.
    result = clicks_to_pairs(
        rows(imp([1], n=2, prompt="A"), imp([2], n=3, prompt="B")), correction="ipw"
    )
    by_prompt = {}
    for p in result.pairs:
        by_prompt.setdefault(p["prompt"], []).append(p["weighted_wins"])
    assert by_prompt["A"] == [pytest.approx(0.75)]
    assert by_prompt["B"] == [pytest.approx(1.125), pytest.approx(1.125)]
    explicit = clicks_to_pairs(
        rows(imp([1], n=2, prompt="A"), imp([2], n=3, prompt="B")),
        correction="ipw",
        propensities=[1.0, 0.5, 1 / 3],
    )
    assert explicit.pairs == result.pairs


def test_duplicates_aggregate_across_impressions_with_beta_confidence():
    records = rows(
        imp([1], n=2),  # r1 > r0
        imp([1], n=2),
        imp([1], n=2),
        {"prompt": "Q?", "responses": ["r1", "r0"], "clicks": [1]},  # r0 > r1, shown swapped
        imp([], n=2),
    )
    result = clicks_to_pairs(records, source="log.jsonl")
    assert len(result.pairs) == 1
    pair = result.pairs[0]
    assert (pair["chosen"], pair["rejected"]) == ("r1", "r0")
    assert pair["n_impressions"] == 4
    assert (pair["n_wins"], pair["n_losses"]) == (3, 1)
    # P(theta > 1/2) for Beta(4, 2) = 1 - I_{1/2}(4, 2) = 13/16.
    assert pair["confidence"] == pytest.approx(13 / 16)
    assert result.stats["n_without_preference"] == 1
    assert result.stats["n_impressions"] == 5
    assert beta_confidence(1, 0) == pytest.approx(0.75)
    assert beta_confidence(3, 0) == pytest.approx(0.9375)
    assert beta_confidence(2.5, 2.5) == pytest.approx(0.5)


def test_ties_are_counted_not_written():
    records = rows(imp([1], n=2), {"prompt": "Q?", "responses": ["r1", "r0"], "clicks": [1]})
    result = clicks_to_pairs(records)
    assert result.pairs == [] and result.stats["n_ties"] == 1


def test_regularized_beta_matches_scipy():
    special = pytest.importorskip("scipy.special")
    for a, b, x in [(1, 1, 0.5), (4.5, 2.25, 0.5), (120.0, 80.0, 0.5), (0.7, 3.0, 0.2)]:
        assert regularized_beta(a, b, x) == pytest.approx(special.betainc(a, b, x), abs=1e-10)


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"responses": ["a", "b"], "clicks": [0]}, "prompt"),
        ({"prompt": "Q", "responses": ["a"], "clicks": [0]}, "responses"),
        ({"prompt": "Q", "responses": ["a", "a"], "clicks": [0]}, "responses"),
        ({"prompt": "Q", "responses": ["a", "b"], "clicks": [2]}, "clicks"),
        ({"prompt": "Q", "responses": ["a", "b"]}, "clicks"),
        ({"prompt": "Q", "responses": ["a", "b"], "clicks": [1], "dwell": [1, 2]}, "dwell"),
    ],
)
def test_malformed_row_names_file_row_field(write_jsonl, record, field):
    path = write_jsonl([imp([1]), record])
    with pytest.raises(DataError) as err:
        clicks_to_pairs(load_records(path), source=str(path))
    message = str(err.value)
    assert "\n" not in message
    assert f"{path}: row 2: field '{field}'" in message


def load_records(path):
    from compo.data import iter_records

    return iter_records(path)


def test_cli_raise_exits_2_with_one_line(write_jsonl, tmp_path, capsys):
    path = write_jsonl([imp([1]), "{not json"])
    assert main([str(path), "--out", str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("compo-clicks: error: ") and "row 2" in err and "\n" not in err
    assert not (tmp_path / "out.jsonl").exists()


def test_cli_skip_writes_rejected_and_loadable_pairs(write_jsonl, tmp_path):
    path = write_jsonl([imp([2]), imp([5]), imp([1], prompt="Other?")])
    out = tmp_path / "pairs.jsonl"
    assert main([str(path), "--out", str(out), "--on-error", "skip", "--correction", "ipw"]) == 0
    rejected = [json.loads(line) for line in out.with_suffix(".rejected.jsonl").open()]
    assert [(r["row"], r["field"]) for r in rejected] == [(2, "clicks")]
    loaded = load_pairs(out)
    assert len(loaded.pairs) == 3
    assert all(0.5 < p.confidence < 1 for p in loaded.pairs)
    assert loaded.pairs[0].metadata["n_impressions"] == 1
