"""Fast, exact log-probability changes under perturbations of the output layer.

Within one ComPO iteration only the perturbed weights change, so the hidden states H feeding the
output layer are computed once (:func:`compo.scoring.score_pairs`). For W + dZ, the logits at
response positions are H W^T + H dZ^T; with p0 = softmax(H W^T) cached, the change of a token's
log-prob is

    D[target] - log(sum_j p0_j exp(D_j)),   D = H dZ^T,

computed as ``log1p(sum_j p0_j expm1(D_j))``: the difference itself, not two large log-probs
subtracted, so it keeps full precision for radii like 5e-4 (a full forward of W + dZ does not).
Each perturbation costs one (N, d) x (d, V) matmul and O(N V) elementwise work; low-rank directions
cost O(N (V + d)) for the product. With extra perturbed modules, the decoder's state is cached at
the input of the first decoder layer holding one, and only the layers from there on are replayed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from compo.errors import CompoError
from compo.scoring import score_pairs, score_sequences, segment_sum, token_logps
from compo.zo.directions import DirectionBatch, RowsPiece
from compo.zo.scope import Scope

# Below this |D|, log1p/expm1 is both exact and overflow-free; above it use plain logsumexp.
_SMALL = 1.0


class HeadEvaluator:
    """Caches one iteration's hidden states and scores perturbations of the scope against them.

    Args:
        batch_size: Sequences per forward pass when caching.
        chunk: Rows per output-layer matmul when caching.
    """

    def __init__(self, batch_size: int = 8, chunk: int = 1024) -> None:
        self.batch_size, self.chunk = batch_size, chunk
        self.scope: Scope | None = None
        self._limit = None

    # ------------------------------------------------------------------ caching
    @torch.no_grad()
    def begin(self, model, scope: Scope, pairs: Sequence, pad_token_id: int) -> Tensor:
        """Caches H and p0 for ``pairs`` at the current master weights.

        Returns:
            (2n,) current summed log-probs: chosen replies first, then rejected ones.
        """
        self.n_pairs = len(pairs)
        self.tail = None if scope.head_only else _Tail(model, scope, pairs, pad_token_id)
        if self.tail is not None:
            hidden, targets, seq_index = self.tail.hidden(None)
        else:
            chosen, rejected = score_pairs(
                model,
                pairs,
                pad_token_id,
                batch_size=self.batch_size,
                chunk=self.chunk,
                return_hidden=True,
            )
            hidden = torch.cat([chosen.hidden, rejected.hidden])
            targets = torch.cat([chosen.targets, rejected.targets])
            seq_index = torch.cat([chosen.seq_index, rejected.seq_index + len(pairs)])
        return self._cache(scope, hidden, targets, seq_index, 2 * len(pairs))

    @torch.no_grad()
    def for_sequences(
        self, model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad: int
    ) -> HeadEvaluator:
        """A new evaluator over other (prompt, response) sequences at the same current weights.

        Oracles that score their own samples (:mod:`oracles.sample_scored`) use it to get exact
        log-prob changes of those samples under each perturbation. Output layer only.
        """
        if not self.scope.head_only:
            raise CompoError(
                "scoring sampled responses supports perturbing the output layer only "
                "(optimizer.modules must be empty)"
            )
        scores = score_sequences(
            model,
            prompts,
            responses,
            pad,
            batch_size=self.batch_size,
            chunk=self.chunk,
            return_hidden=True,
        )
        other = HeadEvaluator(self.batch_size, self.chunk)
        other.n_pairs, other.tail = 0, None
        other._cache(self.scope, scores.hidden, scores.targets, scores.seq_index, len(prompts))
        return other

    def _cache(self, scope: Scope, hidden, targets, seq_index, n_seqs: int) -> Tensor:
        self.scope, self.n_seqs = scope, n_seqs
        self.hidden, self.targets, self.seq_index = hidden.float(), targets, seq_index
        self.bias = scope.head_bias.float() if scope.head_bias is not None else None
        logp = F.log_softmax(F.linear(self.hidden, scope.head.master, self.bias), dim=-1)
        self.token_logps0 = logp.gather(-1, targets[:, None]).squeeze(-1)
        self.p0 = logp.exp_()
        self.base = segment_sum(self.token_logps0, seq_index, n_seqs)
        self._limit = None  # computed on first use, for this cached state only
        return self.base

    def support(self, top_k: int) -> Tensor:
        """Output-layer rows of the pairs' tokens plus the top-k predicted ones (sorted)."""
        top = self.p0.topk(min(top_k, self.p0.shape[-1]), dim=-1).indices.flatten()
        return torch.unique(torch.cat([self.targets, top]))

    # ------------------------------------------------------------------ perturbations
    @torch.no_grad()
    def deltas(self, batch: DirectionBatch) -> Tensor:
        """Change of each sequence's log-prob under each perturbation: (k, n_seqs)."""
        rows = []
        for i in range(len(batch)):
            if self.tail is not None:
                token_delta = self._tail_delta(batch, i)
            else:
                token_delta = self._head_delta(batch, i)
            rows.append(segment_sum(token_delta, self.seq_index, self.n_seqs))
        return torch.stack(rows)

    def _head_delta(self, batch: DirectionBatch, i: int) -> Tensor:
        piece = batch.pieces[0]
        d = piece.hidden_product(self.hidden, i).mul_(batch.coef[i])
        if isinstance(piece, RowsPiece):
            # Columns outside the support have D = 0, so they drop out of sum p0 expm1(D).
            p0 = self.p0[:, piece.rows]
            target_cols = torch.searchsorted(piece.rows, self.targets)
        else:
            p0, target_cols = self.p0, self.targets
        target = d.gather(-1, target_cols[:, None]).squeeze(-1)
        if d.abs().max() < _SMALL:
            shift = torch.log1p((p0 * torch.expm1(d)).sum(-1))
        else:
            shift = torch.logsumexp(torch.log(p0) + d, dim=-1)
        return target - shift

    def _tail_delta(self, batch: DirectionBatch, i: int) -> Tensor:
        dense = batch.dense(i)
        weights = [m + z for m, z in zip(self.scope.masters(), dense, strict=True)]
        hidden, _, _ = self.tail.hidden(weights[1:])
        logps = token_logps(hidden.float(), weights[0], self.targets, self.bias, self.chunk)
        return logps - self.token_logps0

    # ------------------------------------------------------------------ gradients
    def gradients(self) -> tuple[list[Tensor], list[Tensor]]:
        """Gradients of sum log pi(y+|x) and of sum log pi(y-|x) over the perturbed blocks.

        Two backward passes from the cached state (the head alone, or the replayed tail).
        """
        n = self.n_pairs
        ones = torch.ones(n, device=self.hidden.device)
        zeros = torch.zeros(n, device=self.hidden.device)
        chosen, rejected = self._gradients([torch.cat([ones, zeros]), torch.cat([zeros, ones])])
        return chosen, rejected

    def limit(self):
        """The likelihood oracle's r -> 0 limit on the cached pairs (:func:`limit_direction`).

        Computed once per cached state: the optimizer's trace and the ``expected`` estimator both
        ask for it in the same iteration, and it costs two backward passes.
        """
        from compo.zo.estimator import limit_direction  # estimator imports this module

        if self._limit is None:
            self._limit = limit_direction(self)
        return self._limit

    def gradient(self, weights: Tensor) -> list[Tensor]:
        """Gradient of sum_j weights_j log pi(seq_j) over the perturbed blocks (one backward)."""
        return self._gradients([weights])[0]

    def _gradients(self, rows: Sequence[Tensor]) -> list[list[Tensor]]:
        """One forward from the cached state, then one backward per row of sequence weights."""
        leaves = [m.detach().clone().requires_grad_(True) for m in self.scope.masters()]
        out = []
        with torch.enable_grad():
            if self.tail is None:
                hidden = self.hidden
            else:
                hidden, _, _ = self.tail.hidden(leaves[1:])
            logps = token_logps(hidden.float(), leaves[0], self.targets, self.bias, self.chunk)
            seqs = segment_sum(logps, self.seq_index, self.n_seqs)
            for k, weights in enumerate(rows):
                grads = torch.autograd.grad(
                    (seqs * weights.to(seqs)).sum(),
                    leaves,
                    retain_graph=k < len(rows) - 1,
                    allow_unused=True,
                )
                out.append(
                    [
                        torch.zeros_like(m) if g is None else g
                        for m, g in zip(leaves, grads, strict=True)
                    ]
                )
        return out


