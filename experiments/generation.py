"""Batched, seeded answers of a chat model: the one generation loop of the experiment scripts.

Used by ``experiments/benchmark/generate.py`` (the benchmark's responses), ``heldout.py`` (greedy
held-out answers) and ``experiments/make_default_data.py`` (the rule-labelled set). Prompts go
through the chat template with a generation prompt, batches are left-padded, and a sampled batch
is seeded from (seed, batch index) inside ``torch.random.fork_rng``, so the same arguments give the
same answers and the caller's global RNG is left untouched. Batch composition changes padding and
the sampling stream, so ``batch_rows`` is part of what determines the answers.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

TEMPERATURE, TOP_P = 0.8, 0.95  # sampling settings of every sampled answer in experiments/


def batch_seed(seed: int, batch: int) -> int:
    """A per-batch seed from (seed, batch index); the large odd multiplier keeps streams apart."""
    return (seed * 1_000_003 + batch) % (2**63)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    n: int,
    max_new_tokens: int,
    sample: bool,
    seed: int,
    batch_rows: int = 16,
) -> list[list[tuple[str, bool]]]:
    """Answers every prompt ``n`` times, greedily or by sampling (``TEMPERATURE``, ``TOP_P``).

    Args:
        model: A causal LM (``generate`` API).
        tokenizer: Its tokenizer, with a chat template.
        prompts: User messages, one per prompt.
        n: Answers per prompt (1 for greedy decoding).
        max_new_tokens: Longest answer in tokens.
        sample: Sample (no top-k) instead of greedy decoding.
        seed: Seeds the per-batch sampling streams.
        batch_rows: Sequences per ``generate`` call: ``batch_rows // n`` prompts, ``n`` each.

    Returns:
        Per prompt, its answers in generation order as (text, finished): text up to the
        end-of-turn token, stripped; ``finished`` is False when the token limit cut it.
    """
    tokenizer.padding_side = "left"  # generation continues from the last column
    eos = tokenizer.eos_token_id
    per_batch = max(1, batch_rows // n)
    out = []
    starts = range(0, len(prompts), per_batch)
    for batch, start in enumerate(tqdm(starts, desc="sample" if sample else "greedy", leave=False)):
        chunk = prompts[start : start + per_batch]
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
            )
            for p in chunk
        ]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        if sample:
            kwargs |= dict(
                do_sample=True,
                temperature=TEMPERATURE,
                top_p=TOP_P,
                top_k=0,  # transformers would otherwise add top_k=50
                num_return_sequences=n,
            )
        else:
            kwargs |= dict(do_sample=False)
        # generate() samples from the global generator: fork it so nothing leaks out.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(batch_seed(seed, batch))
            ids = model.generate(**enc, **kwargs)[:, enc["input_ids"].shape[1] :]
        for row in range(len(chunk)):
            answers = []
            for k in range(n):
                tokens = ids[row * n + k].tolist()
                finished = eos in tokens
                tokens = tokens[: tokens.index(eos)] if finished else tokens
                text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
                answers.append((text, finished))
            out.append(answers)
    return out
