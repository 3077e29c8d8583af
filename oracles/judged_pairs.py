"""Judge-labelled pairs: a black-box judge labels each pair once; then the likelihood oracle learns.

Before the first iteration the judge compares y+ and y- of every pair ComPO will run on (an LLM
judge asks both orders and caches its verdicts; a scoring judge scores the two replies): a pair
the judge prefers the other way round is re-oriented, a pair it cannot decide (tie, abstention)
is dropped and counted. ComPO then runs the exact likelihood oracle (Definition 3.1) on the judged
labels. At most two judge calls per pair for the whole run, whatever m and the number of
iterations; the noisy labels of clicks or annotators are replaced by the judge's. Each pair's
outcome (kept, flipped, dropped, with the judge's reason) is written to ``judged_pairs.jsonl``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from compo.interfaces import Verdict
from oracles.generative import judge_prompt
from oracles.likelihood import LikelihoodOracle

log = logging.getLogger(__name__)


class JudgedPairsOracle(LikelihoodOracle):
    """The likelihood oracle on pairs whose orientation a judge decided.

    Args:
        judge: Any output judge (``judge_batch(prompt, y+, y-)``).
        aggregation: ``any``, ``majority`` or ``all`` over the pairs of one query.
    """

    kind = "parameter"

    def __init__(self, judge: Any, aggregation: str = "any") -> None:
        super().__init__(aggregation)
        self.judge = judge
        self.tokenizer = None
        self.run_dir = None
        self.counts = {"pairs_judged": 0, "pairs_kept": 0, "pairs_flipped": 0, "pairs_dropped": 0}
        self._judge_seconds = 0.0

    def bind(self, tokenizer: Any, run_dir: Any = None) -> None:
        """Gives the tokenizer (to decode the replies) and the RunDir for ``judged_pairs.jsonl``."""
        self.tokenizer, self.run_dir = tokenizer, run_dir

    def check(self) -> None:
        """Validates the judge before any expensive work."""
        self.judge.check()

    def prepare(self, pairs: list[Any]) -> list[Any]:
        """The pairs oriented by the judge's verdicts; pairs it could not decide are dropped."""
        if self.tokenizer is None:
            raise RuntimeError("JudgedPairsOracle: call bind(tokenizer) before prepare()")

        def text(ids) -> str:
            return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

        asks = [
            (
                judge_prompt(self.tokenizer.decode(list(p.prompt_ids))),
                text(p.chosen_ids),
                text(p.rejected_ids),
            )
            for p in pairs
        ]
        started = time.perf_counter()
        judgements = self.judge.judge_batch(asks)
        self._judge_seconds += time.perf_counter() - started
        kept, labels = [], []
        for pair, judgement in zip(pairs, judgements, strict=True):
            # judge(prompt, current=y+, perturbed=y-): "perturbed better" means y- is better.
            if judgement.verdict == Verdict.TIE:
                outcome = "dropped"
            elif judgement.verdict == Verdict.PERTURBED_BETTER:
                outcome = "flipped"
                kept.append(
                    dataclasses.replace(
                        pair, chosen_ids=pair.rejected_ids, rejected_ids=pair.chosen_ids
                    )
                )
            else:
                outcome = "kept"
                kept.append(pair)
            self.counts[f"pairs_{outcome}"] += 1
            labels.append({"pair_id": pair.pair_id, "label": outcome, "reason": judgement.reason})
        self.counts["pairs_judged"] += len(pairs)
        if self.run_dir is not None:
            self.run_dir.write_rows("judged_pairs", labels)
        log.info(
            "judged pairs: %d kept, %d flipped, %d dropped (judge undecided)",
            self.counts["pairs_kept"],
            self.counts["pairs_flipped"],
            self.counts["pairs_dropped"],
        )
        return kept

    def usage(self) -> dict[str, Any]:
        """Counters for ``metrics.json``: the labelling, then the judge's under ``judge.``."""
        out: dict[str, Any] = dict(self.counts)
        out["judge_seconds"] = round(self._judge_seconds, 3)
        out.update({f"judge.{k}": v for k, v in self.judge.usage().items()})
        return out
