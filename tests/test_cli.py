"""The ``compo`` command end to end on the tiny model, as a user runs it (a real subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

GOOD = {"prompt": "Name a color.", "chosen": "Blue.", "rejected": "Seven."}


def _compo(run_dir, *overrides):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "compo", "model=tiny", f"hydra.run.dir={run_dir}", *overrides],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_run_writes_the_run_dir(tmp_path, write_jsonl):
    data = write_jsonl([GOOD, {**GOOD, "chosen": "Red.", "id": "r"}])
    run_dir = tmp_path / "run"
    proc = _compo(run_dir, f"data.path={data}")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["data.n_pairs"] == 2 and metrics["data.n_rows_rejected"] == 0
    assert 0.0 <= metrics["eval.before.accuracy"] <= 1.0
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["data"]["path"] == str(data) and "${" not in (run_dir / "config.yaml").read_text()
    assert "eval.before.accuracy" in proc.stdout  # the summary table


def test_malformed_file_is_one_line_and_exit_2(tmp_path, write_jsonl):
    data = write_jsonl([GOOD, {"prompt": "q", "chosen": "a"}])
    run_dir = tmp_path / "run"
    proc = _compo(run_dir, f"data.path={data}")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    reason = (
        f"{data}: row 2: field 'rejected': is missing (data.on_error=skip sets such rows aside)"
    )
    assert errors == [f"compo: error: {reason}"]
    # Once on the terminal (not again in the log's console copy on stdout), and in the run's log.
    assert reason not in proc.stdout
    assert reason in (run_dir / "cli.log").read_text()


def test_skip_mode_reports_rejected_rows(tmp_path, write_jsonl):
    data = write_jsonl([GOOD, {"prompt": "q", "chosen": "a"}, b"\xff broken"])
    run_dir = tmp_path / "run"
    proc = _compo(run_dir, f"data.path={data}", "data.on_error=skip")
    assert proc.returncode == 0, proc.stderr
    rejected = [
        json.loads(line) for line in (run_dir / "rejected_rows.jsonl").read_text().splitlines()
    ]
    assert [(r["row"], r["field"]) for r in rejected] == [(2, "rejected"), (3, None)]
    assert json.loads((run_dir / "metrics.json").read_text())["data.n_rows_rejected"] == 2


def test_missing_model_and_bad_option_are_one_line_errors(tmp_path):
    proc = _compo(tmp_path / "a", "model=pretrained", f"model.name_or_path={tmp_path / 'nope'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("compo: error: cannot load model")
    proc = _compo(tmp_path / "b", "data.on_error=ignore")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "data.on_error" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


HOLD_LOCK = """
import sys, time
from compo.rundir import lock_run_dir
with lock_run_dir(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_busy_run_dir_is_refused_naming_the_holder(tmp_path, write_jsonl):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = _compo(run_dir, "optimizer=none", "dpo=none", "splitter=none", "eval=none")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines() == [
            f"compo: error: run dir {run_dir} is in use by pid {holder.pid} (another compo run); "
            "wait for it to finish or choose another hydra.run.dir"
        ]
        assert not (run_dir / "metrics.json").exists()
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock, no stale lock file blocks reruns
        holder.wait()
    proc = _compo(run_dir, "optimizer=none", "dpo=none", "splitter=none", "eval=none")
    assert proc.returncode == 0, proc.stderr


def test_bad_settings_stop_before_any_work_in_one_line(tmp_path):
    # Each used to save a model (NaN, or trained on nothing) with exit 0, or end in a traceback.
    cases = {
        "optimizer.step_size=nan": "optimizer.step_size must be a finite number > 0, got nan",
        "optimizer.num_directions=lots": "optimizer.num_directions must be an integer >= 1",
        "seed=abc": "seed must be an integer in [0, 9223372036854775807], got 'abc'",
        "device=cuda:7": "device=cuda:7: this machine has no such device",
        # Relative paths were then read from inside the run dir ("no such file"), and a relative
        # reference_cache was made in each run dir.
        "hydra.job.chdir=true": "hydra.job.chdir=true is not supported: compo reads relative "
        "paths from the directory it is started in",
        # An interpolation that cannot be resolved used to end in OmegaConf's traceback.
        "seed=${oc.env:COMPO_TEST_UNSET}": "seed: cannot resolve its value: KeyError raised "
        "while resolving interpolation: \"Environment variable 'COMPO_TEST_UNSET' not found\"",
        "data.path=${nope}": "data.path: cannot resolve its value: Interpolation key 'nope' not "
        "found",
    }
    for i, (override, message) in enumerate(cases.items()):
        run_dir = tmp_path / str(i)
        proc = _compo(run_dir, "optimizer=compo_tiny", override)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"compo: error: {message}"), lines
        assert not (run_dir / "checkpoint").exists() and not (run_dir / "metrics.json").exists()


