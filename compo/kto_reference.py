"""KTO's reference point (Ethayarajh et al. 2024): the policy's KL from the reference, estimated
on mismatched prompt/reply pairs."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from compo.scoring import score_pairs


class MismatchedKL:
    """KTO's reference point: the policy's KL from the reference on mismatched prompt/reply pairs.

    Prompt i goes with the replies of pair i + 1, or of the next pair with another prompt when
    i + 1 shares prompt i (cyclic over the training pairs, so the pairing does not depend on the
    batch order; TRL cycles within each batch, whatever the prompts); for unpaired examples, with
    the completion of the next example. Their reference log-probs are scored once, before
    training; the policy's at each step, without gradient.

    Args:
        model: The policy before any update (it is the reference).
        pairs: The encoded training pairs (or unpaired examples).
        pad_token_id: Padding id.
        batch_size: Sequences per pass of the reference scoring.
        desc: Progress-bar label.
    """

    def __init__(self, model, pairs: Sequence, pad_token_id: int, batch_size: int, desc: str):
        partner = _next_other_prompt([tuple(p.prompt_ids) for p in pairs])
        self.pairs = [
            dataclasses.replace(pairs[partner[i]], prompt_ids=p.prompt_ids)
            for i, p in enumerate(pairs)
        ]
        self.model, self.pad_token_id = model, pad_token_id
        scores = score_pairs(model, self.pairs, pad_token_id, batch_size=batch_size, desc=desc)
        self.reference = torch.stack([s.sum_logps for s in scores]).detach()

    def kl(self, rows: Sequence[int]) -> Tensor:
        """Mean of log pi - log pi_ref over the mismatched sequences of ``rows``, clipped at 0."""
        with torch.no_grad():
            scores = score_pairs(
                self.model, [self.pairs[i] for i in rows], self.pad_token_id,
                batch_size=2 * len(rows),
            )  # fmt: skip
        now = torch.stack([s.sum_logps for s in scores])
        index = torch.tensor(list(rows), device=now.device)
        return (now - self.reference[:, index]).mean().clamp(min=0)


def _next_other_prompt(prompts: Sequence[tuple[int, ...]]) -> list[int]:
    """For each item, the next one (cyclically) with another prompt; i + 1 when all share one.

    Files list several replies to one prompt in a row (click logs): item i + 1 would often answer
    prompt i itself, which is not a mismatched pair.
    """
    n = len(prompts)
    after: list[int | None] = [None] * n
    for k in reversed(range(2 * n)):  # twice round, so runs that wrap around are resolved
        i, j = k % n, (k + 1) % n
        after[i] = j if prompts[j] != prompts[i] else after[j]
    return [(i + 1) % n if a is None else a for i, a in enumerate(after)]
