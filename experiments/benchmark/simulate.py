"""Step 2 of the benchmark: simulated users click on the responses; clicks become pairs.

Ground truth is the hidden utility U stored with every response by ``generate.py``. For each
training prompt, ``--users`` simulated users each see the K responses in a random order (one
impression per user) and behave as a position-biased, noisy clicker:

1. examination: the response at display position k (0 = top) is looked at with probability
   p_k = (1 / (k + 1)) ** eta, independently per position (eta = ``--eta``, default 1);
2. choice: with probability 1 - epsilon the user clicks the examined response of highest U; with
   probability epsilon (``--eps``, the noise rate) a uniformly random examined response;
3. no examined response: no click.

The impressions go through ``compo.clicks.clicks_to_pairs`` (Joachims' clicked > skipped-above
rule, optional ``--correction ipw``, Beta-posterior confidence). Every pair is checked against U:
``true_margin`` = U(chosen) - U(rejected) and ``label_correct`` (margin > 0) are added to the row,
so the measured label-noise rate of the pairs (which mixes user noise and position bias) is known.

Held-out pairs: every two responses of each held-out prompt, oriented by U (pairs with
|U difference| < ``--min-gap`` are left out as unlabelled), with confidence 1.

All randomness comes from ``random.Random`` seeded with (seed, prompt index); the same inputs and
arguments give byte-identical files. Commands (repository root, seconds)::

    # the committed files pairs_eps{0.1,0.3}_seed{0,1,2}.jsonl (one click-noise draw per seed)
    for s in 0 1 2; do for e in 0.1 0.3; do
      python experiments/benchmark/simulate.py --eps $e --seed $s
    done; done
    # the click log itself, then the same pairs through the compo-clicks command
    python experiments/benchmark/simulate.py --eps 0.1 --impressions /tmp/i.jsonl --out /tmp/a.jsonl
    compo-clicks /tmp/i.jsonl --out /tmp/b.jsonl   # the pairs of /tmp/a.jsonl without ground truth
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from compo.clicks import clicks_to_pairs, examination_propensities
from compo.rundir import write_jsonl

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "experiments" / "benchmark" / "data"


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file."""
    return [
        json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line
    ]


def simulate_user(
    utility: Sequence[float], order: Sequence[int], eps: float, eta: float, rng: random.Random
) -> list[int]:
    """One impression's clicks (display positions) of a position-biased, noisy user.

    Args:
        utility: U of each response (by response index).
        order: ``order[k]`` is the response index shown at position k.
        eps: Probability of clicking a random examined response instead of the best.
        eta: Position-bias exponent of the examination propensities.
        rng: The caller's generator.
    """
    prop = examination_propensities(len(order), eta)
    examined = [k for k in range(len(order)) if rng.random() < prop[k]]
    if not examined:
        return []
    if rng.random() < eps:
        return [rng.choice(examined)]
    return [max(examined, key=lambda k: utility[order[k]])]


def impressions(prompts: list[dict], users: int, eps: float, eta: float, seed: int) -> list[dict]:
    """Impressions of ``users`` simulated users per prompt (training prompts only)."""
    out = []
    for index, p in enumerate(prompts):
        rng = random.Random(f"{seed}-{index}")
        n = len(p["responses"])
        for user in range(users):
            order = list(range(n))
            rng.shuffle(order)
            clicks = simulate_user(p["utility"], order, eps, eta, rng)
            out.append(
                {
                    "id": f"{p['prompt_id']}-u{user}",
                    "prompt": p["prompt"],
                    "responses": [p["responses"][i] for i in order],
                    "clicks": clicks,
                    "prompt_id": p["prompt_id"],
                }
            )
    return out


def annotate(pairs: list[dict], prompts: list[dict]) -> list[dict]:
    """Adds the ground truth (``true_margin``, ``label_correct``, ``prompt_id``) to each pair."""
    lookup = {}
    for p in prompts:
        for text, u in zip(p["responses"], p["utility"], strict=True):
            lookup[(p["prompt"], text.strip())] = (u, p["prompt_id"])
    for pair in pairs:
        u_c, pid = lookup[(pair["prompt"], pair["chosen"])]
        u_r, _ = lookup[(pair["prompt"], pair["rejected"])]
        pair["true_margin"] = round(u_c - u_r, 6)
        pair["label_correct"] = u_c > u_r
        pair["prompt_id"] = pid
    return pairs


def heldout_pairs(prompts: list[dict], min_gap: float = 0.02) -> list[dict]:
    """All response pairs of the held-out prompts, labelled by U."""
    out = []
    for p in prompts:
        items = list(zip(p["responses"], p["utility"], strict=True))
        for (a, ua), (b, ub) in itertools.combinations(items, 2):
            if abs(ua - ub) < min_gap or a.strip() == b.strip():
                continue
            (c, uc), (r, ur) = ((a, ua), (b, ub)) if ua > ub else ((b, ub), (a, ua))
            out.append(
                {
                    "id": f"heldout-{len(out) + 1:04d}",
                    "prompt": p["prompt"],
                    "chosen": c,
                    "rejected": r,
                    "confidence": 1.0,
                    "true_margin": round(uc - ur, 6),
                    "prompt_id": p["prompt_id"],
                }
            )
    return out


def build(rows: list[dict], users: int, eps: float, eta: float, seed: int, correction: str):
    """(impressions, annotated training pairs, stats) for the training prompts of ``rows``."""
    train = [p for p in rows if p["split"] == "train"]
    shown = impressions(train, users, eps, eta, seed)
    result = clicks_to_pairs(
        enumerate(shown, start=1), f"bench-eps{eps}.jsonl", correction=correction
    )
    pairs = annotate(result.rows, train)
    wrong = sum(not p["label_correct"] for p in pairs)
    stats = dict(result.stats, label_noise=round(wrong / max(1, len(pairs)), 4))
    return shown, pairs, stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--responses", type=Path, default=DATA / "responses.jsonl")
    p.add_argument("--out-dir", type=Path, default=DATA)
    p.add_argument("--eps", type=float, default=0.1, help="user noise rate epsilon")
    p.add_argument("--eta", type=float, default=1.0, help="position-bias exponent")
    p.add_argument("--users", type=int, default=8, help="impressions per training prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--correction", choices=("none", "ipw"), default="none")
    p.add_argument("--out", type=Path, default=None, help="pairs file (default: out-dir/...)")
    p.add_argument("--impressions", type=Path, default=None, help="also write the click log here")
    args = p.parse_args(argv)
    rows = read_jsonl(args.responses)
    shown, pairs, stats = build(rows, args.users, args.eps, args.eta, args.seed, args.correction)
    out = args.out or args.out_dir / f"pairs_eps{args.eps}_seed{args.seed}.jsonl"
    if args.impressions:  # ~0.8 MB per noise rate: written on request, not committed
        write_jsonl(args.impressions, shown)
    write_jsonl(out, pairs)
    write_jsonl(
        args.out_dir / "heldout_pairs.jsonl",
        heldout_pairs([r for r in rows if r["split"] == "heldout"]),
    )
    print(json.dumps({"eps": args.eps, **stats}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