def test_hydra_refusing_an_override_is_one_line_and_exit_2(tmp_path):
    # Hydra printed these in 3-16 lines (option lists, its config search path) with exit 1.
    cases = {
        "optimizer=bogus": "In 'config': Could not find 'optimizer/bogus'; available options in "
        "'optimizer': compo, compo_cpu,",
        "dpo.lrr=0.1": "Could not override 'dpo.lrr'; to add it as a new key, prefix it with + "
        "(Key 'lrr' is not in struct)",
        "seed": "Error parsing override 'seed'; missing EQUAL at '<EOF>'",
        "oracle.judge.api_keyy=sk-SECRET123": "Could not override 'oracle.judge.api_keyy'",
    }
    for i, (override, message) in enumerate(cases.items()):
        proc = _compo(tmp_path / str(i), override)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"compo: error: {message}"), lines
        assert "SECRET123" not in proc.stderr + proc.stdout  # the value is not echoed
        assert not (tmp_path / str(i)).exists()  # refused before Hydra made the run dir


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-m", "--cfg", "job"], "Only one of --run, --multirun, --cfg"),
        (["--cfg", "job", "--resolve", "seed=${oc.env:COMPO_UNSET_VAR}"], "COMPO_UNSET_VAR"),
        (["-m", "hydra/launcher=local_joblib", "hydra.launcher.n_jobs=0", "seed=1,2"], "n_jobs"),
    ],
    ids=["two-modes", "cfg-resolve", "joblib-n_jobs"],
)
def test_hydra_or_a_plugin_failing_outside_the_job_is_one_line(tmp_path, args, message):
    # These were 20-40 line tracebacks from Hydra, OmegaConf or joblib with exit 1.
    proc = subprocess.run(
        [sys.executable, "-m", "compo", *args, "model=tiny", f"hydra.run.dir={tmp_path / 'run'}",
         f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("compo: error: hydra: "), lines
    assert message in lines[0] and lines[0].endswith("(HYDRA_FULL_ERROR=1 shows where)"), lines


def test_a_bug_inside_the_job_keeps_its_traceback(tmp_path):
    # Only failures outside compo's job are shortened: a bug in compo must show where it is.
    code = (
        "import sys, compo.cli\n"
        "def broken(*args, **kwargs):\n"
        "    raise ValueError('a bug in the pipeline')\n"
        "compo.cli.run_pipeline = broken\n"
        "sys.argv = ['compo', 'model=tiny', sys.argv[1]]\n"
        "compo.cli.main()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" in proc.stderr, proc.stderr
    assert "in broken" in proc.stderr and "a bug in the pipeline" in proc.stderr


EMPTY = "is empty (an unset shell variable?); give a directory"
ROOT = "is the filesystem root (an unset shell variable?); give a directory"
LEADING = "starts with a variable that is empty (an unset shell variable?); give a directory"


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ("hydra.run.dir=", EMPTY),
        ("hydra.sweep.dir=  ", EMPTY),
        ("hydra.run.dir=''", EMPTY),
        # An interpolation that resolves to nothing wrote the run into the working directory.
        ("hydra.run.dir=${oc.env:COMPO_UNSET_DIR,}", EMPTY),
        ("hydra.sweep.dir='${oc.env:COMPO_UNSET_DIR,\"\"}'", EMPTY),
        # ... or into the filesystem root: $OUT/ with OUT unset, or its interpolated form.
        ("hydra.run.dir=/", ROOT),
        ("hydra.run.dir=${oc.env:COMPO_UNSET_DIR,}/run", LEADING),
        # Every job of a sweep would share one run dir, each overwriting the last.
        ("hydra.sweep.subdir=", EMPTY),
        ("hydra.sweep.subdir=.", "is the sweep dir itself: every job would share it; give a name"),
    ],
)
def test_an_empty_run_dir_is_refused_not_the_current_directory(tmp_path, override, reason):
    # An unset shell variable (hydra.run.dir=$OUT) used to write the run into the working directory.
    proc = subprocess.run(
        [sys.executable, "-m", "compo", "model=tiny", "dpo=none", "optimizer=none", override],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path.cwd())},
    )  # fmt: skip
    key = override.split("=")[0]
    assert proc.returncode == 2 and proc.stderr.strip() == f"compo: error: {key} {reason}", (
        proc.stderr
    )
    assert list(tmp_path.iterdir()) == []


def test_a_run_dir_hydra_cannot_create_is_one_line(tmp_path):
    # A file in its place ended in a 28-line FileExistsError traceback with exit 1.
    (tmp_path / "afile").write_text("x")
    for run_dir in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        proc = _compo(run_dir, "dpo=none", "optimizer=none")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"compo: error: {tmp_path / 'afile'}")
        assert lines[0].endswith(("File exists", "Not a directory")), lines


