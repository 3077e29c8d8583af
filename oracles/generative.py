"""Turns an output-level judge into a parameter-level oracle by generating responses.

For a query (prompt, theta, theta + delta) one response is generated from each model, greedy by
default (or sampled with common random numbers: the same Gumbel noise at every step for both),
and the judge says which is better. Identical responses are a tie without asking the judge (small
perturbations often change nothing): they are counted as ``identical_ties``.

When ComPO perturbs the output layer only, the decoder is untouched, so the prompt is run through
it once per iteration and its KV cache is reused for the current response and for every
perturbation (copied, repeated per perturbation in one batch); logits are ``h W^T + h dZ^T``
computed from the direction's pieces, so the weights are never modified. With extra perturbed
modules the delta is added to the master weights, the response generated from scratch, and the
saved weights copied back (bit-exact).

The optimizer calls ``begin``/``compare``; the cli calls ``bind(tokenizer, run_dir)`` once (to
decode responses and write ``trace/oracle.jsonl``) and logs ``usage()`` as ``oracle.*`` metrics.
"""

from __future__ import annotations

import copy
import logging
import re
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from oracles.base import Judgement, OracleError, Verdict, aggregate

log = logging.getLogger(__name__)

_CHATML_TURN = re.compile(r"<\|im_start\|>(\w+)\n(.*?)(?:<\|im_end\|>|$)", re.S)


def judge_prompt(text: str) -> str:
    """The prompt as a judge should read it: ChatML markup removed, earlier turns labelled."""
    turns = [(r, c.strip()) for r, c in _CHATML_TURN.findall(text) if c.strip()]
    if not turns:
        return text.strip()
    turns = [t for t in turns if t[0] != "system"] or turns
    if len(turns) == 1:
        return turns[0][1]
    return "\n\n".join(f"{role.capitalize()}: {content}" for role, content in turns)


