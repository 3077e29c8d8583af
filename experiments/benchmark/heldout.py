"""Step 4 of the benchmark: held-out evaluation of trained run dirs (``heldout_metrics.json``).

For each run dir with a ``checkpoint/`` (or the starting model with ``--base``):

* answers to the ``--prompts`` held-out prompts of ``responses.jsonl`` (all 40 by default): the
  greedy answer and ``--samples`` sampled ones (temperature 0.8, top-p 0.95, at most
  ``--max-new-tokens`` tokens), each scored with the hidden utility U. Sampling is seeded per
  batch from ``--seed`` (``experiments/generation.py``), so a run and the starting model draw
  their k-th sample of a prompt from the same random stream: the comparison is paired;
* every answer is compared with the starting model's answer of the same prompt and index (greedy
  with greedy, sample k with sample k; ``--base`` writes them first, and a run evaluated under other
  settings than the base's is refused): ``heldout.win_rate`` (greedy), ``heldout.sample_win_rate``
  and ``heldout.win_rate_all`` (every answer), ties (|U difference| <= 1e-4) one half;
  ``heldout.length_adjusted_win_rate``: the win rate over every answer at zero length difference
  (:func:`compo.evaluate.length_controlled_win_rate`, lengths in words). It removes the length
  effect of this model's answers only; it is not AlpacaEval's length-controlled win rate, whose
  regression also has an instruction-difficulty term fitted over many models;
  ``heldout.mean_utility`` / ``heldout.delta_utility`` (mean U and mean paired difference to the
  starting model over every answer), ``heldout.mean_words`` (verbosity);
* the per-prompt answers, utilities and lengths go to ``heldout_generations.jsonl``: the
  aggregator's bootstrap intervals resample prompts (and seeds) from them;
* ``heldout.accuracy`` / ``heldout.accuracy_per_token``: preference accuracy on the noise-free
  held-out pairs (``heldout_pairs.jsonl``, labelled by U; all of them by default), summed /
  per-token log-probs, and ``heldout.margin_mean``, the mean summed-log-prob margin
  (``--refresh pairs`` recomputes these for dirs evaluated before, without generating);
* ``ambiguous.*``: likelihood displacement on the run's training pairs that the paper's rule calls
  ambiguous under the starting model (|log pi_ref(y+) - log pi_ref(y-)| < ``--delta``), measured
  the same way for every arm (also for DPO on all pairs, whose run has no split): mean
  log pi(y+) and log pi(y-) before and after, ``compo.evaluate.likelihood_displacement``
  (``ambiguous.frac_up_down``: log pi(y+) rose and log pi(y-) fell), and, since the simulation
  knows the truly better reply, ``ambiguous.label_noise`` and
  ``ambiguous.frac_better_up_worse_down`` (the better reply rose and the worse fell: the label's
  direction where the label is right, the opposite where it is wrong); ``--refresh ambiguous``
  recomputes these.

The metrics go to ``<run dir>/heldout_metrics.json`` (next to ``metrics.json``). Commands
(repository root)::

    OMP_NUM_THREADS=1 python experiments/benchmark/heldout.py --base --out experiments/results/base
    OMP_NUM_THREADS=1 python experiments/benchmark/heldout.py multirun/2025-01-01/12-00-00
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from compo.data import load_pairs
from compo.encoding import encode_pairs
from compo.evaluate import (
    length_controlled_win_rate,
    preference_metrics,
    win_rate,
)
from compo.reference import cached_scores
from compo.rundir import atomic_write_json, write_jsonl
from compo.scoring import score_pairs
from experiments.benchmark.simulate import DATA, read_jsonl
from experiments.benchmark.utility import HiddenUtility, hashed_encoder, words
from experiments.generation import generate

log = logging.getLogger("benchmark.heldout")
RESULTS = Path(__file__).resolve().parents[2] / "experiments" / "results"
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


def answer_rows(model, tokenizer, rows, utility, settings: dict, batch_rows: int) -> list[dict]:
    """Per prompt: the greedy answer then ``settings['samples']`` sampled ones, scored by U."""
    prompts = [r["prompt"] for r in rows]
    new_tokens = settings["max_new_tokens"]
    greedy = generate(model, tokenizer, prompts, 1, new_tokens, False, 0, batch_rows)
    sampled = [[] for _ in prompts]
    if settings["samples"]:
        sampled = generate(
            model,
            tokenizer,
            prompts,
            settings["samples"],
            new_tokens,
            True,
            settings["seed"],
            batch_rows,
        )
    out = []
    for row, first, rest in zip(rows, greedy, sampled, strict=True):
        answers = [text for text, _ in first + rest]
        out.append(
            {
                "prompt_id": row["prompt_id"],
                "answers": answers,
                "finished": [done for _, done in first + rest],
                "utility": utility([row["prompt"]] * len(answers), answers),
                "words": [len(words(a)) for a in answers],
            }
        )
    return out


def compare(answers: list[dict], base: list[dict]) -> dict[str, float]:
    """Paired comparison of a model's answers with the starting model's (same prompt and index)."""
    if [a["prompt_id"] for a in answers] != [b["prompt_id"] for b in base]:
        raise SystemExit("the base generations hold other prompts: rerun heldout.py --base")

    def flat(rows, key, first_only=False):
        return [x for r in rows for x in (r[key][:1] if first_only else r[key])]

    u, bu = flat(answers, "utility"), flat(base, "utility")
    n, bn = flat(answers, "words"), flat(base, "words")
    greedy, base_greedy = flat(answers, "utility", True), flat(base, "utility", True)
    sampled = [x for r in answers for x in r["utility"][1:]]
    base_sampled = [x for r in base for x in r["utility"][1:]]
    return {
        "heldout.n_prompts": len(answers),
        "heldout.n_answers": len(u),
        "heldout.win_rate": win_rate(greedy, base_greedy, TIE_EPS),
        "heldout.sample_win_rate": (
            win_rate(sampled, base_sampled, TIE_EPS) if sampled else float("nan")
        ),
        "heldout.win_rate_all": win_rate(u, bu, TIE_EPS),
        "heldout.length_adjusted_win_rate": length_controlled_win_rate(
            u, bu, n, bn, tie_eps=TIE_EPS
        ),
        "heldout.mean_utility": sum(u) / len(u),
        "heldout.base_mean_utility": sum(bu) / len(bu),
        "heldout.delta_utility": (sum(u) - sum(bu)) / len(u),
        "heldout.mean_words": sum(n) / len(n),
        "heldout.base_mean_words": sum(bn) / len(bn),
    }


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


def ambiguous_displacement(
    model, tokenizer, run_dir: Path, delta, batch_rows, starting, cache_dir=None
):
    """Displacement on the run's ambiguous training pairs (margin under the starting model).

    The starting model's scores of the run's pairs go through ``cache_dir`` (``reference_cache``):
    every arm on one pairs file needs the same numbers, and the pass costs minutes.
    """
    from omegaconf import OmegaConf

    from compo.evaluate import likelihood_displacement

    cfg = OmegaConf.load(run_dir / "config.yaml").data
    key = (cfg.path, cfg.limit, cfg.max_length, cfg.max_prompt_length)
    if key not in _BASE_SCORES:
        pairs = load_pairs(cfg.path, limit=cfg.limit).pairs
        encoded, _ = encode_pairs(pairs, tokenizer, cfg.max_length, cfg.max_prompt_length)
        base, _ = starting.load()
        chosen, rejected = cached_scores(
            base, encoded, tokenizer.pad_token_id, batch_rows, cache_dir, desc=None
        )
        margin = chosen.sum_logps - rejected.sum_logps
        rows = [i for i in range(len(encoded)) if abs(margin[i].item()) < delta]
        correct = [pairs[i].metadata.get("label_correct") for i in rows]
        _BASE_SCORES[key] = (
            [encoded[i] for i in rows],
            (chosen.take(rows), rejected.take(rows)),
            None if None in correct else torch.tensor(correct, dtype=torch.bool),
        )
    encoded, before, correct = _BASE_SCORES[key]
    if not encoded:
        return {"ambiguous.n_pairs": 0}
    after = score_pairs(model, encoded, tokenizer.pad_token_id, batch_size=batch_rows)
    shift = likelihood_displacement(before, after)  # frac_up_down: the goal, y+ up and y- down
    out = {"ambiguous.n_pairs": len(encoded)}
    if correct is not None:
        # The simulation knows which reply is truly better (label_correct): where the click label
        # is wrong, "y+ up and y- down" is the wrong way. Under Bradley-Terry noise 15-30% of the
        # ambiguous labels are wrong, so the label-oriented goal and the true one differ.
        up = after[0].sum_logps > before[0].sum_logps
        down = after[1].sum_logps < before[1].sum_logps
        up_down_truth = torch.where(correct, up & down, ~up & ~down)
        out["ambiguous.label_noise"] = (~correct).float().mean().item()
        out["ambiguous.frac_better_up_worse_down"] = up_down_truth.float().mean().item()
    for name, scores in (("before", before), ("after", after)):
        out[f"ambiguous.{name}.logp_chosen"] = scores[0].sum_logps.mean().item()
        out[f"ambiguous.{name}.logp_rejected"] = scores[1].sum_logps.mean().item()
    return out | {f"ambiguous.{k}": v for k, v in shift.items()}


def read_base(out_dir: Path, settings: dict) -> list[dict]:
    """The starting model's answers, written by ``--base`` under the same settings."""
    metrics, rows = out_dir / "heldout_metrics.json", out_dir / "heldout_generations.jsonl"
    if not (metrics.is_file() and rows.is_file()):
        raise SystemExit(f"{out_dir}: no base generations; run heldout.py --base --out {out_dir}")
    made = json.loads(metrics.read_text(encoding="utf-8")).get("heldout.settings")
    if made != settings:
        raise SystemExit(
            f"{out_dir}: base generations made with {made}, this evaluation uses {settings}: "
            "rerun heldout.py --base with these settings (or pass the same ones)"
        )
    return read_jsonl(rows)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("paths", type=Path, nargs="*", help="run dirs or multirun dirs")
    p.add_argument("--base", action="store_true", help="evaluate the starting model first")
    p.add_argument(
        "--base-dir", "--out", type=Path, default=RESULTS / "base", help="the base's answers"
    )
    p.add_argument("--responses", type=Path, default=DATA / "responses.jsonl")
    p.add_argument("--pairs", type=Path, default=DATA / "heldout_pairs.jsonl")
    p.add_argument("--prompts", type=int, default=40, help="first N held-out prompts (all: 40)")
    p.add_argument("--samples", type=int, default=4, help="sampled answers per prompt (+ greedy)")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampled answers' streams")
    p.add_argument("--max-pairs", type=int, default=None, help="first N held-out pairs (all)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--batch-rows", type=int, default=16)
    p.add_argument("--delta", type=float, default=3.0, help="ambiguity radius (paper: 3)")
    p.add_argument("--reverse", action="store_true", help="last run dir first (a 2nd worker)")
    p.add_argument("--force", action="store_true", help="recompute existing heldout_metrics.json")
    p.add_argument("--tiny", action="store_true", help="the tiny test model as the base (smoke)")
    p.add_argument(
        "--reference-cache",
        default=None,
        help="reference_cache dir for the starting model's scores of the training pairs",
    )
    p.add_argument(
        "--refresh",
        choices=("pairs", "ambiguous"),
        nargs="+",
        default=[],
        help="only recompute these metrics of evaluated dirs (no generation): the held-out "
        "pairs', the ambiguous displacement",
    )
    args = p.parse_args(argv)
    from compo.models import EmbeddedSmolLM2, PretrainedModel, TinyModel

    rows = [r for r in read_jsonl(args.responses) if r["split"] == "heldout"][: args.prompts]
    settings = {
        "prompts": len(rows),
        "samples": args.samples,
        "seed": args.seed,
        "max_new_tokens": args.max_new_tokens,
        "batch_rows": args.batch_rows,  # sampled streams are per batch: part of the pairing
        "model": "tiny" if args.tiny else "smollm2",
    }
    utility = HiddenUtility(encoder=hashed_encoder) if args.tiny else HiddenUtility()
    starting = TinyModel() if args.tiny else EmbeddedSmolLM2()
    targets = [(args.base_dir, None)] if args.base else []
    found = run_dirs(args.paths)
    targets += [(d, d / "checkpoint") for d in (found[::-1] if args.reverse else found)]
    base = None
    for out_dir, checkpoint in targets:
        done = out_dir / "heldout_metrics.json"
        if done.exists() and not (args.force or args.refresh):
            log.info("%s: already evaluated", out_dir)
            continue
        model, tokenizer = (
            starting if checkpoint is None else PretrainedModel(str(checkpoint))
        ).load()
        if args.refresh and done.exists() and not args.force:
            metrics = json.loads(done.read_text(encoding="utf-8"))
            if "pairs" in args.refresh:
                metrics |= pair_metrics(
                    model, tokenizer, args.pairs, args.max_pairs, args.batch_rows
                )
            if "ambiguous" in args.refresh and checkpoint is not None:
                metrics |= ambiguous_displacement(
                    model, tokenizer, out_dir, args.delta, args.batch_rows, starting,
                    args.reference_cache,
                )  # fmt: skip
            atomic_write_json(done, metrics)
            log.info("%s: %s metrics refreshed", out_dir, " and ".join(args.refresh))
            continue
        answers = answer_rows(model, tokenizer, rows, utility, settings, args.batch_rows)
        if checkpoint is None:
            base = answers
        elif base is None:
            base = read_base(args.base_dir, settings)
        metrics = {"heldout.settings": settings} | compare(answers, base)
        metrics |= pair_metrics(model, tokenizer, args.pairs, args.max_pairs, args.batch_rows)
        if checkpoint is not None:
            metrics |= ambiguous_displacement(
                model, tokenizer, out_dir, args.delta, args.batch_rows, starting,
                args.reference_cache,
            )  # fmt: skip
        write_jsonl(out_dir / "heldout_generations.jsonl", answers)
        atomic_write_json(done, metrics)  # last: its presence means "evaluated"
        shown = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
        log.info("%s: %s", out_dir, json.dumps(shown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
