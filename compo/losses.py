"""First-order losses: one class per loss, its hyper-parameters in its own YAML (``dpo.loss``).

A loss receives the sequence scores it needs, the policy's (chosen, rejected)
:class:`compo.scoring.SequenceScores` (summed and per-token log-probs, token counts) and the
reference's log-probs when it uses them, and returns per-pair losses and implicit rewards. Options
every pairwise loss has live in :class:`PairwiseLoss`: ``per_token`` (mean instead of summed
log-probs), ``rpo_alpha`` (an NLL term on the chosen reply, RPO, Pang et al. 2024) and
``ld_alpha`` (length-desensitised log-probs, LD-DPO, Liu et al. 2024). A loss with its own NLL
term (CPO, ORPO, SFT) is one class like any other: the trainer never changes for it.

Conventions: the NLL term is the chosen reply's mean per-token negative log-likelihood, averaged
over pairs (TRL averages over all chosen tokens of a batch, which weights long replies more).
"""

from __future__ import annotations

import dataclasses
import string

import torch
import torch.nn.functional as F
from torch import Tensor

from compo import settings
from compo.scoring import SequenceScores
from compo.types import PreferencePair

LossOutput = tuple[Tensor, Tensor, Tensor]  # per-pair loss, chosen rewards, rejected rewards
CONTRAST_TEMPLATE = (
    "{prompt}\n\nHere is a poor answer to avoid:\n{rejected}\n\nWrite a better answer."
)
Scores = tuple[SequenceScores, SequenceScores]  # (chosen, rejected)


