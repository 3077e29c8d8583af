"""Resume after a crash: SIGKILL the pipeline at a seeded point, rerun, same weights; corrupt
state is refused in one line and never loaded."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import mixed_pair_rows
from safetensors.torch import load_file

from compo import state
from compo.dpo import DPOTrainer
from compo.errors import CompoError
from compo.losses import DPO
from compo.models import TinyModel
from compo.rundir import RunDir

# The tiny model splits these 6 clean / 6 ambiguous: 18 DPO steps, then 12 ComPO iterations,
# each committing its state (dpo.save_every=1, optimizer.save_every=1 by default).
DPO_STEPS, COMPO_ITERATIONS = 18, 12
PIPELINE = [
    "model=tiny",
    "splitter=likelihood_margin",
    "splitter.delta=10",
    "dpo=dpo",
    "dpo.lr=1e-3",
    "dpo.batch_size=1",
    "dpo.epochs=3",
    "dpo.save_every=1",
    "optimizer=compo_tiny",
    "optimizer.num_directions=256",
    "optimizer.epochs=2",
    "optimizer.max_iterations=null",
    "optimizer.progress=false",
    "oracle=likelihood",
]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in mixed_pair_rows()))
    return path


def _cmd(run_dir: Path, pairs: Path, *extra: str, base: list[str] = PIPELINE) -> list[str]:
    return [
        sys.executable, "-m", "compo", *base, f"data.path={pairs}",
        f"hydra.run.dir={run_dir}", *extra,
    ]  # fmt: skip


def _run(run_dir: Path, pairs: Path, *extra: str, base: list[str] = PIPELINE):
    return subprocess.run(
        _cmd(run_dir, pairs, *extra, base=base),
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )


def _compo_only(run_dir: Path, pairs: Path, *extra: str):
    """ComPO alone on the whole file (no split, no DPO, no evaluation): a few seconds."""
    base = [
        "model=tiny",
        "eval=none",
        "splitter=none",
        "dpo=none",
        "optimizer=compo_tiny",
        "oracle=likelihood",
        f"optimizer.pairs_path={pairs}",
        "optimizer.progress=false",
    ]
    return _run(run_dir, pairs, *extra, base=base)


def _rows(run_dir: Path, stage: str) -> list[dict]:
    path = run_dir / "trace" / f"{stage}.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoint" / "model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, pairs_file) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    proc = _run(run_dir, pairs_file)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["dpo.steps_run"] == DPO_STEPS
    assert metrics["compo.n_iterations"] == COMPO_ITERATIONS and metrics["compo.n_applied"] > 0
    return run_dir


def _kill_point(seed: int) -> tuple[str, int]:
    """A seeded random point: after k trace rows of the DPO stage or of the ComPO stage."""
    rng = random.Random(seed)
    stage = ("dpo", "compo")[seed % 2]
    return stage, rng.randint(1, (DPO_STEPS if stage == "dpo" else COMPO_ITERATIONS) - 1)


@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_then_rerun_ends_with_the_uninterrupted_weights(
    tmp_path, pairs_file, uninterrupted, seed
):
    stage, k = _kill_point(seed)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        _cmd(run_dir, pairs_file), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 300
        while len(_rows(run_dir, stage)) < k and proc.poll() is None:
            assert time.monotonic() < deadline, "the run never reached the kill point"
            time.sleep(0.002)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)  # no handler, no cleanup: whatever was on disk stays
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "checkpoint").exists()

    resumed = _run(run_dir, pairs_file)
    assert resumed.returncode == 0, resumed.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if stage == "dpo":
        assert 0 < metrics["dpo.resumed_from_step"] < DPO_STEPS
        assert metrics["compo.resumed_from_iteration"] == 0
    else:
        assert metrics["dpo.steps_run"] == 0  # DPO was complete: restored, not redone
        assert 0 < metrics["compo.resumed_from_iteration"] < COMPO_ITERATIONS
    # One trace row per step and per iteration: none lost, none duplicated.
    assert [r["step"] for r in _rows(run_dir, "dpo")] == list(range(1, DPO_STEPS + 1))
    iterations = [r["iteration"] for r in _rows(run_dir, "compo")]
    assert iterations == list(range(COMPO_ITERATIONS))
    want, got = _weights(uninterrupted), _weights(run_dir)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    votes = [
        (r["n_better"], r["n_worse"], r["n_tie"], r["applied"]) for r in _rows(run_dir, "compo")
    ]
    assert votes == [
        (r["n_better"], r["n_worse"], r["n_tie"], r["applied"])
        for r in _rows(uninterrupted, "compo")
    ]


def test_a_completed_run_rerun_does_no_training_and_keeps_its_weights(
    tmp_path, pairs_file, uninterrupted
):
    run_dir = tmp_path / "run"
    # A copy of the finished run dir (state and traces) stands in for "the same command again".
    shutil.copytree(uninterrupted, run_dir)
    proc = _run(run_dir, pairs_file)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["dpo.steps_run"] == 0 and metrics["compo.iterations_run"] == 0
    assert metrics["compo.n_iterations"] == COMPO_ITERATIONS  # the summary covers the whole run
    for name, value in _weights(uninterrupted).items():
        assert torch.equal(value, _weights(run_dir)[name]), name


@pytest.fixture(scope="module")
def _finished_compo(tmp_path_factory, pairs_file) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    proc = _compo_only(run_dir, pairs_file, "optimizer.max_iterations=2")
    assert proc.returncode == 0, proc.stderr
    return run_dir


@pytest.fixture
def finished_compo(tmp_path, _finished_compo) -> Path:
    """A private copy of a finished 2-iteration ComPO run dir."""
    run_dir = tmp_path / "run"
    shutil.copytree(_finished_compo, run_dir)
    return run_dir


def _state_file(state_dir: Path, name: str) -> Path:
    progress = json.loads((state_dir / "progress.json").read_text())
    return state_dir / progress["files"][name]["file"]


@pytest.mark.parametrize("damage", ["truncate", "flip_byte"])
def test_corrupt_compo_state_is_refused_in_one_line(tmp_path, pairs_file, finished_compo, damage):
    weights = _state_file(finished_compo / "compo_state", "weights")
    blob = bytearray(weights.read_bytes())
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    else:
        blob[-5] ^= 0xFF  # same size, a tensor value changed: only the hash notices
    weights.write_bytes(bytes(blob))
    proc = _compo_only(finished_compo, pairs_file, "optimizer.max_iterations=2")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and weights.name in lines[0] and "corrupt" in lines[0], proc.stderr


def test_compo_state_of_another_setup_is_refused(tmp_path, pairs_file, finished_compo):
    changed = ["optimizer.max_iterations=2", "optimizer.radius=0.01"]
    proc = _compo_only(finished_compo, pairs_file, *changed)
    assert proc.returncode == 2 and "optimizer.resume=false" in proc.stderr, proc.stderr
    proc = _compo_only(finished_compo, pairs_file, *changed, "optimizer.resume=false")
    assert proc.returncode == 0, proc.stderr
    assert len(_rows(finished_compo, "compo")) == 2  # a fresh start replaced the old trace


def test_more_iterations_continue_a_finished_run(tmp_path, pairs_file, finished_compo):
    proc = _compo_only(finished_compo, pairs_file, "optimizer.max_iterations=4")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((finished_compo / "metrics.json").read_text())
    assert metrics["compo.resumed_from_iteration"] == 2 and metrics["compo.iterations_run"] == 2
    assert [r["iteration"] for r in _rows(finished_compo, "compo")] == [0, 1, 2, 3]


def test_corrupt_dpo_state_is_refused(tiny, easy_encoded, tmp_path):
    model, tokenizer = tiny
    out = RunDir(tmp_path)
    DPOTrainer(lr=1e-3, batch_size=2, save_every=1).train(
        model, easy_encoded, tokenizer.pad_token_id, out
    )
    trainable = _state_file(tmp_path / "dpo_state", "trainable")
    trainable.write_bytes(trainable.read_bytes()[:-100])
    fresh, _ = TinyModel(seed=0).load()
    before = {n: p.detach().clone() for n, p in fresh.named_parameters()}
    with pytest.raises(CompoError, match=f"{trainable.name}: corrupt checkpoint"):
        DPOTrainer(lr=1e-3, batch_size=2).train(fresh, easy_encoded, tokenizer.pad_token_id, out)
    assert all(torch.equal(p, before[n]) for n, p in fresh.named_parameters())  # nothing loaded


def test_a_commit_interrupted_before_its_marker_leaves_the_previous_state(tmp_path, monkeypatch):
    state.commit(tmp_path, 1, {"w": ("bin", b"first")}, {"step": 1})

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # dies after writing w-2.bin, before progress.json

    monkeypatch.setattr(state, "atomic_write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        state.commit(tmp_path, 2, {"w": ("bin", b"second")}, {"step": 2})
    progress, blobs = state.load(tmp_path, ("w",))
    assert progress["step"] == 1 and blobs == {"w": b"first"}
    monkeypatch.undo()
    state.commit(tmp_path, 3, {"w": ("bin", b"third")}, {"step": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["progress.json", "w-00000003.bin"]


def test_a_trace_line_that_is_no_row_of_it_is_dropped_on_resume(tmp_path):
    # A stray byte, a row without the key, or a key of another type crashed the resume with a
    # UnicodeDecodeError, KeyError or TypeError traceback.
    trace = tmp_path / "t.jsonl"
    trace.write_bytes(
        b'{"iteration": 0}\n{"iteration": 1, "x": "\xff"}\n{}\n[1]\n{"iteration": "3"}\n'
        b'{"iteration": true}\n{"iteration": 2}\n'
    )
    rows = state.truncate_trace(trace, lambda r: r["iteration"] < 3, "iteration")
    assert rows == [{"iteration": 0}, {"iteration": 2}]
    assert trace.read_text() == '{"iteration": 0}\n{"iteration": 2}\n'


def test_a_torn_trace_line_is_dropped_on_resume(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"iteration": 0}\n{"iteration": 1}\n{"iteration": 2}\n{"itera')
    rows = state.truncate_trace(trace, lambda r: r["iteration"] < 2, "iteration")
    assert rows == [{"iteration": 0}, {"iteration": 1}]
    assert trace.read_text() == '{"iteration": 0}\n{"iteration": 1}\n'


def _train_dpo(model, encoded, pad, out, **kwargs):
    settings = {"lr": 1e-3, "batch_size": 2, "save_every": 1, **kwargs}
    return DPOTrainer(**settings).train(model, encoded, pad, out)


@pytest.mark.parametrize(
    "change",
    [{"lr": 2e-3}, {"loss": DPO(beta=0.5)}, {"weight_decay": 0.1}, "flipped_labels", "other_model"],
)
def test_dpo_state_of_other_settings_or_data_is_refused(tiny, easy_encoded, tmp_path, change):
    model, tokenizer = tiny
    out, pad = RunDir(tmp_path), tokenizer.pad_token_id
    _train_dpo(model, easy_encoded, pad, out)
    fresh, kwargs, encoded = TinyModel(seed=0).load()[0], {}, easy_encoded
    if change == "flipped_labels":  # same prompts and replies, labels swapped
        encoded = [
            type(p)(**{**vars(p), "chosen_ids": p.rejected_ids, "rejected_ids": p.chosen_ids})
            for p in easy_encoded
        ]
    elif change == "other_model":
        fresh = TinyModel(seed=1).load()[0]
    else:
        kwargs = change
    before = {n: p.detach().clone() for n, p in fresh.named_parameters()}
    with pytest.raises(CompoError, match=r"dpo\.resume=false"):
        _train_dpo(fresh, encoded, pad, out, **kwargs)
    assert all(torch.equal(p, before[n]) for n, p in fresh.named_parameters())  # nothing loaded


def test_dpo_state_of_the_same_settings_resumes(tiny, easy_encoded, tmp_path):
    model, tokenizer = tiny
    out, pad = RunDir(tmp_path), tokenizer.pad_token_id
    _train_dpo(model, easy_encoded, pad, out)
    metrics = _train_dpo(TinyModel(seed=0).load()[0], easy_encoded, pad, out)
    assert metrics["resumed_from_step"] == metrics["total_steps"] and metrics["steps_run"] == 0


@pytest.mark.parametrize(
    "edit",
    [
        lambda p: [],
        lambda p: {**p, "files": 3},
        lambda p: {**p, "files": {"w": "w-00000001.bin"}},
        lambda p: {**p, "files": {"w": {**p["files"]["w"], "bytes": "5"}}},
        lambda p: {k: v for k, v in p.items() if k != "step"},
        lambda p: {**p, "step": 7},  # an edited step: no longer bound to the hashed files
        lambda p: {**p, "iteration": 9},  # any edited field
    ],
    ids=["list", "files-int", "entry-str", "bytes-str", "no-step", "step-edited", "field-edited"],
)
def test_malformed_or_edited_progress_is_one_line(tmp_path, edit):
    state.commit(tmp_path, 1, {"w": ("bin", b"first")}, {"iteration": 1})
    marker = tmp_path / "progress.json"
    marker.write_text(json.dumps(edit(json.loads(marker.read_text()))))
    with pytest.raises(CompoError, match=r"progress\.json") as info:
        state.load(tmp_path, ("w",))
    assert "\n" not in str(info.value)


def test_no_resume_state_with_nan_or_inf_weights(tiny, easy_encoded, tmp_path):
    model, tokenizer = tiny
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(CompoError, match="NaN"):
        _train_dpo(model, easy_encoded[:2], tokenizer.pad_token_id, RunDir(tmp_path))
    assert not (tmp_path / "dpo_state").exists()


def _compo_only_in_process(run_dir, pairs, *extra):
    from conftest import run_compo

    return run_compo(
        run_dir, "eval=none", "splitter=none", "dpo=none", "optimizer=compo_tiny",
        f"optimizer.pairs_path={pairs}", "optimizer.progress=false", *extra,
    )  # fmt: skip


def test_compo_state_of_another_oracle_is_refused(tmp_path, pairs_file):
    # The likelihood oracle's state (and its radius) must not be continued with a judge.
    _compo_only_in_process(tmp_path, pairs_file, "oracle=likelihood", "optimizer.max_iterations=2")
    with pytest.raises(CompoError, match=r"optimizer\.resume=false") as info:
        _compo_only_in_process(tmp_path, pairs_file, "oracle=scorer", "optimizer.max_iterations=4")
    # The oracle's type is named, not a setting the two oracles happen to share.
    assert "written with oracle.type='oracles.likelihood." in str(info.value)


def _forge(state_dir: Path, edit) -> None:
    """Edits progress.json and recomputes its checksum, as a determined user could."""
    marker = state_dir / "progress.json"
    progress = edit(json.loads(marker.read_text()))
    progress["checksum"] = state._checksum(progress)
    marker.write_text(json.dumps(progress))


@pytest.mark.parametrize(
    "edit",
    [
        lambda p: {**p, "iteration": 0},  # would redo iterations on top of later weights
        lambda p: {**p, "iteration": -5},
        lambda p: {**p, "iteration": "abc"},
        lambda p: {k: v for k, v in p.items() if k != "iteration"},
        lambda p: {**p, "radius": "big"},
        lambda p: {**p, "files": {}},
    ],
    ids=["iteration-0", "iteration-negative", "iteration-str", "no-iteration", "radius", "files"],
)
def test_forged_compo_progress_is_refused_in_one_line(tmp_path, pairs_file, edit):
    _compo_only_in_process(tmp_path, pairs_file, "oracle=likelihood", "optimizer.max_iterations=2")
    _forge(tmp_path / "compo_state", edit)
    with pytest.raises(CompoError, match="compo_state") as info:
        _compo_only_in_process(
            tmp_path, pairs_file, "oracle=likelihood", "optimizer.max_iterations=3"
        )
    assert "\n" not in str(info.value)


def test_forged_dpo_progress_without_its_optimizer_file_is_refused(tiny, easy_encoded, tmp_path):
    model, tokenizer = tiny
    out, pad = RunDir(tmp_path), tokenizer.pad_token_id
    _train_dpo(model, easy_encoded, pad, out)

    def drop_optimizer(p):
        return {**p, "files": {k: v for k, v in p["files"].items() if k != "optimizer"}}

    _forge(tmp_path / "dpo_state", drop_optimizer)
    with pytest.raises(CompoError, match="dpo_state"):
        _train_dpo(TinyModel(seed=0).load()[0], easy_encoded, pad, out)


def test_a_changed_loss_setting_is_named_in_the_refusal(tiny, easy_encoded, tmp_path):
    model, tokenizer = tiny
    out, pad = RunDir(tmp_path), tokenizer.pad_token_id
    _train_dpo(model, easy_encoded, pad, out, loss=DPO(beta=0.1))
    with pytest.raises(CompoError, match=r"written with dpo\.loss\.beta=0\.1, this run has 0\.2;"):
        _train_dpo(TinyModel(seed=0).load()[0], easy_encoded, pad, out, loss=DPO(beta=0.2))


def test_atomic_writes_get_the_users_file_mode(tmp_path, monkeypatch):
    """mkstemp's 0600 must not leak into a run dir: metrics.json is read by colleagues and tools."""
    import compo.rundir

    for umask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
        monkeypatch.setattr(compo.rundir, "_FILE_MODE", 0o666 & ~umask)
        compo.rundir.atomic_write_text(tmp_path / "metrics.json", "{}")
        assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == mode


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_is_one_line_saying_how_to_resume(tmp_path, pairs_file, sig):
    # Ctrl-C printed a 32-frame traceback; SIGTERM ended the run without a word.
    run_dir = tmp_path / "run"
    # A shell's background job inherits SIGINT ignored (and Python keeps it so): restore it.
    proc = subprocess.Popen(
        _cmd(run_dir, pairs_file), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not _rows(run_dir, "dpo") and proc.poll() is None:
            assert time.monotonic() < deadline, "the run never started training"
            time.sleep(0.01)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err and err.count("compo: ") == 1, err  # progress bars aside
    assert err.strip().splitlines()[-1] == (
        f"compo: interrupted; the same command with hydra.run.dir={run_dir} resumes the run"
    )
    assert not (run_dir / "checkpoint").exists()
    assert "interrupted" in (run_dir / "cli.log").read_text()


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("optimizer.radius=0.01", "optimizer.radius='auto', this run has 0.01"),
        ("optimizer.perturbation_batch=8", "optimizer.perturbation_batch=16, this run has 8"),
        ("optimizer.num_directions=32", "optimizer.num_directions=64, this run has 32"),
        # Values as the config writes them (true, null), not Python's True/None.
        ("optimizer.centred=true", "optimizer.centred=false, this run has true"),
        ("optimizer.clip_threshold=0.001", "optimizer.clip_threshold=null, this run has 0.001"),
    ],
)
def test_a_changed_compo_setting_is_named_in_the_refusal(tmp_path, pairs_file, change, named):
    # "Its settings, pairs or starting weights differ" left the user to guess which of ~30.
    _compo_only_in_process(tmp_path, pairs_file, "optimizer.max_iterations=2")
    with pytest.raises(CompoError, match=r"optimizer\.resume=false") as info:
        _compo_only_in_process(tmp_path, pairs_file, "optimizer.max_iterations=3", change)
    assert named in str(info.value) and "\n" not in str(info.value)