def test_a_new_top_level_key_nothing_reads_is_warned_about(tmp_path, write_jsonl):
    # +seeds=1 (a typo of seed, with the + Hydra asks for) ran silently with seed 0.
    data = write_jsonl([GOOD])
    off = ["dpo=none", "optimizer=none", "splitter=none", "eval=none", f"data.path={data}"]
    proc = _compo(tmp_path / "run", "+experiment=tiny_smoke", *off, "+seeds=1", "+note=baseline")
    assert proc.returncode == 0, proc.stderr
    warned = [line for line in proc.stdout.splitlines() if "nothing in compo reads" in line]
    assert len(warned) == 1 and "+seeds, +note" in warned[0] and "did you mean seed?" in warned[0]


def test_a_secret_given_as_a_setting_is_scrubbed_from_the_run_dir(tmp_path):
    # A key typed where a variable name belongs, or credentials in the judge's URL, used to be
    # echoed in the error and stay in cli.log and Hydra's copy of the config (.hydra/).
    for i, override in enumerate(
        [
            "oracle.judge.api_key_env=sk-SECRET123",
            "oracle.judge.base_url=http://user:SECRET123@127.0.0.1:9/v1",
            "oracle.judge.base_url='http://127.0.0.1:9/v1?api-key=SECRET123'",
            # Another setting refused first: the key stayed in .hydra/ (the user fixes dpo.lr
            # and reruns elsewhere).
            "oracle.judge.api_key_env=sk-SECRET123 dpo.lr=-1",
        ]
    ):
        run_dir = tmp_path / str(i)
        proc = _compo(run_dir, "optimizer=compo_tiny", "oracle=openai_judge", *override.split())
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "SECRET123" not in proc.stderr + proc.stdout
        assert (run_dir / ".hydra" / "overrides.yaml").is_file()
        for path in run_dir.rglob("*"):
            if path.is_file():
                assert b"SECRET123" not in path.read_bytes(), path


def test_a_secret_given_as_a_setting_in_a_sweep_is_scrubbed_from_the_sweep_dir(tmp_path):
    # Under -m Hydra also writes multirun.yaml (overrides, override_dirname, the config) at the
    # sweep dir's root: the key stayed there three times.
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "compo", "-m", "model=tiny", "optimizer=compo_tiny",
         "oracle=openai_judge", "oracle.judge.api_key_env=sk-SECRET123,sk-SECRET456",
         f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "SECRET123" not in proc.stderr
    assert (sweep / "multirun.yaml").is_file() and (sweep / "0" / ".hydra").is_dir()
    for path in sweep.rglob("*"):  # the swept value no job ran with is gone too
        if path.is_file():
            assert b"SECRET123" not in path.read_bytes(), path
            assert b"SECRET456" not in path.read_bytes(), path


def test_an_unlockable_run_dir_is_one_line(tmp_path):
    from compo.errors import CompoError
    from compo.rundir import lock_run_dir

    (tmp_path / ".lock").mkdir()  # found by a hostile probe: IsADirectoryError
    try:
        with lock_run_dir(tmp_path):
            raise AssertionError("locked a run dir whose lock file is a directory")
    except CompoError as exc:
        assert str(exc).startswith(f"cannot lock run dir {tmp_path}") and "\n" not in str(exc)


def test_help_explains_compo_and_version_prints_it():
    import importlib.metadata

    run = [sys.executable, "-m", "compo"]
    helped = subprocess.run([*run, "--help"], capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "is powered by Hydra" not in helped.stdout
    assert "compo: preference alignment for noisy feedback" in helped.stdout
    assert "dpo: cdpo, contrast_sft" in helped.stdout and "Examples:" in helped.stdout
    version = subprocess.run([*run, "--version"], capture_output=True, text=True, timeout=60)
    assert version.stdout.strip() == f"compo {importlib.metadata.version('compo')}"


def test_every_flag_of_every_console_script_has_help():
    from compo.clicks_cli import build_parser as clicks
    from oracles.human import build_parser as label
    from oracles.judge_server import build_parser as judge_server

    for build in (clicks, label, judge_server):
        parser = build()
        for action in parser._actions:
            assert action.help, f"{parser.prog}: {action.option_strings or action.dest} has no help"
    assert clicks().parse_args(["in.jsonl", "-o", "out.jsonl"]).out.name == "out.jsonl"
    vllm_style = judge_server().parse_args(["--served-model-name", "judge", "--api-key", "k"])
    assert vllm_style.model_name == "judge" and vllm_style.api_key == "k"


def test_a_message_whose_first_line_ends_in_a_colon_keeps_what_follows():
    # Hydra's "Error loading 'compo.zo.RademacherDirections':" was cut there: the reason is below.
    from compo.errors import first_line

    cause = ValueError(
        "Error loading 'a.B':\nModuleNotFoundError(\"No module named 'a'\")\nAre you sure?"
    )
    assert first_line(cause) == (
        "Error loading 'a.B': ModuleNotFoundError(\"No module named 'a'\") Are you sure?"
    )
    assert first_line(ValueError("one line\nand a second")) == "one line"
    long = first_line(ValueError("from one of:\n" + "x" * 1000))
    assert len(long) <= 300 and long.endswith("...")
