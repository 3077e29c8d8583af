"""Judge-scored samples: the judge is consulted K times per prompt and iteration, not per query.

Each iteration samples K responses y_1..y_K for each prompt of the batch from the current model
and has the judge score them once (a scoring judge: K calls; a pairwise judge ranks them, with
K - 1 comparisons against the first sample or K(K - 1)/2 for a full round robin, scores = wins -
losses). A perturbation theta + delta is then better when it raises the expected score, estimated
with self-normalised importance weights

    w_k = pi_{theta+delta}(y_k | x) / pi_theta(y_k | x),
    E_{theta+delta}[s] ~ sum_k w_k s_k / sum_k w_k,

which are computed exactly from the cached hidden states of the samples (the output layer alone
changes, :meth:`compo.zo.head.HeadEvaluator.for_sequences`): no response is generated per
perturbation, so m can be large and judge calls per iteration do not depend on m. The vote is the
sign of the change (or the change itself with ``graded: true``); a prompt whose samples all score
the same carries no vote.

Its r -> 0 limit (``optimizer.estimator=expected``) is the direction of
sum_k (s_k - mean s) grad log pi(y_k | x): the policy gradient of the expected score restricted to
the perturbed parameters, with the mean score as baseline.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from compo.interfaces import (
    OracleError,
    Verdict,
    finite_scores,
    local_generator,
    settings,
)
from oracles.decoding import Decoder, eos_ids
from oracles.generative import TextOracle, judge_prompt

log = logging.getLogger(__name__)

RANKINGS = ("reference", "round_robin")


@dataclass
class SampleLimit:
    """The r -> 0 direction (unit, E[y z] sign convention) and the predicted share of wins."""

    direction: list[torch.Tensor]
    frac: float


class SampleScoredOracle(TextOracle):
    """Votes from importance-weighted judge scores of the current model's own samples.

    Args:
        judge: An output judge; ``score`` is used when it has one, else pairwise ``judge``.
        num_samples: K, responses sampled per prompt per iteration.
        max_new_tokens: Longest sampled response.
        temperature: Sampling temperature (the samples are the current policy's at this
            temperature; the importance weights use the model's own probabilities).
        seed: Seeds the sampling noise per (iteration, prompt).
        ranking: Pairwise judges: ``reference`` (K - 1 comparisons with the first sample) or
            ``round_robin`` (all K (K - 1) / 2 pairs).
        graded: Votes carry the estimated change of the expected score, not only its sign.
    """

    def __init__(
        self,
        judge: Any,
        num_samples: int = 4,
        max_new_tokens: int = 48,
        temperature: float = 1.0,
        seed: int = 0,
        ranking: str = "reference",
        graded: bool = False,
    ) -> None:
        settings.number("oracle.num_samples", num_samples, integer=True, ge=2)
        settings.choice("oracle.ranking", ranking, RANKINGS)
        super().__init__(judge, max_new_tokens, temperature, seed)
        settings.flag("oracle.graded", graded)
        self.num_samples, self.ranking, self.graded = num_samples, ranking, graded
        self.counts = dict.fromkeys(
            ("iterations", "samples", "texts_scored", "judge_calls", "queries"), 0
        )
        self.counts.update(perturbed_better=0, current_better=0, ties=0, flat_prompts=0)

    # ------------------------------------------------------------------ per iteration
    @torch.no_grad()
    def begin(self, model, scope, pairs, pad_token_id, *, iteration: int, head) -> None:
        """Samples K responses per distinct prompt, has the judge score them, caches their state."""
        if self.tokenizer is None:
            raise OracleError("SampleScoredOracle: call bind(tokenizer) before begin()")
        prompts_ids = list(dict.fromkeys(tuple(p.prompt_ids) for p in pairs))
        decoder = Decoder(
            model, scope, eos_ids(model, self.tokenizer), pad_token_id, self.max_new_tokens
        )
        started = time.perf_counter()
        gen = local_generator(self.seed, iteration, device=decoder.weight.device)
        samples = decoder.sample(prompts_ids, self.num_samples, gen, self.temperature)
        self.seconds["generation"] += time.perf_counter() - started
        started = time.perf_counter()
        texts = [judge_prompt(self.tokenizer.decode(list(ids))) for ids in prompts_ids]
        scores = torch.tensor([self._scores(texts[j], rows) for j, rows in enumerate(samples)])
        self.seconds["judge"] += time.perf_counter() - started
        # Advantages: a prompt whose samples all score the same teaches nothing (all zero).
        self.advantage = scores - scores.mean(-1, keepdim=True)
        self.counts["flat_prompts"] += int((self.advantage.abs().sum(-1) == 0).sum())
        self.counts["iterations"] += 1
        self.counts["samples"] += scores.numel()
        k = self.num_samples
        self.head = head.for_sequences(
            model,
            [ids for ids in prompts_ids for _ in range(k)],
            [row for rows in samples for row in rows],
            pad_token_id,
        )
        self.iteration, self.n_prompts = iteration, len(prompts_ids)
        self.eos = torch.tensor(sorted(decoder.eos), device=decoder.weight.device)
        if self._trace is not None:
            self._trace.write(
                {
                    "iteration": iteration,
                    "scores": scores.tolist(),
                    "sample_tokens": [[len(r) for r in rows] for rows in samples],
                }
            )

    def _scores(self, prompt: str, rows: list[list[int]]) -> list[float]:
        """The judge's score of each sample (or wins - losses from pairwise comparisons)."""
        texts = [self.tokenizer.decode(r, skip_special_tokens=True).strip() for r in rows]
        scored = self.judge.score([prompt] * len(texts), texts)
        if scored is not None:
            self.counts["texts_scored"] += len(texts)
            self.counts["judge_calls"] += len(texts)
            return finite_scores(type(self.judge).__name__, scored)
        k = len(texts)
        if self.ranking == "reference":
            matches = [(0, b) for b in range(1, k)]
        else:
            matches = [(a, b) for a in range(k) for b in range(a + 1, k)]
        asks = [(prompt, texts[a], texts[b]) for a, b in matches if texts[a] != texts[b]]
        played = [(a, b) for a, b in matches if texts[a] != texts[b]]
        wins = [0.0] * k
        for (a, b), judgement in zip(played, self.judge.judge_batch(asks), strict=True):
            if judgement.verdict == Verdict.PERTURBED_BETTER:  # b beats a
                wins[b] += 1
                wins[a] -= 1
            elif judgement.verdict == Verdict.CURRENT_BETTER:
                wins[a] += 1
                wins[b] -= 1
        self.counts["judge_calls"] += len(asks)
        return wins

    def compare(self, deltas: Any) -> list[float]:
        """Votes from the importance-weighted change of the expected score."""
        k = self.num_samples
        change = self.head.deltas(deltas).view(len(deltas), self.n_prompts, k)
        weights = torch.softmax(change.double(), dim=-1)  # self-normalised w_k at theta + delta
        gain = (weights * self.advantage.double()).sum((-1, -2))  # E_new[s] - E_cur[s], summed
        votes = []
        for value in gain.tolist():
            if value > 0:
                self.counts["perturbed_better"] += 1
            elif value < 0:
                self.counts["current_better"] += 1
            else:
                self.counts["ties"] += 1
            votes.append(-value if self.graded else float(-(value > 0) + (value < 0)))
        self.counts["queries"] += len(votes)
        return votes

    def support(self, top_k: int) -> Any:
        """Output-layer rows of the samples' tokens, the top-k predicted ones and end-of-turn.

        End-of-turn is always in: stopping earlier is a move every prompt allows, even when no
        sample happened to stop (samples cut by the token limit never show it).
        """
        return torch.unique(torch.cat([self.head.support(top_k), self.eos]))

    def limit(self) -> SampleLimit:
        """-(sum_k a_k grad log pi(y_k)) / ||.||: the policy gradient of the expected score."""
        grad = self.head.gradient(self.advantage.flatten() / self.num_samples)
        total = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grad))
        if total == 0:
            return SampleLimit([torch.zeros_like(g) for g in grad], 0.0)
        # A linear functional improves under half of all directions: frac = 1/2.
        return SampleLimit([-g / total for g in grad], 0.5)
