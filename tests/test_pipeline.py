"""The whole pipeline through the ``compo`` command on the tiny model: split, DPO, ComPO."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import mixed_pair_rows, run_compo
from transformers import AutoModelForCausalLM

from compo.models import TinyModel
from oracles.judge_server import JudgeServer, RuleBackend


@pytest.fixture
def mixed_pairs(write_jsonl):
    """Clearly separated pairs and near-identical ones (ambiguous under the tiny model)."""
    return write_jsonl(mixed_pair_rows())


def _compo(run_dir, *overrides, env=None, multirun=False):
    cmd = [sys.executable, "-m", "compo", *(["-m"] if multirun else []), "model=tiny"]
    dir_key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    return subprocess.run(
        [*cmd, f"{dir_key}={run_dir}", *overrides],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})},
        timeout=600,
    )


# The tiny byte-level model's log-probs are on another scale than SmolLM2's: delta 10 separates
# the near-identical pairs (a byte apart) from the clear ones.
SPLIT_AND_COMPO = ["splitter=likelihood_margin", "splitter.delta=10", "optimizer=compo_tiny"]
DPO = ["dpo=dpo", "dpo.lr=1e-3"]


def test_split_dpo_compo_end_to_end(tmp_path, mixed_pairs):
    run_dir = tmp_path / "run"
    args = [f"data.path={mixed_pairs}", *SPLIT_AND_COMPO, *DPO, "oracle=likelihood"]
    metrics = run_compo(run_dir, *args)
    assert metrics == json.loads((run_dir / "metrics.json").read_text())
    assert metrics["split.n_clean"] + metrics["split.n_ambiguous"] == 12
    assert metrics["split.n_ambiguous"] > 0 and metrics["split.n_clean"] > 0
    assert metrics["dpo.steps_run"] > 0 and metrics["compo.n_iterations"] > 0
    rows = [json.loads(x) for x in (run_dir / "trace" / "compo.jsonl").read_text().splitlines()]
    assert len(rows) == metrics["compo.n_iterations"]
    assert {"n_better", "frac", "applied", "cos_limit", "logp_chosen_after"} <= set(rows[0])
    ambiguous = {json.loads(x)["id"] for x in (run_dir / "split/ambiguous.jsonl").open()}
    assert {p for r in rows for p in r["pair_ids"]} <= ambiguous
    assert "eval.displacement.ambiguous.delta_logp_chosen" in metrics
    # The checkpoint is a plain HF model, and no stage touched the input embeddings.
    trained = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoint")
    start, _ = TinyModel(seed=0).load()
    assert torch.equal(trained.model.embed_tokens.weight, start.model.embed_tokens.weight)
    assert not torch.equal(trained.lm_head.weight, start.lm_head.weight)


def test_same_seed_same_weights(tmp_path, mixed_pairs):
    # ComPO alone over a given file; the model's seed stays fixed, only the optimizer's changes.
    args = [f"data.path={mixed_pairs}", "optimizer=compo_tiny", "oracle=likelihood",
            f"optimizer.pairs_path={mixed_pairs}", "optimizer.max_iterations=3"]  # fmt: skip
    first = run_compo(tmp_path / "a", *args)
    again = run_compo(tmp_path / "b", *args)
    run_compo(tmp_path / "c", *args, "optimizer.seed=1")
    assert first["compo.n_applied"] > 0
    timing = ("seconds", "per_second")  # wall-clock measurements, the only allowed difference
    assert {k: v for k, v in first.items() if not k.endswith(timing)} == {
        k: v for k, v in again.items() if not k.endswith(timing)
    }
    weights = [
        AutoModelForCausalLM.from_pretrained(tmp_path / d / "checkpoint").lm_head.weight
        for d in "abc"
    ]
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[0], weights[2])


def test_openai_judge_through_the_cli_keeps_the_key_off_disk(tmp_path, mixed_pairs):
    secret = "sk-test-DO-NOT-LEAK-4f9a1c"
    server = JudgeServer(RuleBackend(), port=0, api_key=secret).start()
    try:
        run_dir = tmp_path / "run"
        proc = _compo(
            run_dir,
            f"data.path={mixed_pairs}",
            *SPLIT_AND_COMPO,
            "optimizer.num_directions=4",
            "optimizer.max_iterations=2",
            "oracle=openai_judge",
            f"oracle.judge.base_url={server.url}",
            "oracle.judge.api_key_env=COMPO_TEST_KEY",
            f"oracle.judge.cache_path={tmp_path / 'verdicts.sqlite'}",
            env={"COMPO_TEST_KEY": secret},
        )
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["oracle.queries"] > 0 and "oracle.identical_ties" in metrics
    assert secret not in proc.stdout + proc.stderr
    for path in [*run_dir.rglob("*"), tmp_path / "verdicts.sqlite"]:
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_missing_api_key_fails_before_any_work(tmp_path, mixed_pairs):
    proc = _compo(
        tmp_path / "run",
        f"data.path={mixed_pairs}",
        *SPLIT_AND_COMPO,
        "oracle=openai_judge",
        "oracle.judge.base_url=http://127.0.0.1:9/v1",
        "oracle.judge.api_key_env=COMPO_TEST_MISSING_KEY",
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "COMPO_TEST_MISSING_KEY" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "split").exists()  # nothing expensive ran


def test_multirun_over_two_oracles_with_joblib(tmp_path, mixed_pairs):
    sweep = tmp_path / "sweep"
    proc = _compo(
        sweep,
        f"data.path={mixed_pairs}",
        *SPLIT_AND_COMPO,
        "optimizer.max_iterations=2",
        "oracle=likelihood,scorer",
        "hydra/launcher=local_joblib",
        multirun=True,
    )
    assert proc.returncode == 0, proc.stderr
    for job in ("0", "1"):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert metrics["compo.n_iterations"] == 2
    assert "oracle.queries" in json.loads((sweep / "1" / "metrics.json").read_text())


def test_a_run_that_changes_nothing_leaves_no_stale_checkpoint(tmp_path, mixed_pairs):
    # Found by a hostile probe: a rerun in the same dir with every stage off kept the earlier
    # run's checkpoint/, next to metrics that say nothing was trained.
    trained = run_compo(tmp_path, f"data.path={mixed_pairs}", *DPO, "optimizer=none")
    assert trained["run.model_changed"] and (tmp_path / "checkpoint").is_dir()
    idle = run_compo(
        tmp_path, f"data.path={mixed_pairs}", "dpo=none", "optimizer=none", "eval=none"
    )
    assert idle["run.model_changed"] is False and not (tmp_path / "checkpoint").exists()


def test_a_refused_rerun_leaves_the_earlier_runs_files_as_they_were(tmp_path, mixed_pairs):
    # Found by a hostile probe: the refused run rewrote config.yaml and metrics.json first, so
    # the run dir described a run that never happened next to the earlier run's checkpoint.
    from compo.errors import CompoError

    args = [f"data.path={mixed_pairs}", *DPO, "optimizer=none"]
    run_compo(tmp_path, *args)
    config, metrics = (
        (tmp_path / "config.yaml").read_text(),
        (tmp_path / "metrics.json").read_text(),
    )
    with pytest.raises(CompoError, match=r"dpo\.resume=false"):
        run_compo(tmp_path, *args, "dpo.loss.beta=0.5")
    assert (tmp_path / "config.yaml").read_text() == config
    assert (tmp_path / "metrics.json").read_text() == metrics


@pytest.mark.parametrize("step_size", ["3e38", "1e30"])
def test_a_model_whose_outputs_diverged_is_not_saved(tmp_path, mixed_pairs, step_size):
    # Its weights are finite (so the NaN/inf guard let it through), but its logits overflow and
    # its log-probs are -inf (3e38) or around -1e30 (1e30); it was saved with exit 0.
    from compo.errors import CompoError

    args = [f"data.path={mixed_pairs}", *SPLIT_AND_COMPO, "dpo=none", "oracle=likelihood"]
    with pytest.raises(CompoError, match=r"checkpoint .* not written: .*diverged"):
        run_compo(tmp_path, *args, f"optimizer.step_size={step_size}", "optimizer.max_iterations=3")
    assert not (tmp_path / "checkpoint").exists()
