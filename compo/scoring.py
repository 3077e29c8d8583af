"""Sequence log-probabilities: the one place every stage computes log pi(y|x).

The model runs once per padded batch up to its final hidden states; the output layer and the
log-softmax are then applied at response positions only, in fp32 and in chunks, so a 49k-token
vocabulary never materialises logits for prompt or padding positions. The hidden states that feed
the output layer can be returned as well: within a ComPO iteration only the output layer changes,
so the zeroth-order optimizer reuses them for every perturbation (see :func:`token_logps`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from compo.errors import ModelLoadError

# Configs of architectures whose logits are not simply the output layer of the last hidden state.
_UNSUPPORTED_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier_scale",
)


@dataclass
class SequenceScores:
    """Scores of a batch of (prompt, response) sequences.

    Attributes:
        sum_logps: Sum of log pi(y_t | x, y_<t) over response tokens, shape (B,), fp32.
        mean_logps: ``sum_logps / n_tokens`` (the length-normalised score), shape (B,).
        n_tokens: Response tokens per sequence, shape (B,).
        hidden: If requested, the final hidden states that predict each response token, all
            sequences concatenated in order, shape (N, d) with N = n_tokens.sum(), fp32.
        targets: The response token each row of ``hidden`` predicts, shape (N,).
        seq_index: Which sequence each row belongs to, shape (N,).
        head_logps: If requested, the sum over each response's first ``head_tokens`` tokens
            (for a pair: the length both replies share, see :func:`score_pairs`), shape (B,).
    """

    sum_logps: Tensor
    mean_logps: Tensor
    n_tokens: Tensor
    hidden: Tensor | None = None
    targets: Tensor | None = None
    seq_index: Tensor | None = None
    head_logps: Tensor | None = None

    def take(self, rows: Sequence[int] | slice) -> SequenceScores:
        """The scores of the sequences at ``rows`` (per-token fields are not kept)."""
        index = rows if isinstance(rows, slice) else torch.tensor(list(rows), dtype=torch.long)
        head = self.head_logps[index] if self.head_logps is not None else None
        return SequenceScores(
            self.sum_logps[index], self.mean_logps[index], self.n_tokens[index], head_logps=head
        )


def output_layer(model: torch.nn.Module) -> tuple[Tensor, Tensor | None]:
    """Returns (weight, bias) of the model's output layer, rejecting logit post-processing."""
    for name in _UNSUPPORTED_LOGIT_TRANSFORMS:
        if getattr(model.config, name, None) not in (None, 1, 1.0):
            raise ModelLoadError(
                f"{type(model).__name__} applies {name} to its logits; compo's scoring assumes "
                "logits = output_layer(last hidden state)"
            )
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def token_logps(
    hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None, chunk: int = 1024
) -> Tensor:
    """log softmax(hidden @ weight.T + bias)[targets] per row, in fp32, ``chunk`` rows at a time.

    Args:
        hidden: (N, d) hidden states.
        weight: (V, d) output-layer weight.
        targets: (N,) token ids.
        bias: Optional (V,) bias.
        chunk: Rows per matmul; bounds the (chunk, V) logits buffer.

    Returns:
        (N,) fp32 log-probabilities.
    """
    weight = weight.float()
    bias = bias.float() if bias is not None else None
    out = []
    # Under autocast (dpo.bf16, a low-precision trunk) the matmul would run in bf16: log-probs
    # off by ~0.05 nats. The output layer is computed in fp32 whatever the caller's context.
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, hidden.shape[0], chunk):
            logits = F.linear(hidden[start : start + chunk].float(), weight, bias)
            rows = targets[start : start + chunk]
            # gather - logsumexp is log_softmax at one column, without a second (chunk, V) buffer.
            out.append(logits.gather(-1, rows[:, None]).squeeze(-1) - logits.logsumexp(-1))
    if not out:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(out)


