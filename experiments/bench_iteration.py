"""Where a ComPO iteration's time goes on the default model (SmolLM2-135M-Instruct).

Runs ComPO's stage alone with the likelihood oracle on the first pairs of the embedded default
data (the main job's settings: support-restricted directions, top-k 16, m = 64), one pair per
iteration, and prints each iteration's seconds (from the trace) and, with ``--profile``, the
functions that took the most time. Load averages are printed before and after: a time is only as
good as the machine was idle.

    OMP_NUM_THREADS=1 python experiments/bench_iteration.py --estimator monte_carlo expected

To compare two versions of the code, run it at each commit on an idle machine, alternating
(A B A B): the script measures one version, the one it is run from.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import tempfile
from pathlib import Path

import torch

from compo.data import load_pairs
from compo.encoding import encode_pairs
from compo.models import EmbeddedSmolLM2
from compo.rundir import RunDir
from compo.zo import ComPO
from compo.zo.directions import SupportRestricted
from oracles.likelihood import LikelihoodOracle


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def iteration_seconds(estimator: str, iterations: int, profile: bool) -> list[float]:
    """Per-iteration seconds of one fresh ComPO run (printing its profile when asked)."""
    model, tokenizer = EmbeddedSmolLM2().load()
    pairs = load_pairs(None, limit=iterations).pairs
    encoded, _ = encode_pairs(pairs, tokenizer, max_length=512, max_prompt_length=256)
    optimizer = ComPO(
        num_directions=64,
        directions=SupportRestricted(16),
        step_size=0.1,
        threshold=0.0,
        estimator=estimator,
        progress=False,
    )
    with tempfile.TemporaryDirectory() as tmp:
        profiler = cProfile.Profile() if profile else None
        if profiler:
            profiler.enable()
        optimizer.run(model, tokenizer, encoded, LikelihoodOracle(), RunDir(tmp))
        if profiler:
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(12)
        trace = (Path(tmp) / "trace" / "compo.jsonl").read_text().splitlines()
    return [json.loads(line)["seconds"] for line in trace]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--estimator", nargs="+", default=["monte_carlo", "expected"])
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"load before: {_load()}")
    for estimator in args.estimator:
        seconds = iteration_seconds(estimator, args.iterations, args.profile)
        mean = sum(seconds) / len(seconds)
        print(f"{estimator}: {mean:.2f} s an iteration ({', '.join(f'{s:.2f}' for s in seconds)})")
    print(f"load after: {_load()}")


if __name__ == "__main__":
    main()
