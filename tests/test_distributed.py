"""ComPO's perturbations split across 2 processes (torchrun, gloo on CPU) give a single process's
vote counts exactly and its weights within 1e-6 relative."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compo import distributed

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(*args: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *args,
    ]  # fmt: skip


@pytest.mark.parametrize("m", [0, 1, 7, 64, 1600])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_partition_covers_every_index_once_in_contiguous_balanced_ranges(m, world):
    shares = [distributed.partition(m, r, world) for r in range(world)]
    assert [i for share in shares for i in share] == list(range(m))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError):
        distributed.partition(m, world, world)


def test_helpers_are_no_ops_in_one_process():
    assert not distributed.init_from_env()  # WORLD_SIZE unset under pytest
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    x = torch.arange(3.0)
    assert distributed.all_reduce_sum(x) is x and torch.equal(x, torch.arange(3.0))
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    distributed.barrier()
    distributed.finalize()


ESTIMATES = textwrap.dedent(
    """
    import sys, torch
    from compo import distributed
    from compo.types import PreferencePair
    from compo.encoding import encode_pairs
    from compo.models import TinyModel
    from compo.zo import LowRank, Scope
    from compo.zo.estimator import MonteCarlo
    from compo.zo.head import HeadEvaluator
    from oracles.likelihood import LikelihoodOracle

    distributed.init_from_env()
    torch.manual_seed(1234 + distributed.rank())  # global RNG differs per rank: must not matter
    model, tokenizer = TinyModel(seed=0).load()
    pair = PreferencePair("p", "Capital of Italy?", "Rome.", "Rome!")
    encoded = encode_pairs([pair], tokenizer, max_length=256, max_prompt_length=128)[0]
    scope = Scope(model)
    oracle, head = LikelihoodOracle(), HeadEvaluator()
    head.begin(model, scope, encoded, tokenizer.pad_token_id)
    oracle.begin(model, scope, encoded, tokenizer.pad_token_id, iteration=0, head=head)
    estimators = {
        "gaussian": MonteCarlo(num_directions=37, radius=1e-3, batch=4),
        "centred_antithetic": MonteCarlo(
            num_directions=38, radius=1e-3, batch=4, centred=True, antithetic=True
        ),
        "lowrank": MonteCarlo(LowRank(rank=2), num_directions=37, radius=1e-3, batch=5),
    }
    out = {}
    for name, estimator in estimators.items():
        est = estimator.estimate(oracle, scope, seed=3, iteration=1)
        out[name + ".counts"] = torch.tensor([est.n_better, est.n_worse, est.n_tie, est.m])
        for i, t in enumerate(est.vector):
            out[f"{name}.{i}"] = t
    if distributed.is_main():
        torch.save(out, sys.argv[1])
    distributed.finalize()
    """
)


def test_estimators_reduced_over_two_ranks_equal_one_process(tmp_path):
    script = tmp_path / "estimates.py"
    script.write_text(ESTIMATES)
    one = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "one.pt")], env=ENV, capture_output=True
    )
    two = subprocess.run(
        _torchrun(str(script), str(tmp_path / "two.pt")), env=ENV, capture_output=True
    )
    assert one.returncode == 0, one.stderr.decode()
    assert two.returncode == 0, two.stderr.decode()
    a = torch.load(tmp_path / "one.pt", weights_only=True)
    b = torch.load(tmp_path / "two.pt", weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith(".counts"):
            assert torch.equal(a[key], b[key]), key
            assert 0 < a[key][0] < a[key][3], key  # votes of both kinds: a real test
        else:
            rel = ((a[key] - b[key]).norm() / a[key].norm()).item()
            assert rel < 1e-6, (key, rel)


PAIRS = [
    ("Name a color.", "Blue."),
    ("What is 2+2?", "4."),
    ("Capital of Italy?", "Rome."),
    ("Name a fruit.", "Apple."),
]


def _compo_args(pairs: Path, run_dir: Path) -> list[str]:
    return [
        "-m", "compo", "model=tiny", f"data.path={pairs}", "optimizer=compo_tiny",
        "oracle=likelihood", f"optimizer.pairs_path={pairs}", "optimizer.epochs=2",
        "dpo=none", "splitter=none", "eval=none", "optimizer.progress=false",
        f"hydra.run.dir={run_dir}",
    ]  # fmt: skip


def _trace(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "trace" / "compo.jsonl").read_text().splitlines()]


def test_compo_under_torchrun_matches_one_process(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"id": f"a{i}", "prompt": q, "chosen": a, "rejected": a + "!"}) + "\n"
            for i, (q, a) in enumerate(PAIRS)
        )
    )
    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    one = subprocess.run(
        [sys.executable, *_compo_args(pairs, one_dir)], env=ENV, capture_output=True, text=True
    )
    two = subprocess.run(
        _torchrun(*_compo_args(pairs, two_dir)), env=ENV, capture_output=True, text=True
    )
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr

    rows_one, rows_two = _trace(one_dir), _trace(two_dir)
    assert len(rows_two) == 8  # one row per iteration: rank 1 wrote none
    counts = [(r["n_better"], r["n_worse"], r["n_tie"], r["m"], r["applied"]) for r in rows_one]
    assert counts == [
        (r["n_better"], r["n_worse"], r["n_tie"], r["m"], r["applied"]) for r in rows_two
    ]
    assert sum(r["applied"] for r in rows_one) > 0
    w1 = load_file(one_dir / "checkpoint" / "model.safetensors")
    w2 = load_file(two_dir / "checkpoint" / "model.safetensors")
    for name, value in w1.items():
        rel = ((value - w2[name]).norm() / value.norm()).item()
        assert rel < 1e-6, (name, rel)
    progress = json.loads((two_dir / "compo_state" / "progress.json").read_text())
    committed = load_file(two_dir / "compo_state" / progress["files"]["weights"]["file"])
    assert progress["iteration"] == 8 and committed["lm_head.weight"].dtype == torch.float32
    # Rank 1 printed no summary and left no run dir of its own.
    assert two.stdout.count("run dir:") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "pairs.jsonl", "two"]

    # The same command again resumes from rank 0's compo_state/ on both ranks: nothing to do.
    again = subprocess.run(
        _torchrun(*_compo_args(pairs, two_dir)), env=ENV, capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr
    metrics = json.loads((two_dir / "metrics.json").read_text())
    assert metrics["compo.iterations_run"] == 0 and metrics["compo.n_iterations"] == 8
    rerun = load_file(two_dir / "checkpoint" / "model.safetensors")
    assert torch.equal(rerun["lm_head.weight"], w2["lm_head.weight"])
