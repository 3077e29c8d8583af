"""compo's first-order losses against TRL 1.x's own code, on the same log-probs.

TRL keeps DPO's losses inside ``DPOTrainer._compute_loss`` and CPO's and ORPO's in trainer methods,
so they are called here on a stand-in for the trainer (the attributes they read) and, for DPO, a
stand-in model whose per-token log-probs are given. Where conventions differ it is said below.
Skipped when TRL is not installed (``pip install -e ".[dev]"`` installs it).
"""

from __future__ import annotations

import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from compo.losses import CDPO, CPO, DPO, IPO, ORPO, RDPO, SFT, Hinge
from compo.scoring import SequenceScores

trl = pytest.importorskip("trl", reason="TRL is a dev extra: pip install -e '.[dev]'")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

# Three pairs; the prompt is 2 tokens, then each reply (chosen rows first, as TRL batches them).
PROMPT, WIDTH = 2, 8
LENGTHS = {"chosen": [3, 5, 4], "rejected": [6, 2, 4]}


def _batch(seed: int = 0):
    """Per-token log-probs (zero off the completion), masks, and compo's SequenceScores."""
    gen = torch.Generator().manual_seed(seed)
    lengths = LENGTHS["chosen"] + LENGTHS["rejected"]
    completion = torch.zeros(len(lengths), WIDTH, dtype=torch.long)
    for row, n in enumerate(lengths):
        completion[row, PROMPT : PROMPT + n] = 1
    shift = completion[:, 1:]
    per_token = -torch.rand(len(lengths), WIDTH - 1, generator=gen, dtype=torch.float64) * shift
    sums = per_token.sum(1)
    n_tokens = shift.sum(1)
    scores = SequenceScores(sums, sums / n_tokens, n_tokens)
    chosen, rejected = (SequenceScores(*(t.chunk(2)[i] for t in vars(scores).values()
                                         if t is not None)) for i in (0, 1))  # fmt: skip
    reference = -torch.rand(len(lengths), generator=gen, dtype=torch.float64) * 10
    return per_token, completion, (chosen, rejected), reference.chunk(2), n_tokens.chunk(2)


def _trl_dpo_loss(
    loss_type: str, beta: float, label_smoothing: float = 0.0, ld_alpha: float | None = None
) -> torch.Tensor:
    """TRL's DPOTrainer._compute_loss on the batch, with precomputed reference log-probs."""
    from trl import DPOTrainer

    per_token, completion, _, reference, _ = _batch()
    n = per_token.shape[0]
    outputs = SimpleNamespace(
        log_probs=per_token,
        entropy=torch.zeros(n, WIDTH - 1),
        mean_logits=torch.zeros(n, WIDTH - 1),
        is_top1=torch.zeros(n, WIDTH - 1, dtype=torch.bool),
    )

    def model(**kwargs):
        return outputs

    model.training = True
    trainer = SimpleNamespace(
        model=model,
        accelerator=SimpleNamespace(
            device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x
        ),
        aux_loss_enabled=False,
        ld_alpha=ld_alpha,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(n, WIDTH, dtype=torch.long),
        "attention_mask": torch.ones(n, WIDTH, dtype=torch.long),
        "completion_mask": completion,
        "ref_chosen_logps": reference[0],
        "ref_rejected_logps": reference[1],
    }
    return DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)


def _compo_loss(loss, reference_tensors=None) -> torch.Tensor:
    _, _, policy, reference, n_tokens = _batch()
    if reference_tensors is None:
        # compo hands a loss the reference log-probs it selects (summed, or mean per token).
        reference = tuple(
            r / n if loss.per_token else r for r, n in zip(reference, n_tokens, strict=True)
        )
    else:
        reference = reference_tensors
    losses, *_ = loss(policy, reference)
    return losses.mean()


@pytest.mark.parametrize(
    ("trl_name", "ours"),
    [
        ("sigmoid", DPO(beta=0.3)),
        ("hinge", Hinge(beta=0.3)),
        ("ipo", IPO(beta=0.3)),  # both length-normalise IPO's log-ratios (TRL: "confirmed with
        # the IPO authors"); compo averages log-probs per token, TRL divides the summed ratio
        ("robust", RDPO(beta=0.3, label_smoothing=0.2)),
    ],
    ids=["sigmoid=dpo", "hinge", "ipo", "robust=rdpo"],
)
def test_pairwise_losses_match_trl_dpo_trainer(trl_name, ours):
    smoothing = getattr(ours, "label_smoothing", 0.0)
    expected = _trl_dpo_loss(trl_name, beta=0.3, label_smoothing=smoothing)
    torch.testing.assert_close(_compo_loss(ours), expected.double(), rtol=1e-6, atol=1e-9)


