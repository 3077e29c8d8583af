"""ComPO end to end on the tiny model: scope, determinism, effect, fp32 master copy, trace."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from compo.cli import CONFIG_DIR
from compo.errors import CompoError
from compo.rundir import RunDir
from compo.scoring import score_pairs
from compo.zo import ComPO, LowRank, Scope
from compo.zo.directions import DirectionBatch
from oracles.base import Verdict
from oracles.likelihood import LikelihoodOracle

FAST = dict(
    num_directions=64,
    radius=1e-3,
    threshold=0.05,
    step_size=1.0,
    keep_fraction=0.1,
    perturbation_batch=16,
    progress=False,
)


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matmuls are far slower with two OpenMP threads on a shared, busy 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _run(tiny, pairs, tmp_path, **options):
    model, tokenizer = tiny
    optimizer = ComPO(**{**FAST, **options})
    return optimizer.run(model, tokenizer, pairs, LikelihoodOracle(), RunDir(tmp_path))


def test_only_the_scope_changes(tiny, easy_encoded, tmp_path):
    model, _ = tiny
    before = _snapshot(model)
    summary = _run(tiny, easy_encoded[:2], tmp_path, epochs=2)
    assert summary["changed"] and summary["n_applied"] > 0
    after = _snapshot(model)
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])
    for name in before:
        if name != "lm_head.weight":
            assert torch.equal(before[name], after[name]), name
    assert torch.equal(before["model.embed_tokens.weight"], model.get_input_embeddings().weight)


def test_extra_modules_change_and_nothing_else(tiny, easy_encoded, tmp_path):
    model, _ = tiny
    before = _snapshot(model)
    _run(tiny, easy_encoded[:1], tmp_path, epochs=2, modules=["model.layers.1.mlp"])
    after = _snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert "lm_head.weight" in changed
    assert changed <= {"lm_head.weight"} | {n for n in before if n.startswith("model.layers.1.mlp")}
    assert len(changed) > 1


def test_same_seed_same_result_other_seed_differs(tiny, easy_encoded, tmp_path):
    from compo.models import TinyModel

    results = []
    for seed in (0, 0, 1):
        fresh = TinyModel(seed=0).load()
        _run(fresh, easy_encoded[:1], tmp_path / str(len(results)), seed=seed, epochs=2)
        results.append(fresh[0].lm_head.weight.detach().clone())
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], results[2])


@pytest.mark.parametrize("estimator", ["monte_carlo", "expected"])
def test_easy_pair_moves_chosen_up_and_rejected_down(tiny, easy_encoded, tmp_path, estimator):
    model, tokenizer = tiny
    pair = easy_encoded[:1]
    chosen0, rejected0 = score_pairs(model, pair, tokenizer.pad_token_id)
    _run(tiny, pair, tmp_path, epochs=6, num_directions=128, estimator=estimator)
    chosen1, rejected1 = score_pairs(model, pair, tokenizer.pad_token_id)
    assert chosen1.sum_logps.item() > chosen0.sum_logps.item()
    assert rejected1.sum_logps.item() < rejected0.sum_logps.item()
    lines = (tmp_path / "trace" / "compo.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 6
    # The trace's "after" log-probs come from the fast head evaluation: they match a full pass.
    assert rows[-1]["logp_chosen_after"][0] == pytest.approx(chosen1.sum_logps.item(), abs=1e-3)


def test_expected_estimator_computes_the_limit_once_per_iteration(
    tiny, easy_encoded, tmp_path, monkeypatch
):
    # The trace's cos_limit and the expected estimator need the same r -> 0 limit: its two
    # backward passes (HeadEvaluator.gradients) once per iteration, not twice.
    from compo.zo.head import HeadEvaluator

    calls = []
    exact = HeadEvaluator.gradients

    def counted(head):
        calls.append(1)
        return exact(head)

    monkeypatch.setattr(HeadEvaluator, "gradients", counted)
    _run(tiny, easy_encoded[:1], tmp_path, epochs=3, estimator="expected")
    rows = [json.loads(line) for line in (tmp_path / "trace" / "compo.jsonl").open()]
    assert len(rows) == 3 and len(calls) == 3
    assert all(r["cos_limit"] == pytest.approx(1.0) for r in rows)  # the step is the limit


class _TiedLikelihood(LikelihoodOracle):
    """Has the likelihood oracle's exact direction, but ties every comparison."""

    def compare(self, deltas):
        return [Verdict.TIE] * len(super().compare(deltas))


@pytest.mark.parametrize(
    ("radius", "advice"),
    [(1e-3, "try optimizer.radius=auto"), ("auto", "a larger optimizer.radius")],
)
def test_a_run_whose_oracle_decided_nothing_warns_of_ties_only(
    tiny, easy_encoded, tmp_path, radius, advice
):
    # No vote means no direction: its cosine with the exact one is undefined, not noise; and
    # radius=auto is not advised to a run that used it (it keeps 5e-4 for this oracle).
    model, tokenizer = tiny
    options = {**FAST, "num_directions": 4, "epochs": 1, "radius": radius}
    summary = ComPO(**options).run(
        model, tokenizer, easy_encoded[:2], _TiedLikelihood(), RunDir(tmp_path)
    )
    assert summary["n_decisive"] == 0 and summary["n_applied"] == 0
    assert summary["cos_limit_mean"] is None
    assert "ties teach nothing" in summary["warning"] and advice in summary["warning"]
    assert "noise" not in summary["warning"]
    assert ("radius=auto" in summary["warning"]) == (radius != "auto")


