"""Splitter study: does a splitter's "ambiguous" side hold the wrong labels, per noise model?

For every pairs file (noise model x seed, written by ``simulate.py``; each row carries the ground
truth ``label_correct``) and every splitter, at the splitter's default setting:

* ``precision``: the share of wrong labels among the pairs it calls ambiguous, next to the base
  rate (the share of wrong labels among all pairs: a splitter that picks at random has precision =
  base rate);
* ``recall``: the share of all wrong labels that land on the ambiguous side;
* ``auroc``: the area under the ROC curve of the splitter's ambiguity score against
  label-wrongness (0.5 = no information; threshold-free, so splitters with different ambiguous
  shares compare fairly).

Splitters (their scores, larger = more ambiguous; the rule is the config default):

* ``margin_sum``: -|log pi_ref(y+|x) - log pi_ref(y-|x)|, ambiguous when |margin| < 3.0 (the
  ComPO paper's rule, ``splitter=likelihood_margin``);
* ``margin_token``: the same on per-token mean log-probs, ambiguous when |margin| < 0.1
  (``splitter.per_token=true splitter.delta=0.1``);
* ``ches``: length-normalised CHES (Razin et al. 2024), the most similar 25% ambiguous
  (``splitter=ches``);
* ``confidence``: -confidence from the click counts, ambiguous when confidence < 0.7
  (``splitter=confidence`` at its default);
* ``margin_signed`` (not a splitter of compo, shown for comparison): -margin, i.e. "the reference
  model prefers the rejected reply"; a detector of flipped labels rather than of close pairs;
* ``none``: every pair clean (precision undefined, recall 0).

The scores are the splitters' own: each unique (prompt, reply) sequence is scored once under the
starting model with :func:`compo.scoring.score_sequences` (log-probs and the hidden states CHES
pools), and ``tests/test_benchmark.py`` checks the result against ``compo.splitter``'s classes.
Intervals: 95% percentile bootstrap over prompts (a prompt's pairs resampled together, all seeds
of a noise model pooled; 2000 resamples, seeded). Command (repository root; ~5 min on 2 cores,
most of it scoring ~420 sequences once)::

    python experiments/benchmark/simulate.py ...   # the files, see simulate.py's docstring
    OMP_NUM_THREADS=2 python experiments/benchmark/splitter_study.py \\
        --noise eps0.1 eps0.3 bt0.1 pos0.2-bt0.1 --seeds 0 1 2 3 4
    # -> experiments/results/splitter_study.{md,json,png}
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from compo.data import load_pairs
from compo.encoding import encode_pairs
from compo.rundir import atomic_write_json
from compo.scoring import score_sequences
from compo.splitter import ConfidenceSplitter
from experiments.benchmark.simulate import DATA
from experiments.benchmark.stats import Interval, cluster_bootstrap

log = logging.getLogger("benchmark.splitter_study")
RESULTS = Path(__file__).resolve().parents[2] / "experiments" / "results"
SPLITTERS = ("margin_sum", "margin_token", "ches", "confidence", "margin_signed", "none")
# The config defaults of the splitters studied (configs/splitter/*.yaml).
DELTA_SUM, DELTA_TOKEN, CHES_FRACTION = 3.0, 0.1, 0.25
CONFIDENCE_THRESHOLD = ConfidenceSplitter().threshold  # the library's default, one source


class SequenceTable:
    """Scores of unique (prompt ids, reply ids) sequences under one model, computed once."""

    def __init__(self, model: torch.nn.Module, pad_token_id: int, batch_size: int = 8) -> None:
        self.model, self.pad_token_id, self.batch_size = model, pad_token_id, batch_size
        self.rows: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
        self.sum_logp = self.mean_logp = self.h_sum = self.h_mean = None

    def add(self, encoded: Sequence) -> None:
        """Registers every chosen and rejected sequence of ``encoded`` (scored by :meth:`score`)."""
        for pair in encoded:
            for reply in (pair.chosen_ids, pair.rejected_ids):
                self.rows.setdefault((tuple(pair.prompt_ids), tuple(reply)), len(self.rows))

    def score(self) -> None:
        """One pass over the unique sequences: log-probs and pooled hidden states."""
        keys = list(self.rows)
        scores = score_sequences(
            self.model,
            [list(k[0]) for k in keys],
            [list(k[1]) for k in keys],
            self.pad_token_id,
            batch_size=self.batch_size,
            return_hidden=True,
            desc="splitter_study/score",
        )
        index = scores.seq_index[:, None].expand_as(scores.hidden)
        total = torch.zeros(len(keys), scores.hidden.shape[1], dtype=scores.hidden.dtype)
        total.scatter_add_(0, index, scores.hidden)
        self.sum_logp, self.mean_logp = scores.sum_logps.float(), scores.mean_logps.float()
        self.h_sum, self.h_mean = total, total / scores.n_tokens[:, None].to(total.dtype)

    def pair_scores(self, encoded: Sequence, confidences: Sequence[float]) -> dict[str, np.ndarray]:
        """Every splitter's ambiguity score (larger = more ambiguous) for each pair."""
        pos = [self.rows[(tuple(p.prompt_ids), tuple(p.chosen_ids))] for p in encoded]
        neg = [self.rows[(tuple(p.prompt_ids), tuple(p.rejected_ids))] for p in encoded]
        margin = (self.sum_logp[pos] - self.sum_logp[neg]).numpy()
        margin_token = (self.mean_logp[pos] - self.mean_logp[neg]).numpy()
        h_pos, h_neg = self.h_mean[pos], self.h_mean[neg]
        ches = ((h_pos * h_neg).sum(-1) - (h_pos * h_pos).sum(-1)).float().numpy()
        return {
            "margin_sum": -np.abs(margin),
            "margin_token": -np.abs(margin_token),
            "ches": ches,
            "confidence": -np.asarray(confidences, dtype=np.float64),
            "margin_signed": -margin,
            "none": np.zeros(len(encoded)),
        }


