"""Step 2 of the benchmark: simulated users click on the responses; clicks become pairs.

Ground truth is the hidden utility U stored with every response by ``generate.py``. For each
training prompt, ``--users`` simulated users each see the K responses in a random order (one
impression per user) and behave as a position-biased, noisy clicker:

1. examination: the response at display position k (0 = top) is looked at with probability
   p_k = (1 / (k + 1)) ** eta, independently per position (eta = ``--eta``, default 1);
2. choice among the examined responses, by the noise model (``--noise``):

   * ``uniform`` (``--eps``): with probability 1 - epsilon the examined response of highest U, with
     probability epsilon a uniformly random one. A wrong click is as likely on a pair whose
     responses differ by 0.01 in U as on one differing by 0.5: no splitter can isolate it.
   * ``bt`` (``--temperature`` T): Bradley-Terry / Plackett-Luce first choice, P(click i) =
     exp(U_i / T) / sum over examined j of exp(U_j / T). Between two responses the better one is
     picked with probability sigmoid(gap / T): near 1/2 for close responses, near 1 for distant
     ones (T = 0.1: gap 0.02 -> 0.55, 0.1 -> 0.73, 0.4 -> 0.98). This is how annotators and
     clickers err in the literature the method rests on: mostly where the responses are close.
   * ``position`` (``--eps`` lambda, ``--temperature`` T): a mixture; with probability lambda the
     user clicks the top-most examined response whatever its U (position bias in the choice, on
     top of the examination bias), otherwise the ``bt`` choice.
3. no examined response: no click.

The impressions go through ``compo.clicks.clicks_to_pairs`` (Joachims' clicked > skipped-above
rule, optional ``--correction ipw``, Beta-posterior confidence). Every pair is checked against U:
``true_margin`` = U(chosen) - U(rejected) and ``label_correct`` (margin > 0) are added to the row,
so the measured label-noise rate of the pairs (which mixes user noise and position bias) is known,
overall and by utility-gap bin (``label_noise_by_gap``, printed and written beside the pairs file
as ``<pairs>.stats.json``).

Held-out pairs: every two responses of each held-out prompt, oriented by U (pairs with
|U difference| < ``--min-gap`` are left out as unlabelled), with confidence 1.

All randomness comes from ``random.Random`` seeded with (seed, prompt index); the same inputs and
arguments give byte-identical files. Commands (repository root, seconds)::

    # the committed files pairs_eps{0.1,0.3}_seed{0,1,2}.jsonl (one click-noise draw per seed)
    for s in 0 1 2; do for e in 0.1 0.3; do
      python experiments/benchmark/simulate.py --eps $e --seed $s
    done; done
    # gap-dependent noise: pairs_bt0.1_seed{0..4}.jsonl and pairs_pos0.2-bt0.1_seed{0..4}.jsonl
    for s in 0 1 2 3 4; do
      python experiments/benchmark/simulate.py --noise bt --temperature 0.1 --seed $s
      python experiments/benchmark/simulate.py --noise position --eps 0.2 --seed $s
    done
    # the click log itself, then the same pairs through the compo-clicks command
    python experiments/benchmark/simulate.py --eps 0.1 --impressions /tmp/i.jsonl --out /tmp/a.jsonl
    compo-clicks /tmp/i.jsonl --out /tmp/b.jsonl   # the pairs of /tmp/a.jsonl without ground truth
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from compo.clicks import clicks_to_pairs, examination_propensities
from compo.rundir import atomic_write_json, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "experiments" / "benchmark" / "data"


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file."""
    return [
        json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line
    ]


NOISE_MODELS = ("uniform", "bt", "position")
# Bins of |U(chosen) - U(rejected)| for the label-noise report (the last bin is open).
GAP_BINS = (0.0, 0.05, 0.1, 0.2, 0.4)


@dataclass(frozen=True)
class NoiseModel:
    """How a user chooses among the responses they examined (see the module docstring).

    Attributes:
        kind: ``uniform``, ``bt`` or ``position``.
        eps: ``uniform``: the probability of a uniformly random click; ``position``: the
            probability lambda of clicking the top-most examined response. Unused by ``bt``.
        temperature: The Bradley-Terry temperature T of ``bt`` and ``position``.
    """

    kind: str = "uniform"
    eps: float = 0.1
    temperature: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in NOISE_MODELS:
            raise ValueError(f"noise must be one of {', '.join(NOISE_MODELS)}, got {self.kind!r}")
        if not 0.0 <= self.eps <= 1.0:
            raise ValueError(f"eps must be in [0, 1], got {self.eps}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")

    @property
    def tag(self) -> str:
        """The file-name tag: ``eps0.1``, ``bt0.1``, ``pos0.2-bt0.1``."""
        if self.kind == "uniform":
            return f"eps{self.eps}"
        bt = f"bt{self.temperature}"
        return bt if self.kind == "bt" else f"pos{self.eps}-{bt}"

    @classmethod
    def from_tag(cls, tag: str) -> NoiseModel:
        """The model a file-name tag names (the inverse of :attr:`tag`)."""
        match = re.fullmatch(r"eps([0-9.]+)|bt([0-9.]+)|pos([0-9.]+)-bt([0-9.]+)", tag)
        if match is None:
            raise ValueError(f"not a noise tag (eps0.1, bt0.1, pos0.2-bt0.1): {tag!r}")
        eps, bt, pos, pos_bt = match.groups()
        if eps is not None:
            return cls("uniform", eps=float(eps))
        if bt is not None:
            return cls("bt", temperature=float(bt))
        return cls("position", eps=float(pos), temperature=float(pos_bt))

    def choose(self, utilities: Sequence[float], rng: random.Random) -> int:
        """Index (into ``utilities``, top-most first) of the examined response clicked."""
        if self.kind == "uniform":
            # The draw order of the first benchmark: its committed files stay byte-identical.
            if rng.random() < self.eps:
                return rng.randrange(len(utilities))
            return max(range(len(utilities)), key=lambda i: utilities[i])
        if self.kind == "position" and rng.random() < self.eps:
            return 0
        top = max(utilities)  # shifted for a stable softmax
        weights = [math.exp((u - top) / self.temperature) for u in utilities]
        draw, total = rng.random() * sum(weights), 0.0
        for i, w in enumerate(weights):
            total += w
            if draw < total:
                return i
        return len(weights) - 1  # draw == sum(weights) up to rounding


