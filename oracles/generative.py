"""Turns an output-level judge into ComPO's comparison oracle by generating responses.

For a query (prompt, theta, theta + delta) one response is generated from each model, greedy by
default (or sampled with common random numbers: the same Gumbel noise at every step for both),
and the judge says which is better. Identical responses are a tie without asking the judge (small
perturbations often change nothing): they are counted as ``identical_ties``, carry no vote, and
``optimizer.radius=auto`` uses :meth:`GenerativeOracle.differ` to find a radius at which the
responses do change.

Query designs (each an option, one-bit comparisons with the current model stay the default):

* ``query: antithetic``: compare the responses of theta + delta and theta - delta (one judge
  call per prompt, both sides move, so twice the signal of a comparison with a fixed side);
* several prompts per query (``optimizer.batch_size``): a scoring judge's verdict comes from the
  summed scores (``aggregation: sum``, the default for judges with ``score``), a pairwise judge's
  from the majority of per-prompt verdicts;
* ``graded: true``: the vote is the score difference (scoring judges) or the verdict times the
  judge's confidence (pairwise judges that give one) instead of its sign.

Responses come from :class:`oracles.decoding.Decoder`: when ComPO perturbs the output layer only,
from the prompt's KV cache (computed once per iteration) with the perturbation applied in logit
space. With extra perturbed modules the delta is added to the master weights, the response
generated from scratch, and the saved weights copied back (bit-exact).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from typing import Any

import torch

from compo.interfaces import (
    AGGREGATIONS,
    ComparisonOracle,
    CompoError,
    Judgement,
    OracleError,
    Verdict,
    aggregate,
    finite_scores,
    local_generator,
    settings,
)
from oracles.decoding import Decoder, eos_ids

log = logging.getLogger(__name__)

_CHATML_TURN = re.compile(r"<\|im_start\|>(\w+)\n(.*?)(?:<\|im_end\|>|$)", re.S)
QUERIES = ("current", "antithetic")


def judge_prompt(text: str) -> str:
    """The prompt as a judge should read it: ChatML markup removed, earlier turns labelled."""
    turns = [(r, c.strip()) for r, c in _CHATML_TURN.findall(text) if c.strip()]
    if not turns:
        return text.strip()
    turns = [t for t in turns if t[0] != "system"] or turns
    if len(turns) == 1:
        return turns[0][1]
    return "\n\n".join(f"{role.capitalize()}: {content}" for role, content in turns)


class TextOracle(ComparisonOracle):
    """What the oracles that generate text for a judge share: settings, wiring, counters.

    Subclasses fill ``counts`` (with at least ``queries``, ``perturbed_better`` and
    ``current_better``) and time ``generation`` and ``judge`` in ``seconds``.

    Args:
        judge: An :class:`compo.interfaces.OutputJudge`.
        max_new_tokens: Longest generated response.
        temperature: Sampling temperature.
        seed: Seeds the sampling noise.
    """

    kind = "output"

    def __init__(self, judge: Any, max_new_tokens: int, temperature: float, seed: int) -> None:
        settings.number("oracle.max_new_tokens", max_new_tokens, integer=True, ge=1)
        settings.number("oracle.temperature", temperature, gt=0)
        settings.seed("oracle.seed", seed)
        self.judge, self.max_new_tokens = judge, max_new_tokens
        self.temperature, self.seed = temperature, seed
        self.tokenizer = None
        self._trace = None
        self.counts: dict[str, int] = {}
        self.seconds = {"generation": 0.0, "judge": 0.0}

    def bind(self, tokenizer: Any, run_dir: Any = None) -> None:
        """Gives the tokenizer (to decode responses) and optionally a RunDir for the trace."""
        self.tokenizer = tokenizer
        if run_dir is not None and self._trace is None:
            self._trace = run_dir.trace("oracle")

    def check(self) -> None:
        """Validates the judge before any expensive work (key, endpoint, model path)."""
        self.judge.check()

    def usage(self) -> dict[str, Any]:
        """Counters for ``metrics.json``: this oracle's, then the judge's under ``judge.``."""
        out: dict[str, Any] = dict(self.counts)
        queries = self.counts["queries"]
        decided = self.counts["perturbed_better"] + self.counts["current_better"]
        out["decisive_share"] = decided / queries if queries else None
        out["generation_seconds"] = round(self.seconds["generation"], 3)
        out["judge_seconds"] = round(self.seconds["judge"], 3)
        out.update({f"judge.{k}": v for k, v in self.judge.usage().items()})
        return out


class GenerativeOracle(TextOracle):
    """ComPO's comparison oracle from any :class:`compo.interfaces.OutputJudge`.

    Args:
        judge: Has ``judge(prompt, current, perturbed) -> Judgement``; optionally ``score``.
        max_new_tokens: Longest generated response.
        do_sample: Sample instead of greedy decoding (with common random numbers).
        temperature: Sampling temperature.
        seed: Seeds the sampling noise, per (iteration, pair).
        aggregation: Over the prompts of one query: ``sum`` of scores (scoring judges),
            ``majority``, ``any`` or ``all`` of per-prompt verdicts, or ``auto`` (``sum`` when
            the judge scores, else ``majority``).
        query: ``current`` (theta + delta against theta, the paper) or ``antithetic``
            (theta + delta against theta - delta).
        graded: Votes carry the score difference (or the judge's confidence), not only a sign.
    """

    def __init__(
        self,
        judge: Any,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        seed: int = 0,
        aggregation: str = "auto",
        query: str = "current",
        graded: bool = False,
    ) -> None:
        settings.choice("oracle.aggregation", aggregation, ("auto", "sum", *AGGREGATIONS))
        settings.choice("oracle.query", query, QUERIES)
        super().__init__(judge, max_new_tokens, temperature, seed)
        settings.flag("oracle.do_sample", do_sample)
        settings.flag("oracle.graded", graded)
        self.do_sample, self.aggregation, self.query, self.graded = (
            do_sample,
            aggregation,
            query,
            graded,
        )
        self.iteration = -1
        self.counts = dict.fromkeys(
            ("queries", "comparisons", "identical_ties", "judge_calls", "texts_scored"), 0
        )
        self.counts.update(judge_ties=0, abstentions=0, perturbed_better=0, current_better=0)

    # ------------------------------------------------------------------ wiring
    def check(self) -> None:
        """Validates the judge before any expensive work (key, endpoint, model path)."""
        super().check()
        self._resolve_aggregation()

    def _resolve_aggregation(self) -> None:
        """``auto`` becomes ``sum`` for a judge that scores, else ``majority``."""
        scores = self.judge.score([], [])
        if self.aggregation == "auto":
            self.aggregation = "sum" if scores is not None else "majority"
        if self.aggregation == "sum" and scores is None:
            raise CompoError(
                f"oracle.aggregation=sum needs a judge that scores responses; "
                f"{type(self.judge).__name__} only compares them (use majority)"
            )

    @property
    def scoring(self) -> bool:
        return self.aggregation == "sum"

    # ------------------------------------------------------------------ protocol
    @torch.no_grad()
    def begin(self, model, scope, pairs, pad_token_id, *, iteration: int, head=None) -> None:
        """Prefills each pair's prompt once and generates (and scores) the current responses."""
        if self.tokenizer is None:
            raise OracleError("GenerativeOracle: call bind(tokenizer) before begin()")
        if self.aggregation == "auto":
            self._resolve_aggregation()
        self.model, self.scope, self.pairs = model, scope, list(pairs)
        self.iteration = iteration
        self.decoder = Decoder(
            model, scope, eos_ids(model, self.tokenizer), pad_token_id, self.max_new_tokens
        )
        self.prompts = [judge_prompt(self.tokenizer.decode(p.prompt_ids)) for p in self.pairs]
        started = time.perf_counter()
        self.prefill = [self.decoder.prefill(p.prompt_ids) for p in self.pairs]
        self.current = [self._responses(None, j)[0] for j in range(len(self.pairs))]
        self.seconds["generation"] += time.perf_counter() - started
        self._scores: dict[tuple[int, tuple[int, ...]], float] = {}

    def differ(self, deltas: Any) -> list[float]:
        """Per perturbation, the share of this iteration's prompts whose response changes."""
        started = time.perf_counter()
        responses = [self._responses(deltas, j) for j in range(len(self.pairs))]
        self.seconds["generation"] += time.perf_counter() - started
        n = len(self.pairs)
        return [
            sum(responses[j][i] != self.current[j] for j in range(n)) / n
            for i in range(len(deltas))
        ]

    def compare(self, deltas: Any) -> list[float]:
        """One vote per perturbation: negative when the judge prefers theta + delta."""
        k, n = len(deltas), len(self.pairs)
        started = time.perf_counter()
        plus = [self._responses(deltas, j) for j in range(n)]
        if self.query == "antithetic":
            minus = [self._responses(deltas.scaled(-1.0), j) for j in range(n)]
        else:
            minus = [[self.current[j]] * k for j in range(n)]
        self.seconds["generation"] += time.perf_counter() - started
        started = time.perf_counter()
        if self.scoring:
            votes, per_pair = self._score_votes(plus, minus)
        else:
            votes, per_pair = self._judge_votes(plus, minus)
        self.seconds["judge"] += time.perf_counter() - started
        self.counts["queries"] += k
        self.counts["comparisons"] += k * n
        for i, vote in enumerate(votes):
            if vote < 0:
                self.counts["perturbed_better"] += 1
            elif vote > 0:
                self.counts["current_better"] += 1
            self._write_trace(i, deltas, per_pair[i], vote)
        return votes

    def usage(self) -> dict[str, Any]:
        """:meth:`TextOracle.usage` plus the seconds per query."""
        out = super().usage()
        total, queries = sum(self.seconds.values()), self.counts["queries"]
        out["seconds_per_query"] = round(total / queries, 4) if queries else None
        return out

    # ------------------------------------------------------------------ verdicts
    def _score_votes(self, plus, minus) -> tuple[list[float], list[list[str]]]:
        """Summed-score votes: sum_j s(minus_j) - s(plus_j) over the query's prompts."""
        k, n = len(plus[0]), len(self.pairs)
        todo = {
            (j, tuple(ids))
            for j in range(n)
            for i in range(k)
            if plus[j][i] != minus[j][i]
            for ids in (plus[j][i], minus[j][i])
            if (j, tuple(ids)) not in self._scores
        }
        todo_list = sorted(todo)
        if todo_list:
            got = self.judge.score(
                [self.prompts[j] for j, _ in todo_list], [self._text(ids) for _, ids in todo_list]
            )
            if got is None or len(got) != len(todo_list):
                raise OracleError(f"judge {type(self.judge).__name__}: score() gave {got!r}")
            scores = finite_scores(type(self.judge).__name__, got)
            self._scores.update(zip(todo_list, scores, strict=True))
            self.counts["texts_scored"] += len(todo_list)
            self.counts["judge_calls"] += len(todo_list)
        votes, reasons = [], []
        for i in range(k):
            diff, why = 0.0, []
            for j in range(n):
                if plus[j][i] == minus[j][i]:
                    self.counts["identical_ties"] += 1
                    why.append("identical responses")
                    continue
                a = self._scores[j, tuple(minus[j][i])]
                b = self._scores[j, tuple(plus[j][i])]
                diff += b - a
                why.append(f"scores {a:.4g} -> {b:.4g}")
            if diff == 0:
                self.counts["judge_ties"] += any(
                    not w.startswith(("identical", "abstain")) for w in why
                )
            votes.append(-diff if self.graded else float(-(diff > 0) + (diff < 0)))
            reasons.append(why)
        return votes, reasons

    def _judge_votes(self, plus, minus) -> tuple[list[float], list[list[str]]]:
        """Pairwise votes: per-prompt verdicts aggregated (majority by default)."""
        k, n = len(plus[0]), len(self.pairs)
        judgements: dict[tuple[int, int], Judgement] = {}
        asks, where = [], []
        for j in range(n):
            for i in range(k):
                if plus[j][i] == minus[j][i]:
                    judgements[i, j] = Judgement(Verdict.TIE, 1.0, "identical responses")
                    self.counts["identical_ties"] += 1
                else:
                    asks.append((self.prompts[j], self._text(minus[j][i]), self._text(plus[j][i])))
                    where.append((i, j))
        for key, judgement in zip(where, self._ask(asks), strict=True):
            judgements[key] = judgement
        self.counts["judge_calls"] += len(asks)
        votes, reasons = [], []
        for i in range(k):
            per_pair = [judgements[i, j] for j in range(n)]
            verdict = aggregate([jd.verdict for jd in per_pair], self.aggregation)
            if self.graded and verdict != Verdict.TIE:
                sure = [jd.confidence if jd.confidence is not None else 1.0 for jd in per_pair]
                votes.append(
                    sum(int(jd.verdict) * c for jd, c in zip(per_pair, sure, strict=True)) / n
                )
            else:
                votes.append(float(verdict))
            reasons.append([jd.reason or jd.verdict.name for jd in per_pair])
        return votes, reasons

    def _ask(self, asks: list[tuple[str, str, str]]) -> list[Judgement]:
        if not asks:
            return []
        results = list(self.judge.judge_batch(asks))
        for r in results:
            if not (isinstance(r, Judgement) and isinstance(r.verdict, Verdict)):
                raise OracleError(f"judge returned {r!r}, not a Judgement with a Verdict")
            if r.verdict == Verdict.TIE:
                self.counts["judge_ties"] += 1
                self.counts["abstentions"] += bool(r.reason and r.reason.startswith("abstain"))
        return results

    # ------------------------------------------------------------------ generation
    def _text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    def _noise(self, j: int) -> torch.Generator | None:
        if not self.do_sample:
            return None
        return local_generator(self.seed, self.iteration, j, device=self.decoder.weight.device)

    def _responses(self, deltas: Any, j: int) -> list[list[int]]:
        """Pair j's response under each perturbation of ``deltas`` (None: the current model)."""
        rows = 1 if deltas is None else len(deltas)
        if self.scope.head_only:
            return self.decoder.generate(
                self.prefill[j], rows, deltas, self._noise(j), self.temperature
            )
        if deltas is None:
            return [self._full(j, None)]
        return [self._full(j, deltas.dense(i)) for i in range(len(deltas))]

    @torch.no_grad()
    def _full(self, j: int, delta: list[torch.Tensor] | None) -> list[int]:
        """Extra perturbed modules: add delta to the weights, generate anew, copy them back."""
        saved = [b.master.clone() for b in self.scope.blocks] if delta is not None else None
        try:
            if delta is not None:
                self.scope.add_(delta)
            prefill = self.decoder.prefill(self.pairs[j].prompt_ids)
            return self.decoder.generate(prefill, 1, None, self._noise(j), self.temperature)[0]
        finally:
            if saved is not None:
                for block, value in zip(self.scope.blocks, saved, strict=True):
                    block.master.copy_(value)
                self.scope.write_back()

    def _write_trace(self, i: int, deltas: Any, reasons: list[str], vote: float) -> None:
        if self._trace is None:
            return
        self._trace.write(
            {
                "iteration": self.iteration,
                "direction": deltas.indices[i],
                "vote": vote,
                "query": self.query,
                "pair_ids": [p.pair_id for p in self.pairs],
                "reasons": reasons,
                "identical": [r == "identical responses" for r in reasons],
            }
        )
