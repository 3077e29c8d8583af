"""The update rule of Algorithm 2: normalise, clip small entries, adaptive step or skip."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from compo import settings
from compo.zo.estimator import norm


def normalise(vector: Sequence[Tensor]) -> tuple[list[Tensor], float]:
    """Returns (vector / ||vector||, ||vector||); a zero vector stays zero."""
    n = norm(vector)
    if n == 0:
        return [t.clone() for t in vector], 0.0
    return [t / n for t in vector], n


def clip(
    g: Sequence[Tensor], clip_threshold: float | None, keep_fraction: float | None
) -> tuple[list[Tensor], int]:
    """Zeroes small entries of ``g``: |g_j| < lambda_g, and/or all but the largest fraction.

    Args:
        g: The normalised direction, one tensor per block.
        clip_threshold: lambda_g; None disables it.
        keep_fraction: Keep only this fraction of entries (the largest magnitudes over all
            blocks); None disables it. With both set, an entry must pass both.

    Returns:
        The clipped tensors and how many entries are nonzero.
    """
    floor = None
    if keep_fraction is not None:
        settings.number("optimizer.keep_fraction", keep_fraction, gt=0, le=1)
        flat = torch.cat([t.reshape(-1).abs() for t in g])
        n_drop = flat.numel() - max(1, round(keep_fraction * flat.numel()))
        if n_drop > 0:
            # The largest dropped magnitude; kept entries are strictly above it.
            floor = flat.kthvalue(n_drop).values
    out = []
    for t in g:
        keep = torch.ones_like(t, dtype=torch.bool)
        if clip_threshold is not None:
            keep &= t.abs() >= clip_threshold
        if floor is not None:
            keep &= t.abs() > floor
        out.append(torch.where(keep, t, torch.zeros_like(t)))
    kept = sum(int((t != 0).sum()) for t in out)
    return out, kept