class PairwiseLoss:
    """A preference loss on (chosen, rejected) pairs, with the options every such loss shares.

    Args:
        beta: Inverse temperature of the implicit reward.
        per_token: Mean instead of summed log-probs; None: the loss's own default.
        rpo_alpha: Weight of the chosen reply's NLL added to the loss (None: off).
        ld_alpha: Weight in [0, 1] of the tokens beyond the pair's shared length (None: off).
    """

    name = "pairwise"
    #: Whether :meth:`rewrite` changes the pairs (they are then encoded anew, see ContrastSFT).
    rewrites_pairs = False
    #: Mean log-probs by default (IPO, SimPO) or summed ones.
    default_per_token = False
    #: Whether the loss reads the reference model's log-probs.
    needs_reference = True
    #: Whether the loss takes KTO's KL reference point (see :class:`KTO`).
    needs_kl = False
    #: Whether the loss also trains on unpaired examples (:meth:`KTO.unpaired`).
    accepts_unpaired = False

    def __init__(
        self,
        beta: float = 0.1,
        per_token: bool | None = None,
        rpo_alpha: float | None = None,
        ld_alpha: float | None = None,
    ) -> None:
        # beta <= 0 trains nothing, or the inverted objective.
        self.beta = settings.number("dpo.loss.beta", beta, gt=0)
        per_token = settings.flag("dpo.loss.per_token", per_token, optional=True)
        self.per_token = self.default_per_token if per_token is None else per_token
        self.rpo_alpha = settings.number("dpo.loss.rpo_alpha", rpo_alpha, ge=0, optional=True)
        self.ld_alpha = settings.number("dpo.loss.ld_alpha", ld_alpha, ge=0, le=1, optional=True)
        if self.ld_alpha is not None and self.per_token:
            raise settings.SettingError(
                "dpo.loss.ld_alpha weighs summed log-probs: it needs dpo.loss.per_token=false"
            )

    def logps(self, scores: SequenceScores) -> Tensor:
        """The log-probs this loss compares: mean per token, or summed.

        With ``ld_alpha`` (LD-DPO, Liu et al. 2024), the tokens beyond the length both replies
        share count ``ld_alpha`` times: ``shared + ld_alpha * (sum - shared)``, against verbosity.
        """
        if self.ld_alpha is not None:
            return scores.head_logps + self.ld_alpha * (scores.sum_logps - scores.head_logps)
        return scores.mean_logps if self.per_token else scores.sum_logps

    def __call__(
        self, policy: Scores, reference: tuple[Tensor, Tensor], kl: Tensor | None = None
    ) -> LossOutput:
        """Per-pair losses and rewards of a batch.

        Args:
            policy: The policy's scores of the chosen and rejected replies.
            reference: The reference's log-probs (as :meth:`logps` selects them; zeros for a loss
                without reference).
            kl: The batch's KL estimate, for a loss with ``needs_kl``.
        """
        loss, chosen_rewards, rejected_rewards = self.pair(
            self.logps(policy[0]), self.logps(policy[1]), *reference
        )
        if self.rpo_alpha:
            loss = loss + self.rpo_alpha * nll(policy[0])
        return loss, chosen_rewards, rejected_rewards

    def pair(self, pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> LossOutput:
        """The loss on policy (``pc``, ``pr``) and reference (``rc``, ``rr``) log-probs."""
        raise NotImplementedError

    def rewrite(self, pair: PreferencePair) -> PreferencePair:
        """The pair this loss trains on (default: as given)."""
        return pair

    def rewards(self, pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> tuple[Tensor, Tensor]:
        """DPO's implicit rewards ``beta * (log pi - log pi_ref)``, detached."""
        return self.beta * (pc - rc).detach(), self.beta * (pr - rr).detach()


def nll(chosen: SequenceScores) -> Tensor:
    """The chosen reply's mean per-token negative log-likelihood, per pair."""
    return -chosen.mean_logps


class DPO(PairwiseLoss):
    """DPO (Rafailov et al. 2023): ``-log sigmoid(beta h)``, h = (pc - rc) - (pr - rr).

    TRL calls it ``sigmoid`` (``dpo=sigmoid`` is the same file).
    """

    name = "dpo"

    def pair(self, pc, pr, rc, rr) -> LossOutput:
        h = (pc - rc) - (pr - rr)
        return -F.logsigmoid(self.beta * h), *self.rewards(pc, pr, rc, rr)


class _Smoothed(PairwiseLoss):
    """A loss with an assumed label-flip rate ``label_smoothing`` in [0, 0.5)."""

    def __init__(self, label_smoothing: float = 0.1, **options) -> None:
        super().__init__(**options)
        # eps = 0.5 makes cdpo's loss symmetric (nothing to learn) and divides rdpo's by zero.
        self.label_smoothing = settings.number(
            "dpo.loss.label_smoothing", label_smoothing, ge=0, lt=0.5
        )


class CDPO(_Smoothed):
    """Conservative DPO: ``(1 - eps) l(beta h) + eps l(-beta h)``, l = -log sigmoid."""

    name = "cdpo"

    def pair(self, pc, pr, rc, rr) -> LossOutput:
        h = (pc - rc) - (pr - rr)
        eps = self.label_smoothing
        loss = -(1 - eps) * F.logsigmoid(self.beta * h) - eps * F.logsigmoid(-self.beta * h)
        return loss, *self.rewards(pc, pr, rc, rr)


class RDPO(_Smoothed):
    """Robust DPO (Chowdhury et al. 2024): ``((1-eps) l(beta h) - eps l(-beta h)) / (1 - 2 eps)``.

    ``eps`` is the assumed label-flip rate; the loss is an unbiased estimate of the clean DPO loss.
    TRL calls it ``robust``.
    """

    name = "rdpo"

    def pair(self, pc, pr, rc, rr) -> LossOutput:
        h = (pc - rc) - (pr - rr)
        eps = self.label_smoothing
        loss = -(1 - eps) * F.logsigmoid(self.beta * h) + eps * F.logsigmoid(-self.beta * h)
        return loss / (1 - 2 * eps), *self.rewards(pc, pr, rc, rr)


class IPO(PairwiseLoss):
    """IPO (Azar et al. 2023): ``(h - 1/(2 beta))^2`` on per-token log-probs by default (as TRL)."""

    name = "ipo"
    # Summed log-probs make h ~ tens against a 1/(2 beta) target.
    default_per_token = True

    def pair(self, pc, pr, rc, rr) -> LossOutput:
        h = (pc - rc) - (pr - rr)
        return (h - 1 / (2 * self.beta)) ** 2, *self.rewards(pc, pr, rc, rr)


class Hinge(PairwiseLoss):
    """SLiC's hinge (Zhao et al. 2023): ``max(0, 1 - beta h)``."""

    name = "hinge"

    def pair(self, pc, pr, rc, rr) -> LossOutput:
        h = (pc - rc) - (pr - rr)
        return torch.relu(1 - self.beta * h), *self.rewards(pc, pr, rc, rr)


class SimPO(PairwiseLoss):
    """SimPO (Meng et al. 2024): ``-log sigmoid(beta (pc - pr) - gamma)`` on per-token log-probs.

    Reference-free; the rewards are ``beta`` times the policy's length-normalised log-probs.

    Args:
        gamma: Target reward margin.
        **options: Those of :class:`PairwiseLoss`.
    """

    name = "simpo"
    default_per_token = True
    needs_reference = False

    def __init__(self, gamma: float = 0.5, **options) -> None:
        super().__init__(**options)
        self.gamma = settings.number("dpo.loss.gamma", gamma, ge=0)

    def pair(self, pc, pr, rc, rr) -> LossOutput:
        loss = -F.logsigmoid(self.beta * (pc - pr) - self.gamma)
        return loss, self.beta * pc.detach(), self.beta * pr.detach()


class CPO(SimPO):
    """CPO (Xu et al. 2024): ``-log sigmoid(beta (pc - pr)) + cpo_alpha * NLL(chosen)``.

    SimPO's preference term on summed log-probs with no margin, plus the chosen reply's NLL.
    Reference-free. With ``per_token: true`` and ``gamma > 0`` it is TRL's SimPO-style CPO.

    Args:
        cpo_alpha: Weight of the chosen reply's NLL.
        gamma: Target reward margin (0: plain CPO).
        **options: Those of :class:`PairwiseLoss`.
    """

    name = "cpo"
    default_per_token = False

    def __init__(self, cpo_alpha: float = 1.0, gamma: float = 0.0, **options) -> None:
        super().__init__(gamma=gamma, **options)
        self.cpo_alpha = settings.number("dpo.loss.cpo_alpha", cpo_alpha, ge=0)

    def __call__(self, policy, reference, kl=None) -> LossOutput:
        loss, chosen_rewards, rejected_rewards = super().__call__(policy, reference)
        return loss + self.cpo_alpha * nll(policy[0]), chosen_rewards, rejected_rewards


class ORPO(PairwiseLoss):
    """ORPO (Hong et al. 2024): ``NLL(chosen) - beta * log sigmoid(log odds ratio)``.

    The odds come from per-token mean log-probs (``log odds(y) = m - log(1 - e^m)``); ``beta`` is
    the paper's lambda. Reference-free; rewards are ``beta`` times the mean log-probs (as TRL).
    """

    name = "orpo"
    default_per_token = True
    needs_reference = False

    def __call__(self, policy, reference, kl=None) -> LossOutput:
        loss, chosen_rewards, rejected_rewards = super().__call__(policy, reference)
        return loss + nll(policy[0]), chosen_rewards, rejected_rewards

    def pair(self, pc, pr, rc, rr) -> LossOutput:
        # log(1 - e^m) for m < 0, computed stably (expm1) as TRL does with log1p(-exp(m)).
        log_odds = (pc - pr) - (torch.log(-torch.expm1(pc)) - torch.log(-torch.expm1(pr)))
        loss = -self.beta * F.logsigmoid(log_odds)
        return loss, self.beta * pc.detach(), self.beta * pr.detach()


class KTO(PairwiseLoss):
    """KTO (Ethayarajh et al. 2024) on unpaired examples, or on pairs (the chosen reply is
    desirable, the rejected one undesirable), each example judged against the reference point
    ``z`` (the policy's KL from the reference, estimated on mismatched prompt/reply pairs of the
    batch, detached and clipped at 0):

        desirable:   w_d (1 - sigmoid(beta (log pi(y+)/pi_ref(y+) - z)))
        undesirable: w_u (1 - sigmoid(beta (z - log pi(y-)/pi_ref(y-))))

    A pair's loss is the mean of its two examples', so the batch mean is TRL's mean over examples;
    on unpaired examples (:meth:`unpaired`) each example's loss is its own term, as in TRL.

    Args:
        desirable_weight: w_d (raise it when desirable examples are rarer).
        undesirable_weight: w_u.
        **options: Those of :class:`PairwiseLoss`.
    """

    name = "kto"
    needs_kl = True
    accepts_unpaired = True

    def __init__(
        self, desirable_weight: float = 1.0, undesirable_weight: float = 1.0, **options
    ) -> None:
        super().__init__(**options)
        self.desirable_weight = settings.number("dpo.loss.desirable_weight", desirable_weight, gt=0)
        self.undesirable_weight = settings.number(
            "dpo.loss.undesirable_weight", undesirable_weight, gt=0
        )

    def __call__(self, policy, reference, kl=None) -> LossOutput:
        pc, pr = self.logps(policy[0]), self.logps(policy[1])
        rc, rr = reference
        z = torch.zeros((), dtype=pc.dtype, device=pc.device) if kl is None else kl.detach()
        chosen = 1 - torch.sigmoid(self.beta * ((pc - rc) - z))
        rejected = 1 - torch.sigmoid(self.beta * (z - (pr - rr)))
        loss = (self.desirable_weight * chosen + self.undesirable_weight * rejected) / 2
        if self.rpo_alpha:
            loss = loss + self.rpo_alpha * nll(policy[0])
        return loss, *self.rewards(pc, pr, rc, rr)

    def unpaired(
        self, policy: SequenceScores, reference: Tensor, labels: Tensor, kl: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Per-example losses and implicit rewards of unpaired examples.

        Args:
            policy: The policy's scores of each example's completion.
            reference: The reference's log-probs of them (as :meth:`logps` selects them).
            labels: True for a desirable example.
            kl: The batch's KL estimate ``z`` (None: 0).

        Returns:
            ``(losses, rewards)``, rewards ``beta * (log pi - log pi_ref)`` detached. With
            ``rpo_alpha``, desirable examples also pay that weight times their NLL.
        """
        logratio = self.logps(policy) - reference
        z = torch.zeros_like(logratio[:1]) if kl is None else kl.detach()
        desirable = self.desirable_weight * (1 - torch.sigmoid(self.beta * (logratio - z)))
        undesirable = self.undesirable_weight * (1 - torch.sigmoid(self.beta * (z - logratio)))
        loss = torch.where(labels, desirable, undesirable)
        if self.rpo_alpha:
            loss = loss + self.rpo_alpha * nll(policy) * labels
        return loss, self.beta * logratio.detach()

    def balance_warning(self, n_desirable: int, n_undesirable: int) -> str | None:
        """The paper's advice (its Eq. 8, as TRL checks it) when the weights do not offset the
        data's imbalance: ``w_d n_d / (w_u n_u)`` should lie in [1, 4/3]; None when it does."""
        if not n_desirable or not n_undesirable:
            missing = "desirable" if not n_desirable else "undesirable"
            return f"kto: no {missing} examples: only one side of the loss trains"
        ratio = self.desirable_weight * n_desirable / (self.undesirable_weight * n_undesirable)
        if 1 <= ratio <= 4 / 3:
            return None
        low = n_undesirable * self.undesirable_weight / n_desirable
        return (
            f"kto: {n_desirable} desirable and {n_undesirable} undesirable examples: "
            f"w_d n_d / (w_u n_u) = {ratio:.2f}, outside the paper's [1, 4/3]; set "
            f"dpo.loss.desirable_weight in [{low:.2f}, {low * 4 / 3:.2f}]"
        )


class SFT(PairwiseLoss):
    """Supervised fine-tuning on the chosen reply: its mean per-token NLL (prompt masked).

    The rejected reply is ignored; the rewards are the mean log-probs (for the trace only).
    """

    name = "sft"
    default_per_token = True
    needs_reference = False

    def __init__(self, **options) -> None:
        super().__init__(**options)
        if not self.per_token:  # an option this loss would silently ignore
            raise settings.SettingError(
                f"dpo.loss.per_token: {self.name}'s NLL is per token; false does not apply"
            )

    def pair(self, pc, pr, rc, rr) -> LossOutput:
        return -pc, pc.detach(), pr.detach()

    def logps(self, scores: SequenceScores) -> Tensor:
        return scores.mean_logps  # the NLL is per token whatever per_token says


class ContrastSFT(SFT):
    """Plain-text contrast SFT: NLL of the positive answer after an instruction holding the
    question and the negative answer (everything but the positive answer is masked).

    Args:
        template: Renders the prompt from ``{prompt}`` (the question; for a conversation, its last
            user turn) and ``{rejected}`` (the negative answer); the chosen reply follows it.
        **options: Those of :class:`PairwiseLoss`.

    The rendered prompt is longer than the question: raise ``data.max_prompt_length`` if the
    metrics report truncated prompts (they are cut from the left, the question first).
    """

    name = "contrast_sft"
    rewrites_pairs = True

    def __init__(self, template: str = CONTRAST_TEMPLATE, **options) -> None:
        super().__init__(**options)
        settings.text("dpo.loss.template", template)
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        except ValueError as exc:
            raise settings.SettingError(f"dpo.loss.template: {exc}") from None
        # Exactly the two names, no attribute or index access ({prompt.upper} would render a repr).
        if sorted(set(fields)) != ["prompt", "rejected"]:
            raise settings.SettingError(
                "dpo.loss.template must hold {prompt} and {rejected} and no other field, "
                f"got {template!r}"
            )
        self.template = template

    def rewrite(self, pair: PreferencePair) -> PreferencePair:
        if isinstance(pair.prompt, str):
            prompt: str | list = self.template.format(prompt=pair.prompt, rejected=pair.rejected)
        else:  # a conversation: the contrast goes into its last user turn
            turns = [dict(m) for m in pair.prompt]
            last = max(i for i, m in enumerate(turns) if m["role"] == "user")
            turns[last]["content"] = self.template.format(
                prompt=turns[last]["content"], rejected=pair.rejected
            )
            prompt = turns
        return dataclasses.replace(pair, prompt=prompt)


#: ``dpo.loss`` given as a name (library use, e.g. ``DPOTrainer(loss="ipo")``) builds its defaults.
LOSSES: dict[str, type[PairwiseLoss]] = {
    cls.name: cls for cls in (DPO, CDPO, RDPO, IPO, Hinge, SimPO, CPO, ORPO, KTO, SFT, ContrastSFT)
}