class _Tail:
    """Replays the decoder from the first layer holding a perturbed parameter.

    The input of that layer (and its keyword arguments: masks, rotary embeddings) is captured
    once by a forward pre-hook; each perturbation then runs only the layers from there on.
    """

    def __init__(self, model, scope: Scope, pairs: Sequence, pad_token_id: int) -> None:
        decoder = model.get_decoder()
        self.layers = list(decoder.layers)
        self.norm = decoder.norm
        prefix = _decoder_prefix(model, decoder)
        starts = []
        self.owners: list[tuple[int, str]] = []  # (layer index or -1 for norm, local name)
        for block in scope.blocks[1:]:
            local = block.name[len(prefix) :] if block.name.startswith(prefix) else block.name
            parts = local.split(".")
            if parts[0] == "layers":
                starts.append(int(parts[1]))
                self.owners.append((int(parts[1]), ".".join(parts[2:])))
            elif parts[0] == "norm":
                self.owners.append((-1, ".".join(parts[1:])))
            else:
                raise ValueError(f"cannot replay from {block.name!r}: not a decoder layer or norm")
        self.start = min(starts, default=len(self.layers))
        self.dtype = scope.head.param.dtype
        seqs, responses = [], []
        for p in pairs:
            for reply in (p.chosen_ids, p.rejected_ids):
                seqs.append(list(p.prompt_ids) + list(reply))
                responses.append(len(reply))
        order = [i for half in (0, 1) for i in range(half, len(seqs), 2)]  # chosen, then rejected
        seqs = [seqs[i] for i in order]
        responses = [responses[i] for i in order]
        width = max(map(len, seqs))
        device = scope.head.master.device
        ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        predicts = torch.zeros_like(ids, dtype=torch.bool)
        for r, (seq, n_resp) in enumerate(zip(seqs, responses, strict=True)):
            ids[r, : len(seq)] = torch.tensor(seq, device=device)
            mask[r, : len(seq)] = 1
            predicts[r, len(seq) - n_resp - 1 : len(seq) - 1] = True
        self.predicts = predicts
        self.targets = ids[:, 1:][predicts[:, :-1]]
        self.seq_index = torch.arange(len(seqs), device=device)[:, None].expand_as(ids)[predicts]
        captured = {}

        def grab(module, args, kwargs):
            captured["args"], captured["kwargs"] = args, kwargs

        target = self.layers[self.start] if self.start < len(self.layers) else self.norm
        handle = target.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
        finally:
            handle.remove()
        self.args, self.kwargs = captured["args"], captured["kwargs"]

    def hidden(self, weights: Sequence[Tensor] | None):
        """Hidden states at response positions with the extra blocks set to ``weights``."""
        overrides: dict[int, dict[str, Tensor]] = {}
        if weights is not None:
            for (owner, local), w in zip(self.owners, weights, strict=True):
                overrides.setdefault(owner, {})[local] = w.to(self.dtype)
        h = self.args[0]
        for index in range(self.start, len(self.layers)):
            layer = self.layers[index]
            h = functional_call(layer, overrides.get(index, {}), (h, *self.args[1:]), self.kwargs)
            h = h[0] if isinstance(h, tuple) else h
        h = functional_call(self.norm, overrides.get(-1, {}), (h,))
        return h[self.predicts], self.targets, self.seq_index


def _decoder_prefix(model, decoder) -> str:
    for name, module in model.named_modules():
        if module is decoder:
            return f"{name}." if name else ""
    return ""
