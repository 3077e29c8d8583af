"""A judge from a local Hugging Face sequence-classification reward model.

    compo model=tiny optimizer=compo oracle=reward_model                      # tiny random RM
    compo optimizer=compo oracle=reward_model oracle.judge.path=/models/my-rm  # a real one

Any ``AutoModelForSequenceClassification`` directory with one output (the reward) works, e.g. a
downloaded ``OpenAssistant/reward-model-deberta-v3-large-v2`` or ``Skywork/Skywork-Reward-*``:
copy it to a local directory and set ``oracle.judge.path``. Each (prompt, response) is rendered
with the reward model's *own* chat template (or ``prompt\\n\\nresponse`` when it has none), scored
in batches, and the higher reward wins; rewards within ``epsilon`` are a tie. ``path: tiny``
builds a tiny random Llama reward model offline (plumbing tests only: its verdicts mean nothing).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from compo.interfaces import (
    CompoError,
    Judgement,
    OutputJudge,
    Verdict,
    byte_tokenizer,
    finite_scores,
    settings,
)

log = logging.getLogger(__name__)


def build_tiny_reward_model(seed: int = 0, hidden_size: int = 32):
    """A random 1-layer ``LlamaForSequenceClassification`` with the byte tokenizer (offline)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=2 * hidden_size,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.2,
    )
    with torch.random.fork_rng(devices=[]):  # never disturb the caller's global RNG
        torch.manual_seed(seed)
        model = LlamaForSequenceClassification(config)
    return model, tokenizer


class RewardModelJudge(OutputJudge):
    """Compares two responses by their rewards under a sequence-classification model.

    Args:
        path: Local model directory, or ``tiny`` for a random offline model.
        epsilon: Rewards closer than this are a tie.
        batch_size: Sequences per forward pass.
        max_length: Longest (prompt + response) in tokens; longer inputs keep their end.
        device: Torch device string (``auto``, ``cpu``, ``cuda``...), checked as the top-level
            ``device`` is.
        dtype: ``auto``, ``float32``, ``bfloat16`` or ``float16``, checked as the top-level
            ``dtype`` is; the ``tiny`` model is cast to it too.
        seed: Seeds the ``tiny`` model.
    """

    name = "reward_model"

    def __init__(
        self,
        path: str = "tiny",
        epsilon: float = 0.0,
        batch_size: int = 8,
        max_length: int = 1024,
        device: str = "cpu",
        dtype: str = "float32",
        seed: int = 0,
    ) -> None:
        self.path = settings.required(
            "oracle.judge.path",
            path,
            missing="no reward model given; set it to a local reward model directory, or tiny "
            "for a random offline one",
        )
        self.epsilon = settings.number("oracle.judge.epsilon", epsilon, ge=0)
        self.batch_size = settings.number("oracle.judge.batch_size", batch_size, integer=True, ge=1)
        settings.number("oracle.judge.max_length", max_length, integer=True, ge=2)
        # Checked here, as the run's own device and dtype: not a CUDA error mid-load later.
        self.device = settings.device("oracle.judge.device", device)
        self.dtype = settings.dtype("oracle.judge.dtype", dtype, self.device)
        self.max_length, self.seed = max_length, seed
        self.model = self.tokenizer = None
        self._lock = threading.Lock()
        self.counts = {"calls": 0, "identical": 0, "sequences_scored": 0}

    def check(self) -> None:
        """Loads the model (a bad path fails here, before any optimisation work)."""
        if self.model is not None:
            return
        if self.path == "tiny":
            model, tokenizer = build_tiny_reward_model(self.seed)
        else:
            if not (Path(self.path) / "config.json").is_file():
                raise CompoError(
                    f"oracle.reward_model: {self.path} is not a model directory (no config.json); "
                    "set oracle.judge.path to a local reward model"
                )
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(self.path)
                model = AutoModelForSequenceClassification.from_pretrained(
                    self.path, dtype=getattr(torch, self.dtype)
                )
            except (OSError, ValueError, KeyError) as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise CompoError(f"oracle.reward_model: cannot load {self.path}: {first}") from exc
        if model.config.num_labels != 1:
            raise CompoError(
                f"oracle.reward_model: {self.path} has {model.config.num_labels} outputs; "
                "a reward model has exactly one"
            )
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if model.config.pad_token_id is None:  # needed to find each row's last token
            model.config.pad_token_id = tokenizer.pad_token_id
        model = model.to(self.device, getattr(torch, self.dtype))
        self.model, self.tokenizer = model.eval(), tokenizer

    def _render(self, prompt: str, response: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            messages = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": response},
            ]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return f"{prompt}\n\n{response}"

    @torch.no_grad()
    def rewards(self, prompts: list[str], responses: list[str]) -> list[float]:
        """Rewards of each (prompt, response), in batches; a non-finite one is an OracleError."""
        self.check()
        texts = [self._render(p, r) for p, r in zip(prompts, responses, strict=True)]
        out: list[float] = []
        self.tokenizer.truncation_side = "left"  # keep the response, drop the oldest prompt
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
                add_special_tokens=not getattr(self.tokenizer, "chat_template", None),
            ).to(self.device)
            logits = self.model(**batch).logits.float()
            out.extend(logits[:, 0].tolist())
        with self._lock:
            self.counts["sequences_scored"] += len(texts)
        return finite_scores(f"{type(self).__name__} ({self.path})", out)

    def _verdict(self, a: float, b: float) -> Judgement:
        if abs(a - b) <= self.epsilon:
            return Judgement(Verdict.TIE, None, f"rewards {a:.4g} vs {b:.4g} within epsilon")
        verdict = Verdict.PERTURBED_BETTER if b > a else Verdict.CURRENT_BETTER
        confidence = 1.0 / (1.0 + math.exp(-abs(b - a)))  # Bradley-Terry probability
        return Judgement(verdict, confidence, f"rewards current {a:.4g}, perturbed {b:.4g}")

    def score(self, prompts: Sequence[str], texts: Sequence[str]) -> list[float]:
        """The reward of each (prompt, text)."""
        return self.rewards(list(prompts), list(texts)) if texts else []

    def judge(self, prompt: str, current: str, perturbed: str) -> Judgement:
        """PERTURBED_BETTER when ``perturbed`` earns a reward more than ``epsilon`` higher."""
        return self.judge_batch([(prompt, current, perturbed)])[0]

    def judge_batch(self, items: list[tuple[str, str, str]]) -> list[Judgement]:
        """Judges many (prompt, current, perturbed) triples with batched forward passes."""
        out: list[Judgement | None] = [None] * len(items)
        todo = []
        for i, (_, current, perturbed) in enumerate(items):
            if current == perturbed:
                out[i] = Judgement(Verdict.TIE, 1.0, "identical responses")
                with self._lock:
                    self.counts["identical"] += 1
            else:
                todo.append(i)
        if todo:
            prompts = [items[i][0] for i in todo]
            rewards = self.rewards(
                prompts + prompts, [items[i][1] for i in todo] + [items[i][2] for i in todo]
            )
            n = len(todo)
            for j, i in enumerate(todo):
                out[i] = self._verdict(rewards[j], rewards[n + j])
            with self._lock:
                self.counts["calls"] += n
        return out  # type: ignore[return-value]

    def usage(self) -> dict[str, int]:
        """Counters for ``metrics.json``."""
        with self._lock:
            return dict(self.counts)
