"""Perturbation directions, regenerated from (seed, iteration, index) and never stored.

A sampler turns indices into a :class:`DirectionBatch`: k directions over the perturbed
parameters (the blocks of a :class:`compo.zo.scope.Scope`), each of unit Frobenius norm over all
blocks jointly, times a per-direction coefficient (radius, sign). Each direction draws from its own
``torch.Generator`` seeded by a hash of (seed, iteration, index), so a direction does not depend on
the batch it is drawn in, on the global RNG, or on any other direction.

Families: :class:`GaussianSphere` (default, uniform on the sphere), :class:`Rademacher`,
`LowRank` (z = U V^T / ||U V^T||, so H z^T costs O(T (V + d)) instead of O(T V d)) and
:class:`SupportRestricted` (output-layer rows of the pair's tokens and the top-k predicted ones).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from compo import settings
from compo.interfaces import local_generator


class DensePiece:
    """k dense directions of one block: ``data`` (k, *shape)."""

    def __init__(self, data: Tensor) -> None:
        self.data = data

    def sq_norm(self) -> Tensor:
        return self.data.flatten(1).pow(2).sum(1)

    def hidden_product(self, hidden: Tensor, i: int) -> Tensor:
        """hidden @ z_i^T for a (V, d) block: (N, V)."""
        return hidden @ self.data[i].T

    def add_to(self, buf: Tensor, weights: Tensor) -> None:
        """buf += sum_i weights_i z_i (one at a time: no second block-sized temporary)."""
        for w, z in zip(weights.tolist(), self.data, strict=True):
            if w != 0:
                buf.add_(z, alpha=w)

    def dense(self, i: int) -> Tensor:
        return self.data[i]

    def repeat(self) -> DensePiece:
        return DensePiece(torch.cat([self.data, self.data]))


class LowRankPiece:
    """k low-rank directions of a 2-D block: z_i = U_i V_i^T with U (k, R, r), V (k, C, r)."""

    def __init__(self, u: Tensor, v: Tensor) -> None:
        self.u, self.v = u, v

    def sq_norm(self) -> Tensor:
        # ||U V^T||_F^2 = tr(U^T U V^T V): O((R + C) r^2) instead of forming R x C.
        return ((self.u.mT @ self.u) * (self.v.mT @ self.v)).sum((-2, -1))

    def hidden_product(self, hidden: Tensor, i: int) -> Tensor:
        return (hidden @ self.v[i]) @ self.u[i].T

    def add_to(self, buf: Tensor, weights: Tensor) -> None:
        k, rows, rank = self.u.shape
        u = (self.u * weights[:, None, None]).permute(1, 0, 2).reshape(rows, k * rank)
        v = self.v.permute(1, 0, 2).reshape(self.v.shape[1], k * rank)
        buf.addmm_(u, v.T)

    def dense(self, i: int) -> Tensor:
        return self.u[i] @ self.v[i].T

    def repeat(self) -> LowRankPiece:
        return LowRankPiece(torch.cat([self.u, self.u]), torch.cat([self.v, self.v]))


class RowsPiece:
    """k directions nonzero on a few rows of the output layer: ``values`` (k, S, d) at ``rows``."""

    def __init__(self, rows: Tensor, values: Tensor, n_rows: int) -> None:
        self.rows, self.values, self.n_rows = rows, values, n_rows

    def sq_norm(self) -> Tensor:
        return self.values.pow(2).sum((1, 2))

    def hidden_product(self, hidden: Tensor, i: int) -> Tensor:
        """(N, S): only the support columns of H z^T are nonzero."""
        return hidden @ self.values[i].T

    def add_to(self, buf: Tensor, weights: Tensor) -> None:
        buf.index_add_(0, self.rows, torch.tensordot(weights, self.values, dims=1))

    def dense(self, i: int) -> Tensor:
        out = self.values.new_zeros(self.n_rows, self.values.shape[-1])
        out[self.rows] = self.values[i]
        return out

    def repeat(self) -> RowsPiece:
        return RowsPiece(self.rows, torch.cat([self.values, self.values]), self.n_rows)


Piece = DensePiece | LowRankPiece | RowsPiece


@dataclass
class DirectionBatch:
    """k directions over all perturbed blocks: z_i = coef_i * (piece_0[i], piece_1[i], ...).

    Attributes:
        pieces: One entry per perturbed block, in scope order.
        coef: (k,) multipliers; after sampling, ``coef_i * ||piece[i]|| = 1`` jointly.
        indices: Which direction index each row is (for the trace and for regeneration).
    """

    pieces: list[Piece]
    coef: Tensor
    indices: list[int]

    def __len__(self) -> int:
        return self.coef.shape[0]

    def scaled(self, factor: float | Tensor) -> DirectionBatch:
        return DirectionBatch(self.pieces, self.coef * factor, self.indices)

    def antithetic(self) -> DirectionBatch:
        """(z_1..z_k, -z_1..-z_k): the pieces are shared, only the signs differ."""
        pieces = [p.repeat() for p in self.pieces]
        return DirectionBatch(pieces, torch.cat([self.coef, -self.coef]), self.indices * 2)

    def accumulate(self, buffers: Sequence[Tensor], weights: Tensor) -> None:
        """buffers += sum_i weights_i z_i (fp32 buffers, one per block)."""
        w = (weights * self.coef).to(buffers[0].dtype)
        for piece, buf in zip(self.pieces, buffers, strict=True):
            piece.add_to(buf, w)

    def dense(self, i: int) -> list[Tensor]:
        """Direction i as one full tensor per block."""
        return [piece.dense(i) * self.coef[i] for piece in self.pieces]

    @staticmethod
    def from_tensors(tensors: Sequence[Tensor]) -> DirectionBatch:
        """A batch of one direction given as full tensors (e.g. an update step), coef 1."""
        pieces: list[Piece] = [DensePiece(t.unsqueeze(0)) for t in tensors]
        return DirectionBatch(pieces, torch.ones(1, device=tensors[0].device), [-1])


@runtime_checkable
class DirectionSampler(Protocol):
    """Builds directions ``indices`` of ``iteration`` for blocks of the given shapes."""

    #: Whether :meth:`sample` needs the output-layer rows the pairs touch (``support``).
    needs_support: bool

    def sample(
        self,
        seed: int,
        iteration: int,
        indices: Sequence[int],
        shapes: Sequence[torch.Size],
        support: Tensor | None = None,
    ) -> DirectionBatch: ...


def _normalised(pieces: list[Piece], indices: Sequence[int]) -> DirectionBatch:
    norm = torch.stack([p.sq_norm() for p in pieces]).sum(0).sqrt()
    return DirectionBatch(pieces, 1.0 / norm, list(indices))


def _dense(fill, seed, iteration, indices, shapes, device) -> DirectionBatch:
    """Dense directions, each drawn by ``fill(row_of_block, generator)`` from its own generator."""
    blocks = [torch.empty(len(indices), *s, device=device) for s in shapes]
    for row, index in enumerate(indices):
        gen = local_generator(seed, iteration, index, device=device)
        for block in blocks:
            fill(block[row], gen)
    return _normalised([DensePiece(b) for b in blocks], indices)


class GaussianSphere:
    """Gaussian directions normalised to the unit sphere (the paper's choice).

    Args:
        device: Where directions are generated.
    """

    needs_support = False

    def __init__(self, device: str = "cpu") -> None:
        self.device = device

    def sample(self, seed, iteration, indices, shapes, support=None) -> DirectionBatch:
        def fill(out: torch.Tensor, gen: torch.Generator) -> None:
            torch.randn(out.shape, generator=gen, out=out)

        return _dense(fill, seed, iteration, indices, shapes, self.device)


class Rademacher:
    """Entries +-1 scaled to unit norm (cheaper to draw; same covariance as the sphere)."""

    needs_support = False

    def __init__(self, device: str = "cpu") -> None:
        self.device = device

    def sample(self, seed, iteration, indices, shapes, support=None) -> DirectionBatch:
        def fill(out: torch.Tensor, gen: torch.Generator) -> None:
            bits = torch.randint(0, 2, out.shape, generator=gen, device=out.device)
            out.copy_(bits.mul_(2).sub_(1))

        return _dense(fill, seed, iteration, indices, shapes, self.device)


class LowRank:
    """z = U V^T / ||U V^T||_F with Gaussian U (R, rank), V (C, rank) for each 2-D block.

    One-dimensional blocks (biases, norms) get dense Gaussian entries.

    Args:
        rank: Rank of each block's direction.
        device: Where directions are generated.
    """

    needs_support = False

    def __init__(self, rank: int = 1, device: str = "cpu") -> None:
        self.rank = settings.number("optimizer.directions.rank", rank, integer=True, ge=1)
        self.device = device

    def sample(self, seed, iteration, indices, shapes, support=None) -> DirectionBatch:
        k = len(indices)
        parts: list[tuple[Tensor, ...]] = []
        for s in shapes:
            if len(s) == 2:
                parts.append(
                    (
                        torch.empty(k, s[0], self.rank, device=self.device),
                        torch.empty(k, s[1], self.rank, device=self.device),
                    )
                )
            else:
                parts.append((torch.empty(k, *s, device=self.device),))
        for row, index in enumerate(indices):
            gen = local_generator(seed, iteration, index, device=self.device)
            for part in parts:
                for tensor in part:
                    torch.randn(tensor.shape[1:], generator=gen, out=tensor[row])
        pieces: list[Piece] = [LowRankPiece(*p) if len(p) == 2 else DensePiece(p[0]) for p in parts]
        return _normalised(pieces, indices)


class SupportRestricted:
    """Gaussian directions on the output-layer rows of a support set only.

    The support (tokens of the pair plus the top-k predicted tokens at its response positions) is
    where the gradient of log pi(y|x) w.r.t. the output layer concentrates: row j of that gradient
    is sum_t (1[y_t = j] - p_t(j)) h_t. Other perturbed blocks (extra modules) stay dense.

    Args:
        top_k: Predicted tokens per response position added to the support.
        device: Where directions are generated.
    """

    needs_support = True

    def __init__(self, top_k: int = 16, device: str = "cpu") -> None:
        self.top_k = settings.number("optimizer.directions.top_k", top_k, integer=True, ge=1)
        self.device = device

    def sample(self, seed, iteration, indices, shapes, support=None) -> DirectionBatch:
        if support is None:
            raise ValueError("SupportRestricted needs the support rows of the output layer")
        k = len(indices)
        head = torch.empty(k, support.numel(), shapes[0][1], device=self.device)
        rest = [torch.empty(k, *s, device=self.device) for s in shapes[1:]]
        for row, index in enumerate(indices):
            gen = local_generator(seed, iteration, index, device=self.device)
            for block in [head, *rest]:
                torch.randn(block.shape[1:], generator=gen, out=block[row])
        pieces: list[Piece] = [RowsPiece(support, head, shapes[0][0])]
        pieces += [DensePiece(b) for b in rest]
        return _normalised(pieces, indices)
