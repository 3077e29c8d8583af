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

When ComPO perturbs the output layer only, the decoder is untouched, so the prompt is run through
it once per iteration and its KV cache is reused for the current response and for every
perturbation (copied, repeated per perturbation in one batch); logits are ``h W^T + h dZ^T``
computed from the direction's pieces, so the weights are never modified. With extra perturbed
modules the delta is added to the master weights, the response generated from scratch, and the
saved weights copied back (bit-exact).
"""

from __future__ import annotations

import copy
import logging
import math
import re
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from compo.interfaces import (
    AGGREGATIONS,
    ComparisonOracle,
    CompoError,
    Judgement,
    OracleError,
    Verdict,
    aggregate,
    local_generator,
    settings,
)

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


class Decoder:
    """Greedy or Gumbel-max decoding from a prefilled prompt, with perturbed output layers.

    Shared by the generative and the sample-scored oracles: the prompt's KV cache is computed once
    per iteration; each batch of rows continues from a copy of it.
    """

    def __init__(self, model: Any, scope: Any, eos: set[int], pad: int, max_new_tokens: int):
        self.model, self.scope, self.eos, self.pad = model, scope, eos, pad
        self.max_new_tokens = max_new_tokens
        self.weight = scope.head.master
        self.bias = scope.head_bias.float() if scope.head_bias is not None else None

    @torch.no_grad()
    def prefill(self, prompt_ids: Sequence[int]):
        decoder = self.model.get_decoder()
        ids = torch.tensor([list(prompt_ids)], device=self.weight.device)
        out = decoder(input_ids=ids, use_cache=True)
        return out.past_key_values, out.last_hidden_state[:, -1]

    @torch.no_grad()
    def generate(
        self,
        prefill,
        rows: int,
        deltas: Any = None,
        gen: torch.Generator | None = None,
        temperature: float = 1.0,
    ) -> list[list[int]]:
        """``rows`` continuations; row i uses perturbation i of ``deltas`` (None: current head).

        With a generator, tokens are drawn by Gumbel-max with one noise vector per step shared by
        all rows (common random numbers); :meth:`sample` draws independent samples.
        """
        cache, h = prefill
        cache = copy.deepcopy(cache)
        if rows > 1:
            cache.batch_repeat_interleave(rows)
        h = h.expand(rows, -1)
        decoder = self.model.get_decoder()
        tokens: list[list[int]] = [[] for _ in range(rows)]
        done = [False] * rows
        for _ in range(self.max_new_tokens):
            logits = F.linear(h.float(), self.weight.float(), self.bias)
            if deltas is not None:
                logits = logits + self._head_product(deltas, h.float())
            nxt = self._pick(logits, gen, temperature, shared_noise=True)
            for r in range(rows):
                if not done[r]:
                    tok = int(nxt[r])
                    tokens[r].append(tok)
                    done[r] = tok in self.eos
            if all(done):
                break
            feed = nxt.clone()
            feed[torch.tensor(done)] = self.pad  # finished rows: output ignored from here on
            out = decoder(input_ids=feed[:, None], past_key_values=cache, use_cache=True)
            cache, h = out.past_key_values, out.last_hidden_state[:, -1]
        return tokens

    @torch.no_grad()
    def sample(
        self, prompts: Sequence[Sequence[int]], k: int, gen: torch.Generator, temperature: float
    ) -> list[list[list[int]]]:
        """``k`` independent samples for each prompt from the current head, all in one batch.

        Prompts are left-padded (masked) so that every row decodes in the same forward passes.
        """
        rows = [list(p) for p in prompts for _ in range(k)]
        width = max(map(len, rows))
        device = self.weight.device
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for r, seq in enumerate(rows):
            ids[r, width - len(seq) :] = torch.tensor(seq, device=device)
            mask[r, width - len(seq) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        decoder = self.model.get_decoder()
        out = decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        cache, h = out.past_key_values, out.last_hidden_state[:, -1]
        position = positions[:, -1:]
        tokens: list[list[int]] = [[] for _ in rows]
        done = [False] * len(rows)
        for _ in range(self.max_new_tokens):
            logits = F.linear(h.float(), self.weight.float(), self.bias)
            nxt = self._pick(logits, gen, temperature, shared_noise=False)
            for r in range(len(rows)):
                if not done[r]:
                    tokens[r].append(int(nxt[r]))
                    done[r] = int(nxt[r]) in self.eos
            if all(done):
                break
            feed = nxt.clone()
            feed[torch.tensor(done)] = self.pad
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            position = position + 1
            out = decoder(
                input_ids=feed[:, None],
                attention_mask=mask,
                position_ids=position,
                past_key_values=cache,
                use_cache=True,
            )
            cache, h = out.past_key_values, out.last_hidden_state[:, -1]
        return [tokens[j * k : (j + 1) * k] for j in range(len(prompts))]

    def _head_product(self, deltas: Any, h: torch.Tensor) -> torch.Tensor:
        """Row i: h_i dZ_i^T for the output-layer piece of direction i, in logit space."""
        piece, coef = deltas.pieces[0], deltas.coef
        vocab = self.weight.shape[0]
        out = h.new_zeros(h.shape[0], vocab)
        for i in range(h.shape[0]):
            prod = piece.hidden_product(h[i : i + 1], i)[0] * coef[i]
            if prod.shape[-1] == vocab:
                out[i] += prod
            else:  # support-restricted: only the support rows (columns of the logits) move
                out[i, piece.rows] += prod
        return out

    @staticmethod
    def _pick(logits, gen, temperature: float, shared_noise: bool) -> torch.Tensor:
        if gen is None:
            return logits.argmax(-1)
        shape = logits.shape[-1:] if shared_noise else logits.shape
        u = torch.rand(shape, generator=gen, device=logits.device)
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)))
        return (logits / temperature + gumbel).argmax(-1)


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


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
        if aggregation not in (*AGGREGATIONS, "sum", "auto"):
            raise CompoError(
                f"oracle.aggregation: {aggregation!r} is not one of auto, sum, "
                f"{', '.join(AGGREGATIONS)}"
            )
        if query not in QUERIES:
            raise CompoError(f"oracle.query: {query!r} is not one of {QUERIES}")
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
            self._scores.update(zip(todo_list, map(float, got), strict=True))
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
                if not (math.isfinite(a) and math.isfinite(b)):
                    self.counts["abstentions"] += 1
                    why.append(f"abstain: non-finite score ({a}, {b})")
                    continue
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
