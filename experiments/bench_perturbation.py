"""Seconds per perturbation: the authors' full forward passes against compo's cached-head oracle.

    python experiments/bench_perturbation.py                       # SmolLM2-135M, ~3 min on 2 cores
    python experiments/bench_perturbation.py --model tiny --full 8 # seconds, for a smoke test

(a) the authors' approach: for every perturbation, a full forward pass of the unperturbed and of
the perturbed model (output layer W + r z) on the pair; (b) compo's likelihood oracle: hidden states
cached once per iteration, each perturbation costs H z^T and a log-softmax at response positions.
Both use Gaussian directions of the same radius; (b) is also run with low-rank and
support-restricted directions. Fewer perturbations are timed for the slow baseline: the figure
compared is seconds per perturbation, measured side by side in this run. Peak memory (RSS) of a
ComPO iteration is compared with that of plain inference on the same pair.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from compo.encoding import encode_pairs
from compo.models import EmbeddedSmolLM2, TinyModel
from compo.scoring import score_pairs
from compo.types import PreferencePair
from compo.zo import GaussianSphere, LowRank, Scope, SupportRestricted
from compo.zo.estimator import MonteCarlo
from compo.zo.head import HeadEvaluator
from experiments.memory import MIB, PeakRSS
from oracles.likelihood import LikelihoodOracle

PAIR = PreferencePair(
    "bench",
    "My tomato plants have yellow leaves at the bottom. What could be wrong and what should I do?",
    "Yellowing lower leaves on tomatoes usually come from one of three things. Nitrogen "
    "deficiency: older leaves yellow first because the plant moves nitrogen to new growth; feed "
    "with a balanced fertilizer. Overwatering: soggy soil starves roots of oxygen; water deeply "
    "but only when the top inch is dry. Early blight: yellow leaves with brown rings; remove "
    "them, mulch, and avoid wetting the foliage. Check which matches and treat accordingly.",
    "Tomato plants get yellow leaves sometimes. It might be the weather or the soil or maybe "
    "something else. You could try watering them more, or less, or adding some fertilizer. "
    "Plants are complicated and it is hard to say without seeing them. Maybe ask at a garden "
    "store. Yellow leaves are common and usually the plant will be fine in the end, probably.",
)


def authors_per_perturbation(model, scope, pairs, pad, radius, n) -> float:
    """Full forward of unperturbed and perturbed model per perturbation (authors' approach)."""
    sampler = GaussianSphere()
    weight = scope.head.param
    started = time.perf_counter()
    with torch.no_grad():
        for i in range(n):
            z = sampler.sample(0, 0, [i], scope.shapes).scaled(radius).dense(0)[0]
            current = score_pairs(model, pairs, pad)
            weight.add_(z)
            perturbed = score_pairs(model, pairs, pad)
            weight.sub_(z)
            _ = (perturbed[0].sum_logps > current[0].sum_logps) & (
                perturbed[1].sum_logps < current[1].sum_logps
            )
    return (time.perf_counter() - started) / n


def ours_per_perturbation(model, scope, pairs, pad, sampler, radius, n, batch):
    """compo's oracle: one cache per iteration, then n perturbations (sampling + votes + sum)."""
    oracle, head = LikelihoodOracle(), HeadEvaluator()
    started = time.perf_counter()
    head.begin(model, scope, pairs, pad)
    oracle.begin(model, scope, pairs, pad, iteration=0, head=head)
    cache = time.perf_counter() - started
    estimator = MonteCarlo(sampler, num_directions=n, radius=radius, batch=batch)
    support = head.support(sampler.top_k) if getattr(sampler, "needs_support", 0) else None
    est = estimator.estimate(oracle, scope, seed=0, iteration=0, support=support)
    return est.seconds / n, cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--full", type=int, default=3, help="perturbations timed for (a)")
    parser.add_argument("--dense", type=int, default=16, help="Gaussian perturbations for (b)")
    parser.add_argument("--lowrank", type=int, default=256)
    parser.add_argument("--support", type=int, default=128)
    parser.add_argument("--radius", type=float, default=5e-4)
    parser.add_argument("--batch", type=int, default=1, help="directions alive at once (dense)")
    args = parser.parse_args()
    print("command:", " ".join(["python", *sys.argv]))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    model, tokenizer = (EmbeddedSmolLM2() if args.model == "smollm2" else TinyModel()).load()
    encoded, _ = encode_pairs([PAIR], tokenizer, max_length=512, max_prompt_length=256)
    pad = tokenizer.pad_token_id
    e = encoded[0]
    print(
        f"model {args.model}: prompt {len(e.prompt_ids)} tokens, chosen {len(e.chosen_ids)}, "
        f"rejected {len(e.rejected_ids)}"
    )
    scope = Scope(model)
    print(f"perturbed: {scope.names} {tuple(scope.shapes[0])} = {scope.numel:,} params")

    score_pairs(model, encoded, pad)  # warm-up
    with PeakRSS() as inference:
        score_pairs(model, encoded, pad)
    with PeakRSS() as iteration:
        dense, cache = ours_per_perturbation(
            model, scope, encoded, pad, GaussianSphere(), args.radius, args.dense, args.batch
        )
    full = authors_per_perturbation(model, scope, encoded, pad, args.radius, args.full)
    low, _ = ours_per_perturbation(
        model, scope, encoded, pad, LowRank(rank=1), args.radius, args.lowrank, 64
    )
    sup, _ = ours_per_perturbation(
        model, scope, encoded, pad, SupportRestricted(top_k=16), args.radius, args.support, 16
    )
    print(f"\n{'method':<44} {'n':>5} {'s/perturbation':>15} {'speed-up':>9}")
    rows = [
        ("(a) authors: 2 full forwards per perturbation", args.full, full),
        ("(b) compo, exact Gaussian directions", args.dense, dense),
        ("(b) compo, low-rank (rank 1) directions", args.lowrank, low),
        ("(b) compo, support-restricted (top-16)", args.support, sup),
    ]
    for name, n, sec in rows:
        print(f"{name:<44} {n:>5} {sec:>15.4f} {full / sec:>8.1f}x")
    print(f"compo cache (once per iteration): {cache:.3f} s")
    print(
        f"peak RSS: inference {inference.peak / MIB:.0f} MiB, ComPO iteration (Gaussian, batch "
        f"{args.batch}) {iteration.peak / MIB:.0f} MiB, ratio {iteration.peak / inference.peak:.2f}"
    )


if __name__ == "__main__":
    main()
