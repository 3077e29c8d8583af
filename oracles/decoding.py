"""Decoding for the oracles that show a judge text: greedy or Gumbel-max generation from a
prefilled prompt, with ComPO's perturbations applied to the output layer in logit space.

When ComPO perturbs the output layer only, the decoder is untouched, so the prompt is run through
it once per iteration (:meth:`Decoder.prefill`) and its KV cache is reused for the current response
and for every perturbation (copied, repeated per perturbation in one batch); logits are
``h W^T + h dZ^T`` computed from the direction's pieces, so the weights are never modified.

Used by :mod:`oracles.generative` and :mod:`oracles.sample_scored`. It imports nothing of compo:
the scope (``head.master``, ``head_bias``) and the direction batch (``pieces``, ``coef``) it is
given are duck-typed.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F


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
        """The prompt's KV cache and last hidden state, for :meth:`generate` to continue from."""
        decoder = self.model.get_decoder()
        ids = torch.tensor([list(prompt_ids)], device=self.weight.device)
        return _forward(decoder, None, input_ids=ids)

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
            cache, h = _forward(decoder, cache, input_ids=feed[:, None])
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
        cache, h = _forward(
            decoder, None, input_ids=ids, attention_mask=mask, position_ids=positions
        )
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
            cache, h = _forward(
                decoder, cache, input_ids=feed[:, None], attention_mask=mask, position_ids=position
            )
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
        """Next token per row: argmax without a generator, else Gumbel-max (one noise vector for
        all rows with ``shared_noise``, so rows differ only where their logits do)."""
        if gen is None:
            return logits.argmax(-1)
        shape = logits.shape[-1:] if shared_noise else logits.shape
        u = torch.rand(shape, generator=gen, device=logits.device)
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)))
        return (logits / temperature + gumbel).argmax(-1)


def _forward(decoder: Any, cache: Any, **inputs: Any) -> tuple[Any, torch.Tensor]:
    """One decoder pass continuing ``cache`` (None: a fresh one): the new cache, last hidden state.

    transformers 5.x calls the KV cache ``cache`` (argument and output field) and deprecates
    ``past_key_values`` (removal announced for 5.40); earlier releases only know the old name.
    The name is read from the decoder's signature, so both work without a version check.
    """
    name = _cache_name(type(decoder))
    if cache is not None:
        inputs[name] = cache
    out = decoder(use_cache=True, **inputs)
    return out[name], out.last_hidden_state[:, -1]


@functools.cache
def _cache_name(decoder_class: type) -> str:
    """The KV-cache keyword of ``decoder_class.forward``; read once per class, not per token."""
    known = inspect.signature(decoder_class.forward).parameters
    return "cache" if "cache" in known else "past_key_values"


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """The token ids that end a response: the model's generation config's, else the tokenizer's."""
    eos = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])
