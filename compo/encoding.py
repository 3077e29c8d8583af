"""Tokenization of preference pairs and unpaired examples: chat templates, truncation.

A pair becomes token ids of its prompt (rendered with the tokenizer's chat template and a
generation prompt, or as a plain transcript) and of each reply followed by the end-of-sequence
token; an unpaired example the same with its one reply. Prompts are cut from the left (the oldest
turns go first), replies from the right. Both encoded kinds list their replies in ``replies``, so
scoring (:func:`compo.scoring.score_pairs`) and the first-order stage treat them alike.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from compo.errors import DataError
from compo.types import Message, PreferencePair, UnpairedExample

log = logging.getLogger(__name__)

CHAT_TEMPLATE_MODES = ("auto", "always", "never")


@dataclass
class EncodedPair:
    """Token ids of one pair: the prompt and each reply (with its end-of-turn token)."""

    pair_id: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    @property
    def replies(self) -> tuple[list[int], list[int]]:
        """(chosen, rejected): scored in this order."""
        return self.chosen_ids, self.rejected_ids


@dataclass
class EncodedExample:
    """Token ids of one unpaired example: the prompt and its reply (with its end-of-turn token)."""

    example_id: str
    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool

    @property
    def replies(self) -> tuple[list[int]]:
        return (self.completion_ids,)


def labels_of(encoded: list[EncodedPair] | list[EncodedExample]) -> list[bool] | None:
    """The labels of unpaired examples (true: desirable), or None for preference pairs."""
    if encoded and isinstance(encoded[0], EncodedExample):
        return [e.label for e in encoded]
    return None


@dataclass
class TruncationReport:
    """What truncation changed; the counts of the other kind of data are None (not reported)."""

    n_prompt_truncated: int = 0
    n_chosen_truncated: int | None = 0
    n_rejected_truncated: int | None = 0
    n_identical_after_truncation: int | None = 0
    n_completion_truncated: int | None = None

    def as_metrics(self) -> dict[str, int]:
        return {k: v for k, v in vars(self).items() if v is not None}


def prompt_text(prompt: str | list[Message], tokenizer: Any, use_template: bool) -> str:
    """Renders a prompt for the model: its chat template with a generation prompt, or plain text."""
    if use_template:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if isinstance(prompt, str):
        return prompt
    # No template: a plain, documented transcript format.
    return "".join(f"{m['role']}: {m['content']}\n" for m in prompt) + "assistant: "


def use_chat_template(tokenizer: Any, mode: str) -> bool:
    """Resolves ``data.chat_template`` (auto / always / never) for a tokenizer."""
    if mode not in CHAT_TEMPLATE_MODES:
        raise DataError(f"data.chat_template: {mode!r} is not one of {list(CHAT_TEMPLATE_MODES)}")
    has = bool(getattr(tokenizer, "chat_template", None))
    if mode == "always" and not has:
        raise DataError("data.chat_template=always, but the tokenizer has no chat template")
    return has and mode != "never"


def _prompt_ids(prompt, tokenizer, templated: bool, max_prompt_length: int) -> tuple[list, bool]:
    """A prompt's token ids, cut from the left to ``max_prompt_length``, and whether it was cut."""
    text = prompt_text(prompt, tokenizer, templated)
    ids = tokenizer(text, add_special_tokens=not templated)["input_ids"]
    return list(ids[-max_prompt_length:]), len(ids) > max_prompt_length


def _check_lengths(max_length: int, max_prompt_length: int) -> None:
    if not 0 < max_prompt_length < max_length:
        raise DataError(
            f"data: need 0 < max_prompt_length ({max_prompt_length}) < max_length ({max_length})"
        )


def encode_pairs(
    pairs: list[PreferencePair],
    tokenizer: Any,
    max_length: int = 512,
    max_prompt_length: int = 256,
    chat_template: str = "auto",
) -> tuple[list[EncodedPair], TruncationReport]:
    """Tokenizes pairs, truncating the prompt from the left and replies from the right.

    Replies end with the tokenizer's end-of-sequence token (the end of the assistant turn), so
    training also teaches the model where to stop.

    Args:
        pairs: Validated pairs.
        tokenizer: A Hugging Face tokenizer.
        max_length: Longest prompt + reply, in tokens.
        max_prompt_length: Longest prompt; the oldest tokens go first.
        chat_template: ``auto`` uses the tokenizer's template when it has one.

    Returns:
        The encoded pairs (same order) and counts of what truncation changed.
    """
    _check_lengths(max_length, max_prompt_length)
    templated = use_chat_template(tokenizer, chat_template)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    report = TruncationReport()
    encoded = []
    for pair in pairs:
        prompt_ids, cut = _prompt_ids(pair.prompt, tokenizer, templated, max_prompt_length)
        report.n_prompt_truncated += cut
        budget = max_length - len(prompt_ids)
        replies = []
        for name, reply in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            ids = tokenizer(reply, add_special_tokens=False)["input_ids"] + eos
            if len(ids) > budget:
                ids = ids[:budget]
                setattr(report, f"n_{name}_truncated", getattr(report, f"n_{name}_truncated") + 1)
            replies.append(ids)
        if replies[0] == replies[1]:
            report.n_identical_after_truncation += 1
        encoded.append(EncodedPair(pair.id, list(prompt_ids), replies[0], replies[1]))
    if report.n_identical_after_truncation:
        log.warning(
            "%d pairs have identical replies after truncation (they carry no preference signal); "
            "raise data.max_length to keep them apart",
            report.n_identical_after_truncation,
        )
    return encoded, report


def encode_examples(
    examples: list[UnpairedExample],
    tokenizer: Any,
    max_length: int = 512,
    max_prompt_length: int = 256,
    chat_template: str = "auto",
) -> tuple[list[EncodedExample], TruncationReport]:
    """Tokenizes unpaired examples as :func:`encode_pairs` tokenizes pairs (same truncation).

    Returns:
        The encoded examples (same order) and counts of what truncation changed.
    """
    _check_lengths(max_length, max_prompt_length)
    templated = use_chat_template(tokenizer, chat_template)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    report = TruncationReport(
        n_chosen_truncated=None,
        n_rejected_truncated=None,
        n_identical_after_truncation=None,
        n_completion_truncated=0,
    )
    encoded = []
    for example in examples:
        prompt_ids, cut = _prompt_ids(example.prompt, tokenizer, templated, max_prompt_length)
        report.n_prompt_truncated += cut
        ids = tokenizer(example.completion, add_special_tokens=False)["input_ids"] + eos
        budget = max_length - len(prompt_ids)
        if len(ids) > budget:
            ids = ids[:budget]
            report.n_completion_truncated += 1
        encoded.append(EncodedExample(example.id, prompt_ids, ids, example.label))
    return encoded, report


def encode_rows(
    rows: list[PreferencePair] | list[UnpairedExample], tokenizer: Any, *args: Any, **kwargs: Any
) -> tuple[list[EncodedPair] | list[EncodedExample], TruncationReport]:
    """:func:`encode_pairs` or :func:`encode_examples`, by the kind of ``rows`` (one per file)."""
    unpaired = bool(rows) and isinstance(rows[0], UnpairedExample)
    return (encode_examples if unpaired else encode_pairs)(rows, tokenizer, *args, **kwargs)
