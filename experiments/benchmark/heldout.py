"""Step 4 of the benchmark: held-out evaluation of trained run dirs (``heldout_metrics.json``).

For each run dir with a ``checkpoint/`` (or the starting model with ``--base``):

* greedy answers (at most ``--max-new-tokens`` tokens, batched, left padding) to the first
  ``--prompts`` held-out prompts of ``responses.jsonl``, scored with the hidden utility U;
* ``heldout.win_rate``: fraction of prompts where U(answer) > U(starting model's greedy answer)
  (ties, |difference| <= 1e-4, one half); ``heldout.lc_win_rate``: the same at zero length
  difference (:func:`compo.evaluate.length_controlled_win_rate`, lengths in words);
  ``heldout.mean_words`` (verbosity) next to ``heldout.base_mean_words``; mean utilities;
* ``heldout.accuracy`` / ``heldout.accuracy_per_token``: preference accuracy on the noise-free
  held-out pairs (``heldout_pairs.jsonl``, labelled by U), summed / per-token log-probs, and
  ``heldout.margin_mean``, the mean summed-log-prob margin (``--refresh-pairs`` recomputes these
  for dirs evaluated before, without generating);
* ``ambiguous.*``: likelihood displacement on the run's training pairs that the paper's rule calls
  ambiguous under the starting model (|log pi_ref(y+) - log pi_ref(y-)| < ``--delta``), measured
  the same way for every arm (also for DPO on all pairs, whose run has no split): mean
  log pi(y+) and log pi(y-) before and after, and ``compo.evaluate.likelihood_displacement``.

The metrics go to ``<run dir>/heldout_metrics.json`` (next to ``metrics.json``), the answers to
``<run dir>/heldout_generations.jsonl``. Commands (repository root)::

    OMP_NUM_THREADS=1 python experiments/benchmark/heldout.py multirun/2025-01-01/12-00-00
    OMP_NUM_THREADS=1 python experiments/benchmark/heldout.py --base --out experiments/results/base
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from compo.data import load_pairs
from compo.encoding import encode_pairs
from compo.evaluate import (
    length_controlled_win_rate,
    preference_metrics,
    win_rate,
)
from compo.rundir import atomic_write_json, write_jsonl
from compo.scoring import score_pairs
from experiments.benchmark.simulate import DATA, read_jsonl
from experiments.benchmark.utility import HiddenUtility, words
from experiments.generation import generate

log = logging.getLogger("benchmark.heldout")
# Utilities closer than this are a tie: the encoder's batch padding moves identical answers' scores
# by ~1e-6, which must not decide a comparison.
TIE_EPS = 1e-4


def run_dirs(paths: list[Path]) -> list[Path]:
    """Every dir with a ``checkpoint/`` at or directly below the given paths."""
    out = []
    for path in paths:
        if (path / "checkpoint").is_dir():
            out.append(path)
        else:
            found = sorted(p.parent for p in path.glob("*/checkpoint") if p.is_dir())
            if not found:
                log.warning("%s: no checkpoint/ here or one level below: skipped", path)
            out += found
    return out


def evaluate(model, tokenizer, rows, pairs_path, utility, max_new_tokens, batch_rows, max_pairs):
    """The held-out metrics of one model and its answers."""
    prompts = [r["prompt"] for r in rows]
    answers = [a[0][0] for a in generate(model, tokenizer, prompts, 1, max_new_tokens, False, 0)]
    u = utility(prompts, answers)
    base_u = [r["greedy_utility"] for r in rows]
    n_words = [len(words(a)) for a in answers]
    base_words = [len(words(r["greedy"])) for r in rows]
    metrics = {
        "heldout.n_prompts": len(rows),
        "heldout.win_rate": win_rate(u, base_u, TIE_EPS),
        "heldout.lc_win_rate": length_controlled_win_rate(
            u, base_u, n_words, base_words, tie_eps=TIE_EPS
        ),
        "heldout.mean_words": sum(n_words) / len(n_words),
        "heldout.base_mean_words": sum(base_words) / len(base_words),
        "heldout.mean_utility": sum(u) / len(u),
        "heldout.base_mean_utility": sum(base_u) / len(base_u),
    } | pair_metrics(model, tokenizer, pairs_path, max_pairs, batch_rows)
    generations = [
        {"prompt_id": r["prompt_id"], "answer": a, "utility": x, "base_utility": b}
        for r, a, x, b in zip(rows, answers, u, base_u, strict=True)
    ]
    return metrics, generations


def pair_metrics(model, tokenizer, pairs_path, max_pairs, batch_rows) -> dict[str, float]:
    """Preference accuracy and mean margin log pi(y+) - log pi(y-) on the noise-free held-out pairs.

    The margin is the continuous version of the accuracy: it moves before any pair flips.
    """
    pairs = load_pairs(pairs_path, limit=max_pairs).pairs
    encoded, _ = encode_pairs(pairs, tokenizer)
    pref = preference_metrics(
        *score_pairs(model, encoded, tokenizer.pad_token_id, batch_size=batch_rows)
    )
    keys = ("n_pairs", "accuracy", "accuracy_per_token", "margin_mean")
    return {f"heldout.{k}": pref[k] for k in keys}


_BASE_SCORES: dict[tuple, tuple] = {}


def ambiguous_displacement(model, tokenizer, run_dir: Path, delta: float, batch_rows: int):
    """Displacement on the run's ambiguous training pairs (margin under the starting model)."""
    from omegaconf import OmegaConf

    from compo.evaluate import likelihood_displacement
    from compo.models import EmbeddedSmolLM2

    cfg = OmegaConf.load(run_dir / "config.yaml").data
    key = (cfg.path, cfg.limit, cfg.max_length, cfg.max_prompt_length)
    if key not in _BASE_SCORES:
        pairs = load_pairs(cfg.path, limit=cfg.limit).pairs
        encoded, _ = encode_pairs(pairs, tokenizer, cfg.max_length, cfg.max_prompt_length)
        base, _ = EmbeddedSmolLM2().load()
        chosen, rejected = score_pairs(base, encoded, tokenizer.pad_token_id, batch_size=batch_rows)
        margin = chosen.sum_logps - rejected.sum_logps
        rows = [i for i in range(len(encoded)) if abs(margin[i].item()) < delta]
        _BASE_SCORES[key] = ([encoded[i] for i in rows], _subset((chosen, rejected), rows))
    encoded, before = _BASE_SCORES[key]
    if not encoded:
        return {"ambiguous.n_pairs": 0}
    after = score_pairs(model, encoded, tokenizer.pad_token_id, batch_size=batch_rows)
    shift = likelihood_displacement(before, after)
    out = {"ambiguous.n_pairs": len(encoded)}
    for name, scores in (("before", before), ("after", after)):
        out[f"ambiguous.{name}.logp_chosen"] = scores[0].sum_logps.mean().item()
        out[f"ambiguous.{name}.logp_rejected"] = scores[1].sum_logps.mean().item()
    return out | {f"ambiguous.{k}": v for k, v in shift.items()}