def ambiguous_masks(scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The ambiguous side of each splitter at its config default (as ``compo.splitter`` rules)."""
    n = len(scores["none"])
    ches = np.zeros(n, dtype=bool)
    k = int(np.ceil(CHES_FRACTION * n))
    if k:  # the splitter's stable order: among equal scores the earlier pair is ambiguous
        ches[np.argsort(-scores["ches"], kind="stable")[:k]] = True
    return {
        "margin_sum": -scores["margin_sum"] < DELTA_SUM,
        "margin_token": -scores["margin_token"] < DELTA_TOKEN,
        "ches": ches,
        "confidence": -scores["confidence"] < CONFIDENCE_THRESHOLD,
        "margin_signed": scores["margin_signed"] > 0,  # the reference prefers the rejected reply
        "none": np.zeros(n, dtype=bool),
    }


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted one half); nan if one class only."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    # Average rank of each distinct value (1-based): ties share the mean of their ranks.
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2.0)[inverse]
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def side_metrics(mask: np.ndarray, wrong: np.ndarray) -> dict[str, float]:
    """Precision and recall of wrong labels on the ambiguous side ``mask``."""
    hits = int((mask & wrong).sum())
    return {
        "n_ambiguous": int(mask.sum()),
        "precision": hits / int(mask.sum()) if mask.any() else float("nan"),
        "recall": hits / int(wrong.sum()) if wrong.any() else float("nan"),
    }


def study(pooled: dict[str, np.ndarray], resamples: int, seed: int) -> dict[str, dict]:
    """Per splitter: point estimates and bootstrap intervals over the pooled pairs of a noise."""
    wrong, groups = pooled["wrong"], pooled["group"]
    out = {}
    for name in SPLITTERS:
        score, mask = pooled[f"score/{name}"], pooled[f"mask/{name}"]
        row = {**side_metrics(mask, wrong), "auroc": auroc(score, wrong)}
        for key, stat in (
            ("auroc", lambda r, s=score: auroc(s[r], wrong[r])),
            ("precision", lambda r, m=mask: side_metrics(m[r], wrong[r])["precision"]),
            ("recall", lambda r, m=mask: side_metrics(m[r], wrong[r])["recall"]),
        ):
            ci = cluster_bootstrap(groups, stat, resamples, seed)
            row[f"{key}_ci"] = (ci.low, ci.high)
        out[name] = row
    return out


def load_file(path: Path, tokenizer) -> tuple[list, list, np.ndarray, np.ndarray]:
    """(encoded pairs, confidences, wrong-label flags, prompt ids) of one simulated pairs file."""
    pairs = load_pairs(path).pairs
    missing = [p.id for p in pairs if "label_correct" not in p.metadata]
    if missing:
        raise SystemExit(f"{path}: pair {missing[0]} has no label_correct (not a simulate.py file)")
    encoded, _ = encode_pairs(pairs, tokenizer)
    wrong = np.array([not p.metadata["label_correct"] for p in pairs])
    prompts = np.array([str(p.metadata.get("prompt_id", p.prompt)) for p in pairs])
    return encoded, [p.confidence for p in pairs], wrong, prompts


def run(
    files: dict[str, list[Path]], model, tokenizer, resamples: int = 2000, seed: int = 0
) -> dict[str, dict]:
    """The study over ``{noise tag: [pairs files of its seeds]}``."""
    table = SequenceTable(model, tokenizer.pad_token_id)
    loaded = {tag: [(f, *load_file(f, tokenizer)) for f in paths] for tag, paths in files.items()}
    for items in loaded.values():
        for _, encoded, *_ in items:
            table.add(encoded)
    log.info("scoring %d unique sequences", len(table.rows))
    table.score()
    results = {}
    for tag, items in loaded.items():
        parts: dict[str, list[np.ndarray]] = {"wrong": [], "group": []}
        per_file = {}
        for path, encoded, confidences, wrong, prompts in items:
            scores = table.pair_scores(encoded, confidences)
            masks = ambiguous_masks(scores)
            per_file[path.name] = {
                "n_pairs": len(encoded),
                "label_noise": float(wrong.mean()),
                **{n: {**side_metrics(masks[n], wrong)} for n in SPLITTERS},
            }
            parts["wrong"].append(wrong)
            parts["group"].append(np.array([f"{path.name}/{p}" for p in prompts]))
            for name in SPLITTERS:
                parts.setdefault(f"score/{name}", []).append(scores[name])
                parts.setdefault(f"mask/{name}", []).append(masks[name])
        pooled = {k: np.concatenate(v) for k, v in parts.items()}
        results[tag] = {
            "n_files": len(items),
            "n_pairs": len(pooled["wrong"]),
            "label_noise": float(pooled["wrong"].mean()),
            "splitters": study(pooled, resamples, seed),
            "files": per_file,
        }
    return results


def fmt(value: float, ci: Sequence[float]) -> str:
    """``0.612 [0.571, 0.650]`` (``n/a`` for an undefined value)."""
    return Interval(value, *ci).format()


def markdown(results: dict[str, dict]) -> str:
    """The results table: one row per (noise model, splitter)."""
    lines = [
        "| noise | pairs (files) | label noise | splitter | ambiguous share | precision | recall "
        "| AUROC |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for tag, res in results.items():
        for name, row in res["splitters"].items():
            share = row["n_ambiguous"] / res["n_pairs"]
            lines.append(
                f"| {tag} | {res['n_pairs']} ({res['n_files']}) | {res['label_noise']:.3f} "
                f"| {name} | {share:.3f} | {fmt(row['precision'], row['precision_ci'])} "
                f"| {fmt(row['recall'], row['recall_ci'])} | {fmt(row['auroc'], row['auroc_ci'])} |"
            )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict], path: Path) -> None:
    """AUROC with its interval per splitter, one group of bars per noise model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in SPLITTERS if n != "none"]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(results)
    for i, (tag, res) in enumerate(results.items()):
        rows = [res["splitters"][n] for n in names]
        mid = np.array([r["auroc"] for r in rows])
        lo = mid - np.array([r["auroc_ci"][0] for r in rows])
        hi = np.array([r["auroc_ci"][1] for r in rows]) - mid
        x = np.arange(len(names)) + (i - (len(results) - 1) / 2) * width
        ax.bar(
            x, mid, width, yerr=[lo, hi], capsize=3, label=f"{tag} (noise {res['label_noise']:.2f})"
        )
    ax.axhline(0.5, color="grey", lw=1, ls="--")
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylabel("AUROC vs. wrong label")
    ax.set_title("Does the ambiguity score find the wrong labels? (95% bootstrap CI over prompts)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--noise", nargs="+", default=["eps0.1", "eps0.3", "bt0.1", "pos0.2-bt0.1"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument(
        "--data", type=Path, default=DATA, help="dir of pairs_<noise>_seed<s>.jsonl"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "splitter_study")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--tiny", action="store_true", help="the tiny test model (smoke run)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    files = {}
    for tag in args.noise:
        files[tag] = [args.data / f"pairs_{tag}_seed{s}.jsonl" for s in args.seeds]
        missing = [str(f) for f in files[tag] if not f.is_file()]
        if missing:
            parser.error(f"{missing[0]} does not exist: write it with simulate.py first")
    from compo.models import EmbeddedSmolLM2, TinyModel

    model, tokenizer = (TinyModel() if args.tiny else EmbeddedSmolLM2()).load()
    results = run(files, model, tokenizer, args.resamples)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out.with_suffix(".json"), results)
    args.out.with_suffix(".md").write_text(markdown(results), encoding="utf-8")
    plot(results, args.out.with_suffix(".png"))
    print(markdown(results))
    print(f"wrote {args.out}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