def segment_sum(values: Tensor, seq_index: Tensor, n_seqs: int) -> Tensor:
    """Sums ``values`` (N,) or (K, N) into (n_seqs,) or (K, n_seqs) buckets by ``seq_index``."""
    shape = (*values.shape[:-1], n_seqs)
    index = seq_index.expand_as(values)
    return torch.zeros(shape, dtype=values.dtype, device=values.device).scatter_add_(
        -1, index, values
    )


def _pad(sequences: list[list[int]], pad_id: int, side: str) -> tuple[Tensor, Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        cols = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, cols] = torch.tensor(seq, dtype=torch.long)
        mask[row, cols] = 1
    return ids, mask


def score_sequences(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_token_id: int,
    batch_size: int = 8,
    padding_side: str = "right",
    requires_grad: bool = False,
    return_hidden: bool = False,
    head_tokens: Sequence[int] | None = None,
    chunk: int = 1024,
    desc: str | None = None,
) -> SequenceScores:
    """Scores response tokens given their prompts under ``model``.

    Sequences are grouped by length (less padding) and returned in input order.

    Args:
        model: A causal LM whose logits are ``output_layer(last hidden state)``.
        prompts: Token ids of each prompt (non-empty).
        responses: Token ids of each response (non-empty).
        pad_token_id: Fills padding (masked out; its value does not matter).
        batch_size: Sequences per forward pass.
        padding_side: ``right`` or ``left``; both give the same numbers.
        requires_grad: Keep the autograd graph (training); otherwise runs under ``no_grad``.
        return_hidden: Also return the hidden states feeding the output layer.
        head_tokens: Also return the sum over each response's first ``head_tokens[i]`` tokens.
        chunk: Rows per output-layer matmul.
        desc: Show a progress bar over batches with this label (None: no bar).

    Returns:
        The scores, in input order.
    """
    if len(prompts) != len(responses):
        raise ValueError("prompts and responses differ in length")
    if any(len(p) == 0 for p in prompts) or any(len(r) == 0 for r in responses):
        raise ValueError("every prompt and response needs at least one token")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    weight, bias = output_layer(model)
    decoder = model.get_decoder()
    device = weight.device
    order = sorted(range(len(prompts)), key=lambda i: -(len(prompts[i]) + len(responses[i])))
    sums: list[Tensor] = []
    heads: list[Tensor] = []
    pieces: list[tuple[Tensor, Tensor, Tensor]] = []
    starts = range(0, len(order), batch_size)
    bar = tqdm(starts, desc=desc, disable=desc is None, leave=False)
    # A context manager: an interrupt mid-pass leaves no half-drawn bar before its message.
    with torch.set_grad_enabled(requires_grad), bar:
        for start in bar:
            rows = order[start : start + batch_size]
            seqs = [list(prompts[i]) + list(responses[i]) for i in rows]
            ids, mask = _pad(seqs, pad_token_id, padding_side)
            is_response = torch.zeros_like(mask, dtype=torch.bool)
            for r, i in enumerate(rows):
                end = ids.shape[1] if padding_side == "left" else len(seqs[r])
                is_response[r, end - len(responses[i]) : end] = True
            ids, mask, is_response = ids.to(device), mask.to(device), is_response.to(device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            hidden = decoder(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False
            ).last_hidden_state
            # The hidden state at position j predicts the token at j + 1.
            predicts = is_response[:, 1:]
            h = hidden[:, :-1][predicts]
            targets = ids[:, 1:][predicts]
            local_seq = torch.arange(len(rows), device=device)[:, None].expand_as(predicts)[
                predicts
            ]
            logps = token_logps(h, weight, targets, bias, chunk)
            sums.append(segment_sum(logps, local_seq, len(rows)))
            if head_tokens is not None:
                # 1-based position of each predicted token within its response.
                position = predicts.cumsum(-1)[predicts]
                limit = torch.tensor([head_tokens[i] for i in rows], device=device)[local_seq]
                heads.append(segment_sum(logps * (position <= limit), local_seq, len(rows)))
            if return_hidden:
                global_seq = torch.tensor(rows, device=device)[local_seq]
                pieces.append((h.float(), targets, global_seq))
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    inverse = inverse.to(device)
    sum_logps = torch.cat(sums)[inverse]
    n_tokens = torch.tensor([len(r) for r in responses], device=device)
    scores = SequenceScores(sum_logps, sum_logps / n_tokens, n_tokens)
    if head_tokens is not None:
        scores.head_logps = torch.cat(heads)[inverse]
    if return_hidden:
        h = torch.cat([p[0] for p in pieces])
        targets = torch.cat([p[1] for p in pieces])
        seq = torch.cat([p[2] for p in pieces])
        # Back to input order, keeping token order within each sequence (stable sort).
        perm = torch.sort(seq, stable=True).indices
        scores.hidden, scores.targets, scores.seq_index = h[perm], targets[perm], seq[perm]
    return scores


def score_pairs(model: torch.nn.Module, pairs: Sequence, pad_token_id: int, **kwargs):
    """Scores the replies of encoded pairs (or of unpaired examples), all in one pass.

    Args:
        model: The causal LM.
        pairs: :class:`compo.encoding.EncodedPair` items, or ``EncodedExample`` items (one kind).
        pad_token_id: Padding id.
        **kwargs: Passed to :func:`score_sequences`.

    Returns:
        ``(chosen_scores, rejected_scores)`` of pairs; ``(completion_scores,)`` of examples.
    """
    k = len(pairs[0].replies) if pairs else 2
    prompts = [p.prompt_ids for p in pairs]
    # The length both replies of a pair share: what length-desensitised losses (ld_alpha) weigh
    # in full, the rest of the longer reply being down-weighted.
    shared = [min(len(reply) for reply in p.replies) for p in pairs]
    both = score_sequences(
        model,
        prompts * k,
        [p.replies[j] for j in range(k) for p in pairs],
        pad_token_id,
        head_tokens=shared * k,
        **kwargs,
    )
    n = len(pairs)
    return tuple(_take(both, slice(j * n, (j + 1) * n), j * n) for j in range(k))


def _take(scores: SequenceScores, rows: slice, offset: int) -> SequenceScores:
    out = scores.take(rows)
    if scores.hidden is not None:
        keep = (scores.seq_index >= rows.start) & (scores.seq_index < rows.stop)
        out.hidden = scores.hidden[keep]
        out.targets = scores.targets[keep]
        out.seq_index = scores.seq_index[keep] - offset
    return out


# Rows scored before a checkpoint is written: enough to see a diverged output layer, a second
# on SmolLM2.
DIVERGENCE_ROWS = 4


def divergence(model: torch.nn.Module, encoded: Sequence, pad_token_id: int) -> str | None:
    """Why a trained model's outputs are broken although its weights are finite, or None.

    An output layer scaled up far enough (a huge ComPO step) keeps finite weights, but its logits
    overflow: the log-probs are -inf or NaN, or finite and absurd (-1e30 per token). The first
    :data:`DIVERGENCE_ROWS` training rows are scored; their mean log-prob per token must be
    finite and no lower than ten times a uniform guess's, ``-10 log V``.

    Args:
        model: The trained causal LM.
        encoded: Encoded training pairs (or unpaired examples).
        pad_token_id: Padding id.
    """
    sample = list(encoded[:DIVERGENCE_ROWS])
    if not sample:
        return None
    scores = score_pairs(model, sample, pad_token_id)
    logps = torch.cat([s.sum_logps for s in scores])
    per_token = float(logps.sum() / torch.cat([s.n_tokens for s in scores]).sum())
    floor = -10 * math.log(output_layer(model)[0].shape[0])
    if math.isfinite(per_token) and per_token >= floor:
        return None
    return (
        f"its mean log-prob per token on {len(sample)} training rows is {per_token:.3g} "
        f"(a uniform guess: {floor / 10:.3g})"
    )