def test_a_noisy_vote_direction_is_measured_and_the_run_says_so(
    tiny, easy_encoded, tmp_path, caplog
):
    # 4 votes span almost nothing of the output layer: the step's cosine with the likelihood
    # oracle's exact direction is small, and the run ends saying so (one line, and the metric).
    with caplog.at_level(logging.WARNING):
        votes = _run(tiny, easy_encoded[:2], tmp_path / "votes", num_directions=4, epochs=1)
    assert 0 < abs(votes["cos_limit_mean"]) < 0.1
    assert "exact direction" in votes["warning"]
    assert sum("exact direction" in r.getMessage() for r in caplog.records) == 1
    from compo.models import TinyModel

    exact = _run(TinyModel(seed=0).load(), easy_encoded[:2], tmp_path / "exact",
                 epochs=1, estimator="expected")  # fmt: skip
    assert exact["cos_limit_mean"] == pytest.approx(1.0) and "warning" not in exact


def test_trace_and_metrics(tiny, easy_encoded, tmp_path):
    summary = _run(tiny, easy_encoded[:2], tmp_path, batch_size=2, acceptance_check=True)
    row = json.loads((tmp_path / "trace" / "compo.jsonl").read_text().splitlines()[0])
    for key in (
        "n_better", "frac", "frac_predicted", "applied", "skip_reason", "step", "entries_kept",
        "delta_norm", "cos_limit", "logp_chosen_before", "logp_chosen_after",
        "logp_rejected_before", "logp_rejected_after",
    ):  # fmt: skip
        assert key in row, key
    assert len(row["pair_ids"]) == 2
    assert summary["n_iterations"] == 1
    assert not (tmp_path / "metrics.json").exists()  # the recipe logs a stage's metrics, not ComPO


def test_skips_when_frac_below_lambda(tiny, easy_encoded, tmp_path):
    model, _ = tiny
    before = model.lm_head.weight.detach().clone()
    summary = _run(tiny, easy_encoded[:1], tmp_path, threshold=1.0)
    assert not summary["changed"] and summary["n_skipped"] == 1
    assert torch.equal(before, model.lm_head.weight)
    row = json.loads((tmp_path / "trace" / "compo.jsonl").read_text())
    assert "lambda" in row["skip_reason"]


def test_fp32_master_keeps_tiny_updates_of_bf16_model(tiny):
    model, _ = tiny
    model.to(torch.bfloat16)
    scope = Scope(model)
    original = model.lm_head.weight.detach().clone()
    master0 = scope.head.master.clone()
    assert scope.head.master.dtype == torch.float32 and not scope.head.shares_storage
    update = torch.full_like(scope.head.master, 1e-6)
    # What the authors' bf16 cast does: the update vanishes (away from tiny weights).
    naive = original + update.to(torch.bfloat16)
    visible = original.abs() > 1e-2
    assert torch.equal(naive[visible], original[visible])
    for _ in range(3):
        scope.add_([update])
    assert torch.allclose(scope.head.master - master0, torch.full_like(master0, 3e-6), atol=1e-7)


def test_rejects_tied_output_layer_and_judges(tiny, easy_encoded, tmp_path):
    model, tokenizer = tiny
    model.lm_head.weight = model.get_input_embeddings().weight
    with pytest.raises(CompoError, match="shares its weight"):
        Scope(model)
    with pytest.raises(CompoError, match="does not implement"):
        ComPO(**FAST).run(model, tokenizer, easy_encoded, object(), RunDir(tmp_path))


def test_low_rank_run_and_dense_batch(tiny, easy_encoded, tmp_path):
    summary = _run(tiny, easy_encoded[:1], tmp_path, directions=LowRank(rank=1), epochs=2)
    assert summary["n_iterations"] == 2
    batch = DirectionBatch.from_tensors([torch.ones(2, 3)])
    assert len(batch) == 1 and torch.equal(batch.dense(0)[0], torch.ones(2, 3))


@pytest.mark.parametrize(
    "option", ["compo", "compo_tiny", "compo_lowrank", "compo_support", "compo_rademacher"]
)
def test_configs_instantiate_to_plain_objects(option):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"optimizer={option}", "oracle=likelihood"])
    optimizer = instantiate(cfg.optimizer)
    # The YAML's values reach the objects that use them (not only the constructor).
    assert optimizer.monte_carlo.m == cfg.optimizer.num_directions
    assert type(optimizer.sampler).__name__ == cfg.optimizer.directions._target_.split(".")[-1]
    assert optimizer.modules == list(cfg.optimizer.modules)