def _subset(scores, rows):
    import torch

    from compo.scoring import SequenceScores

    index = torch.tensor(rows, dtype=torch.long)
    return tuple(
        SequenceScores(s.sum_logps[index], s.mean_logps[index], s.n_tokens[index]) for s in scores
    )


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("paths", type=Path, nargs="*", help="run dirs or multirun dirs")
    p.add_argument("--base", action="store_true", help="evaluate the starting model instead")
    p.add_argument("--out", type=Path, default=None, help="with --base: where to write")
    p.add_argument("--responses", type=Path, default=DATA / "responses.jsonl")
    p.add_argument("--pairs", type=Path, default=DATA / "heldout_pairs.jsonl")
    p.add_argument("--prompts", type=int, default=24, help="first N held-out prompts")
    p.add_argument("--max-pairs", type=int, default=64, help="first N held-out pairs")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--batch-rows", type=int, default=16)
    p.add_argument("--delta", type=float, default=3.0, help="ambiguity radius (paper: 3)")
    p.add_argument("--reverse", action="store_true", help="last run dir first (a 2nd worker)")
    p.add_argument("--force", action="store_true", help="recompute existing heldout_metrics.json")
    p.add_argument(
        "--refresh-pairs",
        action="store_true",
        help="only recompute the held-out pair metrics of evaluated dirs (no generation)",
    )
    args = p.parse_args(argv)
    from compo.models import EmbeddedSmolLM2, PretrainedModel

    rows = [r for r in read_jsonl(args.responses) if r["split"] == "heldout"][: args.prompts]
    utility = HiddenUtility()
    targets = [(args.out or Path("experiments/results/base"), None)] if args.base else []
    found = run_dirs(args.paths)
    targets += [(d, d / "checkpoint") for d in (found[::-1] if args.reverse else found)]
    for out_dir, checkpoint in targets:
        done = out_dir / "heldout_metrics.json"
        if done.exists() and not (args.force or args.refresh_pairs):
            log.info("%s: already evaluated", out_dir)
            continue
        loader = EmbeddedSmolLM2() if checkpoint is None else PretrainedModel(str(checkpoint))
        model, tokenizer = loader.load()
        if args.refresh_pairs and done.exists() and not args.force:
            metrics = json.loads(done.read_text(encoding="utf-8"))
            metrics |= pair_metrics(model, tokenizer, args.pairs, args.max_pairs, args.batch_rows)
            atomic_write_json(done, metrics)
            log.info("%s: pair metrics refreshed", out_dir)
            continue
        metrics, generations = evaluate(
            model,
            tokenizer,
            rows,
            args.pairs,
            utility,
            args.max_new_tokens,
            args.batch_rows,
            args.max_pairs,
        )
        if checkpoint is not None:
            metrics |= ambiguous_displacement(
                model, tokenizer, out_dir, args.delta, args.batch_rows
            )
        atomic_write_json(out_dir / "heldout_metrics.json", metrics)
        write_jsonl(out_dir / "heldout_generations.jsonl", generations)
        log.info("%s: %s", out_dir, json.dumps({k: round(v, 4) for k, v in metrics.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
