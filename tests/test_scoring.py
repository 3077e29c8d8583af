"""Sequence log-probabilities against a direct per-token computation."""

from __future__ import annotations

import torch

from compo.encoding import encode_pairs
from compo.scoring import score_pairs, score_sequences, token_logps
from compo.types import PreferencePair


def _direct(model, prompt, response):
    """log pi(response | prompt) from one unpadded full forward pass, token by token."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logps = torch.log_softmax(model(ids).logits.float(), dim=-1)[0]
    return sum(logps[len(prompt) - 1 + k, tok].item() for k, tok in enumerate(response))


PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16, 17]]
RESPONSES = [[20, 21, 22], [30, 31, 32, 33, 34], [40]]


def test_matches_direct_per_token_computation(tiny):
    model, tokenizer = tiny
    scores = score_sequences(model, PROMPTS, RESPONSES, tokenizer.pad_token_id, batch_size=2)
    expected = torch.tensor([_direct(model, p, r) for p, r in zip(PROMPTS, RESPONSES, strict=True)])
    torch.testing.assert_close(scores.sum_logps, expected, atol=1e-4, rtol=0)
    assert scores.n_tokens.tolist() == [3, 5, 1]
    torch.testing.assert_close(scores.mean_logps, expected / torch.tensor([3.0, 5.0, 1.0]))
    assert scores.sum_logps.dtype == torch.float32 and not scores.sum_logps.requires_grad


def test_left_and_right_padding_and_batch_size_agree(tiny):
    model, tokenizer = tiny
    results = [
        score_sequences(
            model, PROMPTS, RESPONSES, tokenizer.pad_token_id, batch_size=b, padding_side=s
        )
        for b in (1, 3)
        for s in ("left", "right")
    ]
    for other in results[1:]:
        torch.testing.assert_close(other.sum_logps, results[0].sum_logps, atol=1e-5, rtol=0)


def test_hidden_states_reproduce_the_scores(tiny):
    model, tokenizer = tiny
    scores = score_sequences(model, PROMPTS, RESPONSES, tokenizer.pad_token_id, return_hidden=True)
    assert scores.hidden.shape == (9, model.config.hidden_size)
    assert scores.seq_index.tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 2]
    assert scores.targets.tolist() == [t for r in RESPONSES for t in r]
    per_token = token_logps(scores.hidden, model.lm_head.weight, scores.targets)
    sums = torch.zeros(3).index_add_(0, scores.seq_index, per_token)
    torch.testing.assert_close(sums, scores.sum_logps, atol=1e-5, rtol=0)


def test_gradients_flow_only_when_asked(tiny):
    model, tokenizer = tiny
    scores = score_sequences(model, PROMPTS, RESPONSES, tokenizer.pad_token_id, requires_grad=True)
    scores.sum_logps.sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


def test_chat_template_and_plain_paths_both_score(tiny):
    model, tokenizer = tiny
    pair = PreferencePair("x", "Say hi.", "Hi!", "No.")
    for mode in ("always", "never"):
        (enc,), _ = encode_pairs([pair], tokenizer, 128, 64, chat_template=mode)
        chosen, rejected = score_pairs(model, [enc], tokenizer.pad_token_id)
        torch.testing.assert_close(
            chosen.sum_logps[0].item(),
            _direct(model, enc.prompt_ids, enc.chosen_ids),
            atol=1e-4,
            rtol=0,
        )
        torch.testing.assert_close(
            rejected.sum_logps[0].item(),
            _direct(model, enc.prompt_ids, enc.rejected_ids),
            atol=1e-4,
            rtol=0,
        )


def test_score_pairs_splits_hidden_states_per_side(tiny, easy_encoded):
    model, tokenizer = tiny
    chosen, rejected = score_pairs(model, easy_encoded, tokenizer.pad_token_id, return_hidden=True)
    assert chosen.hidden.shape[0] == sum(len(p.chosen_ids) for p in easy_encoded)
    assert rejected.seq_index.max().item() == len(easy_encoded) - 1
    assert rejected.targets.tolist() == [t for p in easy_encoded for t in p.rejected_ids]


def test_head_logps_sum_the_tokens_both_replies_share(tiny, easy_encoded):
    model, tokenizer = tiny
    chosen, rejected = score_pairs(model, easy_encoded, tokenizer.pad_token_id)
    for i, pair in enumerate(easy_encoded):
        shared = min(len(pair.chosen_ids), len(pair.rejected_ids))
        for side, ids in ((chosen, pair.chosen_ids), (rejected, pair.rejected_ids)):
            head = score_sequences(
                model, [pair.prompt_ids], [ids[:shared]], tokenizer.pad_token_id
            ).sum_logps[0]
            torch.testing.assert_close(side.head_logps[i], head, rtol=1e-5, atol=1e-5)


def test_output_layer_stays_fp32_under_autocast():
    # dpo.bf16 runs the model under bf16 autocast: the log-softmax over the vocabulary must not.
    gen = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(5, 16, generator=gen), torch.randn(300, 16, generator=gen)
    targets = torch.randint(0, 300, (5,), generator=gen)
    exact = token_logps(hidden, weight, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = token_logps(hidden, weight, targets)
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, exact, rtol=0, atol=1e-6)