class GenerativeOracle:
    """ComPO's comparison oracle from any :class:`oracles.base.OutputJudge`.

    Args:
        judge: Has ``judge(prompt, current, perturbed) -> Judgement``; optional ``judge_batch``,
            ``check()`` and ``usage()``.
        max_new_tokens: Longest generated response.
        do_sample: Sample instead of greedy decoding (with common random numbers).
        temperature: Sampling temperature.
        seed: Seeds the sampling noise, per (iteration, pair).
        aggregation: ``any``, ``majority`` or ``all`` over the pairs of one query.
    """

    kind = "output"

    def __init__(
        self,
        judge: Any,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        seed: int = 0,
        aggregation: str = "majority",
    ) -> None:
        aggregate([], aggregation)  # validates the rule name
        self.judge, self.max_new_tokens = judge, max_new_tokens
        self.do_sample, self.temperature, self.seed = do_sample, temperature, seed
        self.aggregation = aggregation
        self.tokenizer = None
        self._trace = None
        self.iteration = -1
        self.counts = dict.fromkeys(
            ("queries", "comparisons", "identical_ties", "judge_calls", "judge_ties"), 0
        )
        self.counts.update(abstentions=0, perturbed_better=0, current_better=0)
        self.seconds = {"generation": 0.0, "judge": 0.0}

    # ------------------------------------------------------------------ wiring
    def bind(self, tokenizer: Any, run_dir: Any = None) -> None:
        """Gives the tokenizer (to decode responses) and optionally a RunDir for the trace."""
        self.tokenizer = tokenizer
        if run_dir is not None and self._trace is None:
            self._trace = run_dir.trace("oracle")

    def check(self) -> None:
        """Validates the judge before any expensive work (key, endpoint, model path)."""
        if hasattr(self.judge, "check"):
            self.judge.check()

    # ------------------------------------------------------------------ protocol
    @torch.no_grad()
    def begin(self, model: Any, params: Any, pairs: Sequence[Any], pad_token_id: int) -> None:
        """Prefills each pair's prompt once and generates the current responses."""
        if self.tokenizer is None:
            raise OracleError("GenerativeOracle: call bind(tokenizer) before begin()")
        self.model, self.scope, self.pairs, self.pad = model, params, list(pairs), pad_token_id
        self.iteration += 1
        self.weight = params.head.master
        self.bias = params.head_bias
        eos = getattr(model.generation_config, "eos_token_id", None) or self.tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])
        self.prompts = [judge_prompt(self.tokenizer.decode(p.prompt_ids)) for p in self.pairs]
        started = time.perf_counter()
        self.prefill = [self._prefill(p.prompt_ids) for p in self.pairs]
        self.current = [
            self._generate(j, None, None)[0] if params.head_only else self._full(j)
            for j in range(len(self.pairs))
        ]
        self.seconds["generation"] += time.perf_counter() - started

    def compare(self, deltas: Any) -> list[Verdict]:
        """One verdict per perturbation: PERTURBED_BETTER when the judge prefers its response."""
        k = len(deltas)
        started = time.perf_counter()
        responses = [self._responses(deltas, j) for j in range(len(self.pairs))]
        self.seconds["generation"] += time.perf_counter() - started
        judgements: dict[tuple[int, int], Judgement] = {}
        asks, where = [], []
        for j, per_delta in enumerate(responses):
            for i, ids in enumerate(per_delta):
                if ids == self.current[j]:
                    judgements[i, j] = Judgement(Verdict.TIE, 1.0, "identical responses")
                    self.counts["identical_ties"] += 1
                else:
                    asks.append((self.prompts[j], self._text(self.current[j]), self._text(ids)))
                    where.append((i, j))
        started = time.perf_counter()
        for key, judgement in zip(where, self._ask(asks), strict=True):
            judgements[key] = judgement
        self.seconds["judge"] += time.perf_counter() - started
        self.counts["queries"] += k
        self.counts["comparisons"] += k * len(self.pairs)
        self.counts["judge_calls"] += len(asks)
        out = []
        for i in range(k):
            votes = [judgements[i, j].verdict for j in range(len(self.pairs))]
            verdict = aggregate(votes, self.aggregation)
            out.append(verdict)
            name = {Verdict.PERTURBED_BETTER: "perturbed_better", Verdict.TIE: None}
            key = name.get(verdict, "current_better")
            if key:
                self.counts[key] += 1
            self._write_trace(i, deltas, judgements, verdict)
        return out

    def usage(self) -> dict[str, Any]:
        """Counters for ``metrics.json``: this adapter's, then the judge's under ``judge.``."""
        total = self.seconds["generation"] + self.seconds["judge"]
        out: dict[str, Any] = dict(self.counts)
        out["generation_seconds"] = round(self.seconds["generation"], 3)
        out["judge_seconds"] = round(self.seconds["judge"], 3)
        queries = self.counts["queries"]
        out["seconds_per_query"] = round(total / queries, 4) if queries else None
        if hasattr(self.judge, "usage"):
            out.update({f"judge.{k}": v for k, v in self.judge.usage().items()})
        return out

    # ------------------------------------------------------------------ internals
    def _ask(self, asks: list[tuple[str, str, str]]) -> list[Judgement]:
        if not asks:
            return []
        if hasattr(self.judge, "judge_batch"):
            results = list(self.judge.judge_batch(asks))
        else:
            results = [self.judge.judge(*a) for a in asks]
        for r in results:
            if not isinstance(getattr(r, "verdict", None), Verdict):
                raise OracleError(f"judge returned {r!r}, not a Judgement with a Verdict")
            if r.verdict == Verdict.TIE:
                self.counts["judge_ties"] += 1
                self.counts["abstentions"] += bool(r.reason and r.reason.startswith("abstain"))
        return results

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def _prefill(self, prompt_ids: list[int]):
        decoder = self.model.get_decoder()
        ids = torch.tensor([prompt_ids], device=self.weight.device)
        out = decoder(input_ids=ids, use_cache=True)
        return out.past_key_values, out.last_hidden_state[:, -1]

    def _noise(self, j: int) -> torch.Generator | None:
        if not self.do_sample:
            return None
        gen = torch.Generator(device=self.weight.device)
        gen.manual_seed(hash((self.seed, self.iteration, j)) & ((1 << 63) - 1))
        return gen

    def _responses(self, deltas: Any, j: int) -> list[list[int]]:
        if self.scope.head_only:
            return self._generate(j, deltas, len(deltas))
        return [self._full(j, deltas.dense(i)) for i in range(len(deltas))]

    def _generate(self, j: int, deltas: Any, k: int | None) -> list[list[int]]:
        """Greedy/CRN decoding of ``k`` perturbed heads (or the current one) from pair j's cache."""
        cache, h = self.prefill[j]
        rows = k or 1
        cache = copy.deepcopy(cache)
        if rows > 1:
            cache.batch_repeat_interleave(rows)
        h = h.expand(rows, -1)
        gen = self._noise(j)
        decoder = self.model.get_decoder()
        tokens: list[list[int]] = [[] for _ in range(rows)]
        done = [False] * rows
        for _ in range(self.max_new_tokens):
            logits = F.linear(h.float(), self.weight.float(), self._bias())
            if deltas is not None:
                logits = logits + self._head_product(deltas, h.float())
            nxt = self._pick(logits, gen)
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

    def _bias(self):
        return self.bias.float() if self.bias is not None else None

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

    def _pick(self, logits: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        if gen is None:
            return logits.argmax(-1)
        # Gumbel-max with one noise vector shared by every row: common random numbers.
        u = torch.rand(logits.shape[-1], generator=gen, device=logits.device)
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)))
        return (logits / self.temperature + gumbel).argmax(-1)

    @torch.no_grad()
    def _full(self, j: int, delta: list[torch.Tensor] | None = None) -> list[int]:
        """Extra perturbed modules: add delta to the weights, generate anew, copy them back."""
        saved = [b.master.clone() for b in self.scope.blocks] if delta is not None else None
        try:
            if delta is not None:
                self.scope.add_(delta)
            self.prefill[j] = self._prefill(self.pairs[j].prompt_ids)
            return self._generate(j, None, None)[0]
        finally:
            if saved is not None:
                for block, value in zip(self.scope.blocks, saved, strict=True):
                    block.master.copy_(value)
                self.scope.write_back()

    def _write_trace(self, i: int, deltas: Any, judgements: dict, verdict: Verdict) -> None:
        if self._trace is None:
            return
        index = deltas.indices[i] if hasattr(deltas, "indices") else i
        per_pair = [judgements[i, j] for j in range(len(self.pairs))]
        self._trace.write(
            {
                "iteration": self.iteration,
                "direction": index,
                "verdict": verdict.name,
                "pair_ids": [p.pair_id for p in self.pairs],
                "pair_verdicts": [jd.verdict.name for jd in per_pair],
                "reasons": [jd.reason for jd in per_pair],
                "identical": [jd.reason == "identical responses" for jd in per_pair],
            }
        )