def simulate_user(
    utility: Sequence[float],
    order: Sequence[int],
    noise: NoiseModel,
    eta: float,
    rng: random.Random,
) -> list[int]:
    """One impression's clicks (display positions) of a position-biased, noisy user.

    Args:
        utility: U of each response (by response index).
        order: ``order[k]`` is the response index shown at position k.
        noise: How the user chooses among the examined responses.
        eta: Position-bias exponent of the examination propensities.
        rng: The caller's generator.
    """
    prop = examination_propensities(len(order), eta)
    examined = [k for k in range(len(order)) if rng.random() < prop[k]]
    if not examined:
        return []
    return [examined[noise.choose([utility[order[k]] for k in examined], rng)]]


def impressions(
    prompts: list[dict], users: int, noise: NoiseModel, eta: float, seed: int
) -> list[dict]:
    """Impressions of ``users`` simulated users per prompt (training prompts only)."""
    out = []
    for index, p in enumerate(prompts):
        rng = random.Random(f"{seed}-{index}")
        n = len(p["responses"])
        for user in range(users):
            order = list(range(n))
            rng.shuffle(order)
            clicks = simulate_user(p["utility"], order, noise, eta, rng)
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


def noise_by_gap(pairs: list[dict]) -> dict[str, dict[str, float]]:
    """Label-noise rate of ``pairs`` per bin of their true utility gap |U(y+) - U(y-)|."""
    edges = [*GAP_BINS, math.inf]
    out = {}
    for lo, hi in itertools.pairwise(edges):
        inside = [p for p in pairs if lo <= abs(p["true_margin"]) < hi]
        wrong = sum(not p["label_correct"] for p in inside)
        name = f"[{lo}, {hi})" if hi != math.inf else f"[{lo}, inf)"
        out[name] = {"n": len(inside), "label_noise": round(wrong / max(1, len(inside)), 4)}
    return out


def build(rows: list[dict], users: int, noise: NoiseModel, eta: float, seed: int, correction: str):
    """(impressions, annotated training pairs, stats) for the training prompts of ``rows``."""
    train = [p for p in rows if p["split"] == "train"]
    shown = impressions(train, users, noise, eta, seed)
    result = clicks_to_pairs(
        enumerate(shown, start=1), f"bench-{noise.tag}.jsonl", correction=correction
    )
    pairs = annotate(result.rows, train)
    wrong = sum(not p["label_correct"] for p in pairs)
    stats = dict(
        result.stats,
        label_noise=round(wrong / max(1, len(pairs)), 4),
        label_noise_by_gap=noise_by_gap(pairs),
    )
    return shown, pairs, stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--responses", type=Path, default=DATA / "responses.jsonl")
    p.add_argument("--out-dir", type=Path, default=DATA)
    p.add_argument(
        "--noise", choices=NOISE_MODELS, default="uniform", help="the users' choice model"
    )
    p.add_argument(
        "--eps", type=float, default=0.1, help="uniform: noise rate; position: top-click share"
    )
    p.add_argument("--temperature", type=float, default=0.1, help="bt/position: temperature T")
    p.add_argument("--tag", default=None, help="the model by its file tag: eps0.1, bt0.1, ...")
    p.add_argument("--eta", type=float, default=1.0, help="position-bias exponent")
    p.add_argument("--users", type=int, default=8, help="impressions per training prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--correction", choices=("none", "ipw"), default="none")
    p.add_argument("--out", type=Path, default=None, help="pairs file (default: out-dir/...)")
    p.add_argument("--impressions", type=Path, default=None, help="also write the click log here")
    args = p.parse_args(argv)
    rows = read_jsonl(args.responses)
    try:
        noise = (
            NoiseModel.from_tag(args.tag)
            if args.tag
            else NoiseModel(args.noise, args.eps, args.temperature)
        )
    except ValueError as err:
        p.error(str(err))
    shown, pairs, stats = build(rows, args.users, noise, args.eta, args.seed, args.correction)
    out = args.out or args.out_dir / f"pairs_{noise.tag}_seed{args.seed}.jsonl"
    if args.impressions:  # ~0.8 MB per noise rate: written on request, not committed
        write_jsonl(args.impressions, shown)
    write_jsonl(out, pairs)
    write_jsonl(
        args.out_dir / "heldout_pairs.jsonl",
        heldout_pairs([r for r in rows if r["split"] == "heldout"]),
    )
    report = {"noise": noise.tag, "seed": args.seed, **stats}
    atomic_write_json(out.with_name(out.name + ".stats.json"), report)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