def test_compo_state_of_another_oracle_setting_names_it(tmp_path, pairs_file):
    base = ["oracle=likelihood", "optimizer.max_iterations=2"]
    _compo_only_in_process(tmp_path, pairs_file, *base)
    with pytest.raises(CompoError, match=r"optimizer\.resume=false") as info:
        _compo_only_in_process(tmp_path, pairs_file, *base, "oracle.aggregation=majority")
    assert "written with oracle.aggregation='any', this run has 'majority'" in str(info.value)


def test_a_changed_scorer_is_named_by_its_setting(tmp_path, pairs_file):
    base = ["oracle=scorer", "optimizer.max_iterations=1"]
    _compo_only_in_process(tmp_path, pairs_file, *base)
    with pytest.raises(CompoError) as info:
        _compo_only_in_process(
            tmp_path, pairs_file, *base, "oracle.judge.scorer=oracles.scorer.prompt_overlap",
            "oracle.judge.with_prompt=true",
        )  # fmt: skip
    assert "written with oracle.judge.scorer=" in str(info.value)


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_a_damaged_trace_on_resume_is_reported_not_miscounted(
    tmp_path, pairs_file, damage, caplog, capsys
):
    # The weights resume exactly, but the summary is read from the trace: 4 iterations ran in
    # all, whatever the trace still holds, and the counts it cannot vouch for are said to be so.
    _compo_only_in_process(tmp_path, pairs_file, "optimizer.max_iterations=2")
    trace = tmp_path / "trace" / "compo.jsonl"
    if damage == "deleted":
        trace.unlink()
    else:
        trace.write_text(trace.read_text().splitlines()[0] + "\n")
    metrics = _compo_only_in_process(tmp_path, pairs_file, "optimizer.max_iterations=4")
    traced = 2 if damage == "deleted" else 3
    assert metrics["compo.n_iterations"] == 4
    assert metrics["compo.n_iterations_traced"] == traced
    assert "trace" in metrics["compo.warning"]
    warned = [r.getMessage() for r in caplog.records if "trace/compo.jsonl" in r.getMessage()]
    assert len(warned) == 1 and f"holds {traced} of the 4 iterations" in warned[0], warned
    table = capsys.readouterr().out.rsplit("metric", 1)[1].split()  # the last run's summary
    keys = ["compo.n_iterations", "compo.n_iterations_traced", "compo.n_applied"]
    assert [table.index(k) for k in keys] == sorted(table.index(k) for k in keys)
    assert table[table.index("compo.n_iterations_traced") + 1] == str(traced)


def test_an_intact_trace_reports_no_untraced_iterations(tmp_path, pairs_file):
    _compo_only_in_process(tmp_path, pairs_file, "optimizer.max_iterations=2")
    metrics = _compo_only_in_process(tmp_path, pairs_file, "optimizer.max_iterations=4")
    assert metrics["compo.n_iterations"] == 4 and "compo.n_iterations_traced" not in metrics