def test_cdpo_is_trls_sigmoid_with_label_smoothing_in_the_cpo_trainer():
    """TRL 1.x's DPOTrainer dropped cDPO's smoothing; its CPOTrainer keeps the formula."""
    from trl.experimental.cpo import CPOTrainer

    _, _, policy, reference, _ = _batch()
    h_policy = policy[0].sum_logps - reference[0] - (policy[1].sum_logps - reference[1])
    stand_in = SimpleNamespace(
        alpha=0.0, beta=0.3, loss_type="sigmoid", label_smoothing=0.2, simpo_gamma=0.0,
        accelerator=SimpleNamespace(device="cpu"),
    )  # fmt: skip
    # CPO's logits are pc - pr; give it h so its formula is cDPO's on the same numbers.
    expected, *_ = CPOTrainer.cpo_loss(stand_in, h_policy, torch.zeros_like(h_policy))
    got = _compo_loss(CDPO(beta=0.3, label_smoothing=0.2))
    torch.testing.assert_close(got, expected.mean(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(("loss_type", "gamma", "per_token"), [("sigmoid", 0.0, False),
                                                              ("simpo", 0.5, True)])  # fmt: skip
def test_cpo_preference_term_matches_trl(loss_type, gamma, per_token):
    """The preference term; both add cpo_alpha x NLL of the chosen reply (see test_sft_...)."""
    from trl.experimental.cpo import CPOTrainer

    _, _, policy, _, _ = _batch()
    ours = CPO(beta=0.3, cpo_alpha=0.0, gamma=gamma, per_token=per_token)
    stand_in = SimpleNamespace(
        alpha=0.0, beta=0.3, loss_type=loss_type, label_smoothing=0.0, simpo_gamma=gamma,
        accelerator=SimpleNamespace(device="cpu"),
    )  # fmt: skip
    expected, chosen_r, _ = CPOTrainer.cpo_loss(
        stand_in, ours.logps(policy[0]), ours.logps(policy[1])
    )
    got, got_chosen_r, _ = ours(policy, (torch.zeros(3), torch.zeros(3)))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(got_chosen_r, chosen_r, rtol=1e-6, atol=1e-9)


def test_orpo_odds_ratio_term_matches_trl():
    from trl.experimental.orpo import ORPOTrainer

    _, _, policy, _, _ = _batch()
    stand_in = SimpleNamespace(beta=0.2, accelerator=SimpleNamespace(device="cpu"))
    trl_terms, chosen_r, *_ = ORPOTrainer.odds_ratio_loss(
        stand_in, policy[0].mean_logps, policy[1].mean_logps
    )
    ours = ORPO(beta=0.2)
    odds_term, got_chosen_r, _ = ours.pair(policy[0].mean_logps, policy[1].mean_logps, None, None)
    # TRL's loss is nll - mean(beta * log sigmoid(log odds)); compo's per-pair term is its negative.
    # TRL computes ORPO in float32 whatever the input dtype.
    torch.testing.assert_close(odds_term.float(), -trl_terms, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_chosen_r.float(), chosen_r.float(), rtol=1e-5, atol=1e-7)


def test_sft_matches_trl_when_replies_have_equal_lengths_and_says_why_not_otherwise():
    """TRL averages the NLL over every chosen token of the batch; compo over pairs (each pair's
    mean per-token NLL). Equal reply lengths make them the same number."""
    expected = _trl_dpo_loss("sft", beta=0.1)
    got = _compo_loss(SFT())
    _, _, policy, _, n_tokens = _batch()
    token_weighted = -(policy[0].sum_logps.sum() / n_tokens[0].sum())
    torch.testing.assert_close(expected.double(), token_weighted, rtol=1e-6, atol=1e-9)
    pair_weighted = -(policy[0].mean_logps.mean())
    torch.testing.assert_close(got, pair_weighted, rtol=1e-9, atol=1e-12)
    assert len(set(LENGTHS["chosen"])) > 1 and not torch.isclose(got, expected.double())


def test_ld_alpha_matches_trl():
    """LD-DPO: TRL splits each reply at the length both share, as compo's scoring does."""
    expected = _trl_dpo_loss("sigmoid", beta=0.3, ld_alpha=0.4)
    per_token, completion, _, reference, _ = _batch()
    shift = completion[:, 1:]
    position = shift.cumsum(1)
    lengths = shift.sum(1)
    shared = torch.minimum(*lengths.chunk(2)).repeat(2)
    head = (per_token * (position <= shared[:, None])).sum(1)
    scores = SequenceScores(per_token.sum(1), per_token.sum(1) / lengths, lengths, head_logps=head)
    chosen, rejected = scores.take(range(3)), scores.take(range(3, 6))
    loss = DPO(beta=0.3, ld_alpha=0.4)
    # TRL's precomputed reference log-probs are used as given (compo's reference scores are
    # length-desensitised the same way through loss.logps when compo computes them).
    got, *_ = loss((chosen, rejected), reference)
    torch.testing.assert_close(got.mean(), expected.double(), rtol=1e-6, atol=1e-9)


def _trl_kto_loss(completions, labels, reference, kl_policy, kl_reference, beta, weights):
    """TRL's KTOTrainer._compute_loss on examples with the given summed log-probs (policy,
    precomputed reference, and the mismatched KL sequences')."""
    from trl import KTOTrainer

    n = completions.shape[0]
    per_token = torch.zeros(n, 4, dtype=torch.float64)
    per_token[:, 0] = completions  # the sum is what TRL reads

    def model(**kwargs):
        return SimpleNamespace(
            log_probs=per_token, entropy=torch.zeros(n, 4), mean_logits=torch.zeros(n, 4)
        )

    model.training = True
    stand_in = SimpleNamespace(
        model=model,
        accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x),
        _compute_kl_logps=lambda model, batch: kl_policy,
        aux_loss_enabled=False, precompute_ref_logps=True, calculate_KL=True, loss_type="kto",
        beta=beta, desirable_weight=weights[0], undesirable_weight=weights[1],
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    inputs = {
        "input_ids": torch.zeros(n, 5, dtype=torch.long),
        "attention_mask": torch.ones(n, 5, dtype=torch.long),
        "completion_mask": torch.ones(n, 5, dtype=torch.long),
        "label": labels,
        "ref_logps": reference,
        "ref_KL_logps": kl_reference,
    }
    return KTOTrainer._compute_loss(stand_in, model, inputs, return_outputs=False)


def _kl_logps(n: int):
    kl_policy = -torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return kl_policy, kl_policy - 0.05  # the policy drifted: KL estimate 0.05


def test_kto_matches_trl_kto_trainer():
    """TRL's KTOTrainer._compute_loss on the pairs as 6 examples (chosen: label true), with the
    same KL log-probs: compo's per-pair mean of the two examples' losses is TRL's mean."""
    from compo.losses import KTO

    _, _, policy, reference, _ = _batch()
    beta, weights = 0.3, (1.5, 0.7)
    completions = torch.cat([policy[0].sum_logps, policy[1].sum_logps])
    kl_policy, kl_reference = _kl_logps(6)
    labels = torch.tensor([True] * 3 + [False] * 3)
    expected = _trl_kto_loss(
        completions, labels, torch.cat(reference), kl_policy, kl_reference, beta, weights
    )
    kl = (kl_policy - kl_reference).mean().clamp(min=0)
    ours = KTO(beta=beta, desirable_weight=weights[0], undesirable_weight=weights[1])
    got, *_ = ours(policy, reference, kl)
    torch.testing.assert_close(got.mean(), expected.double(), rtol=1e-6, atol=1e-9)


def test_kto_on_unpaired_examples_matches_trl_kto_trainer():
    """The same on unpaired examples, desirable and undesirable ones interleaved and unbalanced
    (TRL's unpaired preference format): compo's mean per-example loss is TRL's."""
    from compo.losses import KTO

    _, _, policy, reference, _ = _batch()
    completions = torch.cat([policy[0].sum_logps, policy[1].sum_logps])
    scores = SequenceScores(completions, completions / 3, torch.full_like(completions, 3))
    labels = torch.tensor([True, False, False, True, False, False])
    kl_policy, kl_reference = _kl_logps(6)
    beta, weights = 0.3, (2.0, 0.8)
    expected = _trl_kto_loss(
        completions, labels, torch.cat(reference), kl_policy, kl_reference, beta, weights
    )
    kl = (kl_policy - kl_reference).mean().clamp(min=0)
    ours = KTO(beta=beta, desirable_weight=weights[0], undesirable_weight=weights[1])
    got, _ = ours.unpaired(scores, torch.cat(reference), labels, kl)
    torch.testing.assert_close(got.mean(), expected.double(), rtol=1e-6, atol=1e-9)
