"""Cosine of the Monte-Carlo ComPO direction to its limit, against m and seconds, per family.

    python experiments/bench_estimator.py                 # SmolLM2-135M, ~5 min on 2 cores
    python experiments/bench_estimator.py --model tiny    # seconds

The limit is -(a/||a|| + b/||b||) with a = grad log pi(y+|x), b = -grad log pi(y-|x) over the
output layer (the r -> 0 expectation of y z for the likelihood oracle and one pair); it costs two
backward passes (``estimator=expected``). Each family draws directions with the same radius
and the running sum of y z (or of (y - mean y) z when centred) is compared with the limit at
m = 16, 64, 256, ... Dense families stop at ``--max-dense`` perturbations (0.3-0.5 s each on
SmolLM2 here), the cheap ones at ``--max-cheap``.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from bench_perturbation import PAIR  # the same realistic pair (script dir is on sys.path)

from compo.encoding import encode_pairs
from compo.models import EmbeddedSmolLM2, TinyModel
from compo.zo import GaussianSphere, LowRank, Rademacher, Scope, SupportRestricted
from compo.zo.estimator import cosine, limit_direction
from compo.zo.head import HeadEvaluator
from oracles.likelihood import LikelihoodOracle


def curve(oracle, scope, sampler, radius, m_max, batch, centred, antithetic, support):
    """(m, seconds, cosine to the limit, observed frac) at powers of 4 from 16 up to m_max."""
    sum_yz = [torch.zeros_like(t) for t in scope.masters()]
    sum_z = [torch.zeros_like(t) for t in sum_yz]
    checkpoints = [m for m in (16, 64, 256, 1024, 4096, 16384) if m <= m_max] or [m_max]
    out, votes, drawn, started = [], [], 0, time.perf_counter()
    limit = limit_direction(oracle.head).direction
    while len(votes) < checkpoints[-1]:
        step = min(batch, checkpoints[len(out)] - len(votes))
        if antithetic:
            step = max(1, step // 2)
        # ``drawn`` counts base directions: antithetic copies share the base's index.
        dirs = sampler.sample(0, 0, list(range(drawn, drawn + step)), scope.shapes, support)
        if antithetic:
            dirs = dirs.antithetic()
        y = torch.tensor([int(v) for v in oracle.compare(dirs.scaled(radius))], dtype=torch.float32)
        dirs.accumulate(sum_yz, y)
        if centred:
            dirs.accumulate(sum_z, torch.ones_like(y))
        votes.extend(y.tolist())
        drawn += step
        m = len(votes)
        while len(out) < len(checkpoints) and m >= checkpoints[len(out)]:
            mean_y = sum(votes) / m
            g = [a - mean_y * z for a, z in zip(sum_yz, sum_z, strict=True)] if centred else sum_yz
            frac = votes.count(-1.0) / m
            out.append((m, time.perf_counter() - started, cosine(g, limit), frac))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--max-dense", type=int, default=64)
    parser.add_argument("--max-cheap", type=int, default=1024)
    parser.add_argument("--radius", type=float, default=5e-4)
    args = parser.parse_args()
    print("command:", " ".join(["python", *sys.argv]))
    model, tokenizer = (EmbeddedSmolLM2() if args.model == "smollm2" else TinyModel()).load()
    encoded, _ = encode_pairs([PAIR], tokenizer, max_length=512, max_prompt_length=256)
    scope = Scope(model)
    oracle, head = LikelihoodOracle(), HeadEvaluator()
    head.begin(model, scope, encoded, tokenizer.pad_token_id)
    oracle.begin(model, scope, encoded, tokenizer.pad_token_id, iteration=0, head=head)
    started = time.perf_counter()
    limit = limit_direction(head)
    print(
        f"dimension {scope.numel:,}; limit direction (expected estimator): "
        f"{time.perf_counter() - started:.2f} s; angle(a, b) = {limit.angle:.3f} rad, "
        f"predicted frac = {limit.frac:.3f}"
    )
    support = head.support(16)
    print(f"support: {support.numel()} of {scope.shapes[0][0]} output-layer rows (tokens + top-16)")
    families = [
        ("gaussian", GaussianSphere(), args.max_dense, 1, False, False),
        ("gaussian+centred", GaussianSphere(), args.max_dense, 1, True, False),
        ("gaussian+antithetic", GaussianSphere(), args.max_dense, 4, False, True),
        ("rademacher", Rademacher(), args.max_dense, 1, False, False),
        ("lowrank-1", LowRank(1), args.max_cheap, 64, False, False),
        ("lowrank-1+centred", LowRank(1), args.max_cheap, 64, True, False),
        ("lowrank-8+centred", LowRank(8), args.max_cheap, 64, True, False),
        ("support-16", SupportRestricted(16), args.max_cheap, 16, False, False),
        ("support-16+centred", SupportRestricted(16), args.max_cheap, 16, True, False),
    ]
    print(f"\n{'family':<22} {'m':>6} {'seconds':>9} {'cos(limit)':>11} {'frac':>7}")
    for name, sampler, m_max, batch, centred, antithetic in families:
        for m, sec, cos, frac in curve(
            oracle, scope, sampler, args.radius, m_max, batch, centred, antithetic, support
        ):
            print(f"{name:<22} {m:>6} {sec:>9.2f} {cos:>11.4f} {frac:>7.3f}")


if __name__ == "__main__":
    main()
