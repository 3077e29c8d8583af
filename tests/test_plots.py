"""plots/: the pictures a run draws at its end, and the ones it must not draw."""

from __future__ import annotations

import json
import logging
import shutil
import sys

import pytest
from conftest import mixed_pair_rows, run_compo

from compo import plots

PNG = b"\x89PNG\r\n\x1a\n"
RUN = ["splitter=likelihood_margin", "splitter.delta=10", "dpo=dpo", "dpo.lr=1e-3"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in mixed_pair_rows()))
    return path


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, pairs):
    """Split, DPO on the clean pairs, ComPO on the ambiguous ones, evaluation."""
    run_dir = tmp_path_factory.mktemp("full") / "run"
    return run_dir, run_compo(run_dir, f"data.path={pairs}", *RUN, "optimizer=compo_tiny")


def _is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 5000 and data.startswith(PNG)


def test_a_run_draws_its_pictures(full_run):
    run_dir, metrics = full_run
    assert metrics["plots.written"] == ["plots/dpo.png", "plots/compo.png", "plots/logp.png"]
    assert sorted(p.name for p in (run_dir / "plots").iterdir()) == [
        "compo.png", "dpo.png", "logp.png"
    ]  # fmt: skip
    for name in ("dpo", "compo", "logp"):
        assert _is_png(run_dir / "plots" / f"{name}.png"), name
    assert not any(key.startswith("plots.skipped") for key in metrics)


def test_eval_pairs_hold_each_pairs_log_probs_before_and_after(full_run):
    run_dir, metrics = full_run
    rows = [json.loads(x) for x in (run_dir / "eval_pairs.jsonl").read_text().splitlines()]
    assert len(rows) == metrics["eval.after.n_pairs"] == 12
    ambiguous = {json.loads(x)["id"] for x in (run_dir / "split" / "ambiguous.jsonl").open()}
    assert {r["id"] for r in rows if r["side"] == "ambiguous"} == ambiguous
    # The per-pair numbers are the ones the run's metrics summarise.
    for key in ("chosen", "rejected"):
        mean_after = sum(r[f"logp_{key}_after"] for r in rows) / len(rows)
        mean_before = sum(r[f"logp_{key}_before"] for r in rows) / len(rows)
        assert mean_after == pytest.approx(metrics[f"eval.after.logp_{key}_mean"], rel=1e-5)
        assert mean_before == pytest.approx(metrics[f"eval.before.logp_{key}_mean"], rel=1e-5)
        shift = [
            r[f"logp_{key}_after"] - r[f"logp_{key}_before"] for r in rows if r["id"] in ambiguous
        ]
        assert sum(shift) / len(shift) == pytest.approx(
            metrics[f"eval.displacement.ambiguous.delta_logp_{key}"], rel=1e-4, abs=1e-5
        )


def test_stages_that_did_not_run_draw_nothing_and_say_so_once(full_run, tmp_path, pairs, caplog):
    # Rerun in a copy of the full run's dir: its compo.png and logp.png must not pass for this
    # run's, which has no ComPO and no evaluation.
    run_dir = tmp_path / "run"
    shutil.copytree(full_run[0], run_dir)
    with caplog.at_level(logging.INFO, logger="compo"):
        metrics = run_compo(run_dir, f"data.path={pairs}", *RUN, "optimizer=none", "eval=none")
    assert metrics["plots.written"] == ["plots/dpo.png"]
    assert [p.name for p in (run_dir / "plots").iterdir()] == ["dpo.png"]
    assert metrics["plots.skipped.compo"] == "optimizer=none"
    assert metrics["plots.skipped.logp"] == "eval=none"
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("plots: no ")]
    assert notes == ["plots: no compo.png (optimizer=none)", "plots: no logp.png (eval=none)"]


def test_without_matplotlib_the_run_warns_once_and_ends(full_run, tmp_path, monkeypatch, caplog):
    run_dir = tmp_path / "run"
    shutil.copytree(full_run[0], run_dir)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails
    got = plots.draw(run_dir, full_run[1])
    assert got["written"] == [] and got["skipped.compo"] == "matplotlib is not installed"
    assert not (run_dir / "plots" / "compo.png").exists()  # the earlier run's, removed
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["plots: matplotlib is not installed, no plots/ (pip install matplotlib)"]


def test_a_picture_that_cannot_be_drawn_is_a_warning_not_a_lost_run(full_run, tmp_path, caplog):
    run_dir = tmp_path / "run"
    shutil.copytree(full_run[0], run_dir)
    (run_dir / "trace" / "compo.jsonl").write_text('{"frac": 0.5}\n')  # no iteration
    got = plots.draw(run_dir, full_run[1])
    assert got["written"] == ["plots/dpo.png", "plots/logp.png"]
    assert got["skipped.compo"] == "failed: KeyError: 'iteration'"
    assert not (run_dir / "plots" / "compo.png").exists()
    assert any("compo.png failed" in r.getMessage() for r in caplog.records)


def test_a_run_whose_trace_was_lost_says_so_not_that_its_stage_was_off(full_run, tmp_path):
    # A resumed run whose trace/compo.jsonl was deleted said "no compo.png (optimizer=none)".
    run_dir = tmp_path / "run"
    shutil.copytree(full_run[0], run_dir)
    (run_dir / "trace" / "compo.jsonl").unlink()
    got = plots.draw(run_dir, full_run[1])
    assert got["skipped.compo"] == "trace/compo.jsonl holds no rows"
