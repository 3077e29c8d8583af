"""Noise splitters, the split files and metrics, and split + DPO through the cli."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import EASY_PAIRS
from hydra import compose, initialize_config_dir

from compo.cli import CONFIG_DIR, run
from compo.errors import CompoError
from compo.reference import ReferenceScores
from compo.rundir import RunDir
from compo.scoring import SequenceScores, score_pairs
from compo.splitter import (
    ChesSplitter,
    ConfidenceSplitter,
    LikelihoodMarginSplitter,
    Split,
    ches_scores,
    record_split,
)
from compo.types import PreferencePair


def _scores(sums, lengths) -> SequenceScores:
    sums, n = torch.tensor(sums), torch.tensor(lengths)
    return SequenceScores(sums, sums / n, n)


def test_likelihood_margin_rule_on_given_reference():
    chosen = _scores([-10.0, -10.0, -10.0, -20.0], [10, 10, 2, 10])
    rejected = _scores([-12.5, -13.0, -14.0, -10.0], [10, 10, 10, 10])
    reference = ReferenceScores.given((chosen, rejected))
    split = LikelihoodMarginSplitter(delta=3.0).split(None, [None] * 4, [None] * 4, 0, reference)
    # margins 2.5, 3.0, 4.0, -10.0: only |margin| < 3 is ambiguous (a wrong-way margin is not)
    assert split.scores.tolist() == [2.5, 3.0, 4.0, -10.0]
    assert split.ambiguous == [0] and split.clean == [1, 2, 3]
    per_token = LikelihoodMarginSplitter(delta=1.0, per_token=True)
    split = per_token.split(None, [None] * 4, [None] * 4, 0, reference)
    # per-token margins -1.0+1.25, -1.0+1.3, -5.0+1.4, -2.0+1.0 = 0.25, 0.3, -3.6, -1.0
    assert split.ambiguous == [0, 1] and split.clean == [2, 3]


def test_likelihood_margin_scores_with_the_model_when_no_reference(tiny, easy_encoded):
    model, tokenizer = tiny
    chosen, rejected = score_pairs(model, easy_encoded, tokenizer.pad_token_id)
    split = LikelihoodMarginSplitter(delta=5.0).split(
        model, EASY_PAIRS, easy_encoded, tokenizer.pad_token_id
    )
    torch.testing.assert_close(split.scores, chosen.sum_logps - rejected.sum_logps)


def test_ches_formula_on_hand_made_hidden_states():
    # Pair 0: chosen tokens h = (1, 0), (1, 2); rejected token h = (2, 2).
    # Pair 1: chosen token (0, 1); rejected tokens (0, 3), (0, 1).
    def scores(hidden, seq, n):
        s = SequenceScores(torch.zeros(2), torch.zeros(2), torch.tensor(n))
        s.hidden, s.seq_index = torch.tensor(hidden, dtype=torch.float32), torch.tensor(seq)
        return s

    chosen = scores([[1, 0], [1, 2], [0, 1]], [0, 0, 1], [2, 1])
    rejected = scores([[2, 2], [0, 3], [0, 1]], [0, 1, 1], [1, 2])
    # Sums: pair 0 h+ = (2, 2), h- = (2, 2): 8 - 8 = 0; pair 1 h+ = (0, 1), h- = (0, 4): 4 - 1 = 3.
    assert ches_scores(chosen, rejected, normalize=False).tolist() == [0.0, 3.0]
    # Means: pair 0 h+ = (1, 1), h- = (2, 2): 4 - 2 = 2; pair 1 h+ = (0, 1), h- = (0, 2): 2 - 1 = 1.
    assert ches_scores(chosen, rejected, normalize=True).tolist() == [2.0, 1.0]


def test_ches_splitter_fraction_and_threshold(tiny, easy_encoded):
    model, tokenizer = tiny
    pad = tokenizer.pad_token_id
    split = ChesSplitter(fraction=0.5).split(model, EASY_PAIRS, easy_encoded, pad)
    assert len(split.ambiguous) == 2
    top = torch.sort(split.scores, descending=True).indices[:2].tolist()
    assert sorted(top) == split.ambiguous
    by_threshold = ChesSplitter(fraction=None, threshold=split.threshold - 1e-6)
    assert by_threshold.split(model, EASY_PAIRS, easy_encoded, pad).ambiguous == split.ambiguous
    assert ChesSplitter(fraction=0.0).split(model, EASY_PAIRS, easy_encoded, pad).ambiguous == []
    with pytest.raises(CompoError, match="exactly one"):
        ChesSplitter(fraction=0.5, threshold=1.0)


def test_confidence_splitter():
    pairs = [
        PreferencePair(str(i), "q", "a", "b", confidence=c) for i, c in enumerate([0.9, 0.2, 0.5])
    ]
    split = ConfidenceSplitter(threshold=0.5).split(None, pairs, [None] * 3, 0)
    assert split.ambiguous == [1] and split.clean == [0, 2]


def test_record_split_writes_both_sides_and_metrics(tmp_path):
    split = Split(
        "likelihood_margin", torch.tensor([0.5, 4.0, -1.0]), torch.tensor([True, False, True]), 3.0
    )
    out = RunDir(tmp_path)
    metrics = record_split(out, EASY_PAIRS[:3], split)
    clean = [json.loads(x) for x in (tmp_path / "split" / "clean.jsonl").read_text().splitlines()]
    ambiguous = (tmp_path / "split" / "ambiguous.jsonl").read_text().splitlines()
    assert [(r["id"], r["score"]) for r in clean] == [("p2", 4.0)]
    assert [json.loads(x)["id"] for x in ambiguous] == ["p1", "p3"]
    assert metrics["n_clean"] == 1 and metrics["n_ambiguous"] == 2
    assert sum(metrics["score_histogram"]["counts"]) == 3


def _cfg(data_path, *overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(
            "config",
            overrides=["model=tiny", f"data.path={data_path}", "splitter=likelihood_margin",
                       "dpo=dpo", "dpo.lr=1e-3", "optimizer=none", *overrides],
        )  # fmt: skip


@pytest.fixture
def easy_file(write_jsonl):
    return write_jsonl([p.to_dict() for p in EASY_PAIRS] * 1 + [
        {**p.to_dict(), "id": p.id + "b"} for p in EASY_PAIRS
    ])  # fmt: skip


def test_cli_split_and_dpo_end_to_end(easy_file, tmp_path):
    from transformers import AutoModelForCausalLM

    metrics = run(_cfg(easy_file, "splitter.delta=30"), tmp_path)
    n_clean, n_amb = metrics["split.n_clean"], metrics["split.n_ambiguous"]
    assert n_clean + n_amb == 8 and n_clean > 0
    assert metrics["dpo.n_pairs"] == n_clean and "eval.after.accuracy" in metrics
    assert "eval.displacement.clean.delta_logp_chosen" in metrics
    assert ("eval.displacement.ambiguous.frac_chosen_down" in metrics) == (n_amb > 0)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint")
    assert reloaded.config.tie_word_embeddings is False
    assert (tmp_path / "trace" / "dpo.jsonl").is_file()


def test_without_eval_split_and_dpo_share_one_reference_pass(easy_file, tmp_path, monkeypatch):
    """eval=none: one reference pass serves both the splitter and DPO."""
    from compo import dpo_reference, reference

    def not_here(*args, **kwargs):
        raise AssertionError("the splitter scored the pairs itself")

    passes = []

    def counting(real):
        def score(model, pairs, *args, **kwargs):
            passes.append((kwargs.get("desc"), len(pairs)))
            return real(model, pairs, *args, **kwargs)

        return score

    monkeypatch.setattr("compo.splitter.score_pairs", not_here)
    monkeypatch.setattr("compo.reference.score_pairs", counting(reference.score_pairs))
    monkeypatch.setattr("compo.dpo_reference.score_pairs", counting(dpo_reference.score_pairs))
    shared = run(_cfg(easy_file, "splitter.delta=30", "eval=none"), tmp_path / "shared")
    # one pass over all 8 pairs; DPO reuses its rows of it (the other calls are training steps)
    assert [p for p in passes if p[0] in ("reference", "dpo/reference")] == [("reference", 8)]
    monkeypatch.undo()
    with_eval = run(_cfg(easy_file, "splitter.delta=30"), tmp_path / "eval")
    for key in ("split.n_clean", "dpo.loss_first", "dpo.loss_last"):
        assert shared[key] == pytest.approx(with_eval[key], abs=1e-5), key


def test_cli_skips_dpo_when_no_pair_is_clean(easy_file, tmp_path):
    metrics = run(_cfg(easy_file, "splitter.delta=1e9"), tmp_path)
    assert metrics["split.n_clean"] == 0 and metrics["split.n_ambiguous"] == 8
    assert metrics["dpo.skipped_reason"] == "no clean pairs"
    assert (tmp_path / "split" / "clean.jsonl").read_text() == ""
    assert not (tmp_path / "checkpoint").exists() and "eval.after.accuracy" not in metrics


@pytest.mark.slow
def test_real_model_split_and_dpo(easy_file, tmp_path):
    """Split + DPO on the real default model (SmolLM2-135M): last 2 blocks + head, 2 epochs."""
    from transformers import AutoModelForCausalLM

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[f"data.path={easy_file}", "splitter=likelihood_margin", "dpo=dpo",
                       "dpo.lr=1e-5", "dpo.epochs=2", "data.max_length=160",
                       "data.max_prompt_length=96"],
        )  # fmt: skip
    metrics = run(cfg, tmp_path)
    assert metrics["split.n_clean"] + metrics["split.n_ambiguous"] == 8
    assert metrics["dpo.n_pairs"] == metrics["split.n_clean"] > 0
    after = metrics["eval.displacement.clean.delta_logp_chosen"]
    assert after > metrics["eval.displacement.clean.delta_logp_rejected"]
    assert metrics["eval.after.margin_mean"] > metrics["eval.before.margin_mean"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint")
    assert reloaded.config.tie_word_embeddings is False


def test_confidence_splitter_default_separates_conflicting_clicks_from_single_ones():
    """On aggregated clicks (Beta(1, 1) prior) every confidence is > 0.5, so a 0.5 threshold never
    fires; the default sends pairs whose clicks conflicted to the ambiguous side and keeps a
    single unopposed click or a clear majority clean."""
    from compo.clicks import beta_confidence

    counts = {"one click": (1, 0), "2 to 1": (2, 1), "3 to 0": (3, 0), "3 to 1": (3, 1)}
    pairs = [
        PreferencePair(name, "q", "a", "b", confidence=beta_confidence(w, lo))
        for name, (w, lo) in counts.items()
    ]
    split = ConfidenceSplitter().split(None, pairs, [None] * len(pairs), 0)
    assert [pairs[i].id for i in split.ambiguous] == ["2 to 1"]
