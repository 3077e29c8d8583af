"""Stage-1 preference losses: small pure functions of policy and reference log-probs.

Each takes the policy's log-probs of the chosen and rejected replies (``pc``, ``pr``) and the
reference's (``rc``, ``rr``) plus its hyper-parameters, and returns per-pair losses and implicit
rewards. :data:`LOSSES` maps each config name (``dpo.loss``) to one; a new loss is one function
and one entry, with no branch to edit elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from compo.errors import CompoError

LossOutput = tuple[Tensor, Tensor, Tensor]  # per-pair loss, chosen rewards, rejected rewards


def _rewards(beta, pc, pr, rc, rr) -> tuple[Tensor, Tensor]:
    return beta * (pc - rc).detach(), beta * (pr - rr).detach()


def dpo_loss(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float) -> LossOutput:
    """DPO (Rafailov et al. 2023): ``-log sigmoid(beta h)``, h = (pc - rc) - (pr - rr)."""
    h = (pc - rc) - (pr - rr)
    return -F.logsigmoid(beta * h), *_rewards(beta, pc, pr, rc, rr)


def cdpo_loss(
    pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, label_smoothing: float
) -> LossOutput:
    """Conservative DPO: ``(1 - eps) l(beta h) + eps l(-beta h)``, l = -log sigmoid."""
    h = (pc - rc) - (pr - rr)
    eps = label_smoothing
    loss = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    return loss, *_rewards(beta, pc, pr, rc, rr)


def rdpo_loss(
    pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, label_smoothing: float
) -> LossOutput:
    """Robust DPO (Chowdhury et al. 2024): ``((1-eps) l(beta h) - eps l(-beta h)) / (1 - 2 eps)``.

    ``eps`` is the assumed label-flip rate; the loss is an unbiased estimate of the clean DPO loss.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise CompoError(f"dpo.label_smoothing must be in [0, 0.5) for rdpo, got {label_smoothing}")
    h = (pc - rc) - (pr - rr)
    eps = label_smoothing
    loss = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    return loss, *_rewards(beta, pc, pr, rc, rr)


def ipo_loss(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float) -> LossOutput:
    """IPO (Azar et al. 2023): ``(h - 1/(2 beta))^2``; per-token log-probs by default (as TRL)."""
    h = (pc - rc) - (pr - rr)
    return (h - 1 / (2 * beta)) ** 2, *_rewards(beta, pc, pr, rc, rr)


def simpo_loss(
    pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, gamma: float
) -> LossOutput:
    """SimPO (Meng et al. 2024): ``-log sigmoid(beta (pc - pr) - gamma)`` on per-token log-probs.

    Reference-free: ``rc``/``rr`` are ignored; the rewards are ``beta`` times the policy's
    length-normalised log-probs.
    """
    loss = -F.logsigmoid(beta * (pc - pr) - gamma)
    return loss, beta * pc.detach(), beta * pr.detach()


@dataclass(frozen=True)
class Loss:
    """A loss function and the log-probs it expects (summed, or mean per token)."""

    fn: Callable[..., LossOutput]
    per_token: bool
    needs_reference: bool = True


LOSSES: dict[str, Loss] = {
    "dpo": Loss(dpo_loss, per_token=False),
    "cdpo": Loss(cdpo_loss, per_token=False),
    "rdpo": Loss(rdpo_loss, per_token=False),
    # TRL averages IPO's log-probs per token; summed ones make h ~ tens against a 1/(2 beta) target.
    "ipo": Loss(ipo_loss, per_token=True),
    "simpo": Loss(simpo_loss, per_token=True, needs_reference=False),
}
