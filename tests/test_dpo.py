"""First-order stage: each loss against its paper's formula, trainable scope, training, resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

import compo.dpo
from compo.dpo import DPOTrainer
from compo.dpo_loop import SCHEDULES, lr_scheduler
from compo.errors import CompoError
from compo.losses import CDPO, CPO, DPO, IPO, ORPO, RDPO, SFT, Hinge, SimPO
from compo.rundir import RunDir
from compo.scoring import SequenceScores, score_pairs
from compo.trunk import set_trainable


def _l(x: float) -> float:
    """-log sigmoid(x)."""
    return math.log1p(math.exp(-x))


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _trainer(**kwargs) -> DPOTrainer:
    defaults = dict(lr=1e-3, batch_size=2, scope="all", max_grad_norm=None)
    return DPOTrainer(**{**defaults, **kwargs})


# --------------------------------------------------------------------------------------------
# Losses on hand-computed log-probs
# --------------------------------------------------------------------------------------------

# pc, pr, rc, rr with h = (pc - rc) - (pr - rr) = 1 - (-1) = 2.
LOGPS = (_t(-5.0), _t(-7.0), _t(-6.0), _t(-6.0))


def _scores(sums, means):
    """Chosen and rejected SequenceScores of one pair from (sum, mean) log-probs."""
    return tuple(
        SequenceScores(_t(s), _t(m), torch.tensor([max(1, round(s / m))]))
        for s, m in zip(sums, means, strict=True)
    )


def test_dpo_loss_matches_formula():
    loss, chosen_r, rejected_r = DPO(beta=0.5).pair(*LOGPS)
    assert loss.item() == pytest.approx(_l(0.5 * 2))
    assert chosen_r.item() == pytest.approx(0.5) and rejected_r.item() == pytest.approx(-0.5)


def test_cdpo_loss_matches_formula():
    loss, *_ = CDPO(beta=0.5, label_smoothing=0.2).pair(*LOGPS)
    assert loss.item() == pytest.approx(0.8 * _l(1.0) + 0.2 * _l(-1.0))


def test_rdpo_loss_matches_formula_and_is_unbiased():
    eps = 0.2
    rdpo = RDPO(beta=0.5, label_smoothing=eps)
    loss, *_ = rdpo.pair(*LOGPS)
    assert loss.item() == pytest.approx((0.8 * _l(1.0) - 0.2 * _l(-1.0)) / (1 - 2 * eps))
    # Chowdhury et al.'s point: averaged over a label flipped with probability eps, it is the
    # clean DPO loss.
    pc, pr, rc, rr = LOGPS
    flipped, *_ = rdpo.pair(pr, pc, rr, rc)
    assert ((1 - eps) * loss + eps * flipped).item() == pytest.approx(_l(1.0))
    with pytest.raises(CompoError, match="label_smoothing"):
        RDPO(beta=0.5, label_smoothing=0.5)


def test_ipo_loss_matches_formula():
    loss, *_ = IPO(beta=0.25).pair(*LOGPS)
    assert loss.item() == pytest.approx((2 - 1 / (2 * 0.25)) ** 2)
    assert IPO().per_token  # as TRL: IPO on length-averaged log-probs


def test_hinge_loss_matches_formula():
    loss, *_ = Hinge(beta=0.25).pair(*LOGPS)  # 1 - 0.25 * 2 = 0.5
    assert loss.item() == pytest.approx(0.5)
    assert Hinge(beta=1.0).pair(*LOGPS)[0].item() == 0.0  # margin beyond 1: no loss


def test_simpo_loss_matches_formula_and_ignores_the_reference():
    pc, pr = _t(-1.0), _t(-1.5)  # already length-normalised
    loss, chosen_r, _ = SimPO(beta=2.0, gamma=0.5).pair(pc, pr, _t(3.0), _t(-9.0))
    assert loss.item() == pytest.approx(_l(2.0 * 0.5 - 0.5))
    assert chosen_r.item() == pytest.approx(-2.0)
    assert SimPO().per_token and not SimPO.needs_reference


# Chosen: 4 tokens summing to -4 (mean -1); rejected: 2 tokens summing to -6 (mean -3).
PAIR = _scores((-4.0, -6.0), (-1.0, -3.0))
NO_REF = (_t(0.0), _t(0.0))


def test_rpo_alpha_adds_the_chosen_nll_per_token():
    plain, *_ = DPO(beta=0.5)(PAIR, NO_REF)
    with_nll, *_ = DPO(beta=0.5, rpo_alpha=0.3)(PAIR, NO_REF)
    assert plain.item() == pytest.approx(_l(0.5 * 2.0))  # summed: -4 - (-6) = 2
    assert (with_nll - plain).item() == pytest.approx(0.3 * 1.0)  # mean NLL of chosen = 1


def test_cpo_loss_matches_formula():
    loss, chosen_r, _ = CPO(beta=0.5, cpo_alpha=2.0)(PAIR, NO_REF)
    assert loss.item() == pytest.approx(_l(0.5 * 2.0) + 2.0 * 1.0)
    assert chosen_r.item() == pytest.approx(0.5 * -4.0) and not CPO.needs_reference
    simpo_style, *_ = CPO(beta=0.5, cpo_alpha=0.0, gamma=0.25, per_token=True)(PAIR, NO_REF)
    assert simpo_style.item() == pytest.approx(_l(0.5 * 2.0 - 0.25))  # means: -1 - (-3) = 2


def test_orpo_loss_matches_formula():
    beta = 0.1
    loss, *_ = ORPO(beta=beta)(PAIR, NO_REF)

    def log_odds(m):
        return m - math.log(1 - math.exp(m))

    ratio = log_odds(-1.0) - log_odds(-3.0)
    assert loss.item() == pytest.approx(1.0 + beta * _l(ratio))
    assert ORPO().per_token and not ORPO.needs_reference


def test_sft_loss_is_the_chosen_nll_and_ignores_the_rejected():
    loss, *_ = SFT()(PAIR, NO_REF)
    assert loss.item() == pytest.approx(1.0)
    other = _scores((-4.0, -60.0), (-1.0, -30.0))
    assert SFT()(other, NO_REF)[0].item() == loss.item()


@pytest.mark.parametrize("name", ["dpo", "cdpo", "rdpo"])
def test_loss_is_ln2_per_pair_at_initialisation(tiny, easy_encoded, name):
    model, tokenizer = tiny
    trainer = DPOTrainer(loss=name)
    ref = trainer.reference_logps(model, easy_encoded, tokenizer.pad_token_id)
    policy = score_pairs(model, easy_encoded, tokenizer.pad_token_id, requires_grad=True)
    losses, *_ = trainer.loss(policy, ref)
    assert losses.shape == (len(easy_encoded),)
    torch.testing.assert_close(losses, torch.full_like(losses, math.log(2)), atol=1e-5, rtol=0)


def test_unknown_loss_and_bad_options_are_user_errors():
    with pytest.raises(CompoError, match=r"dpo\.loss"):
        DPOTrainer(loss="dpo2")
    with pytest.raises(CompoError, match=r"dpo\.schedule"):
        DPOTrainer(schedule="exponential")
    with pytest.raises(CompoError, match=r"dpo\.batch_size"):
        DPOTrainer(batch_size=0)


def _trace(run_dir, phase: str = "dpo") -> list[dict]:
    lines = (run_dir / "trace" / f"{phase}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize(
    "schedule, factors",
    [
        # transformers' schedules: warm-up from 0 over 2 steps, then 6 steps to go.
        ("constant", [0, 0.5, 1, 1, 1, 1, 1, 1]),
        ("linear", [0, 0.5, *(k / 6 for k in range(6, 0, -1))]),
        ("cosine", [0, 0.5, *(0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6))]),
    ],
)
def test_lr_per_step_is_the_transformers_schedule(tiny, easy_encoded, tmp_path, schedule, factors):
    model, tokenizer = tiny
    trainer = _trainer(batch_size=1, epochs=2, warmup_steps=2, schedule=schedule)
    trainer.train(model, easy_encoded, tokenizer.pad_token_id, RunDir(tmp_path))
    lrs = [row["lr"] for row in _trace(tmp_path)]
    assert lrs == pytest.approx([1e-3 * f for f in factors], rel=1e-9, abs=1e-15)


def test_every_offered_schedule_runs_and_unknown_ones_are_one_line():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    for name in SCHEDULES:  # each maps to a transformers schedule needing only the step counts
        lr_scheduler(optimizer, name, 2, 10)
    with pytest.raises(CompoError, match=r"dpo\.schedule: 'reduce_lr_on_plateau' is not one of"):
        DPOTrainer(schedule="reduce_lr_on_plateau")


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def test_last_k_scope_trains_only_the_top(tiny, easy_encoded, tmp_path):
    model, tokenizer = tiny
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = _trainer(scope="last_k", last_k=1, epochs=2)
    trainer.train(model, easy_encoded, tokenizer.pad_token_id, RunDir(tmp_path))
    inside = ("model.layers.1.", "model.norm.", "lm_head.")
    for name, param in model.named_parameters():
        if name.startswith(inside):
            assert not torch.equal(param, before[name]), f"{name} did not change"
        else:
            assert torch.equal(param, before[name]), f"{name} changed outside the scope"
    assert not any(p.requires_grad for p in model.model.layers[0].parameters())


def test_scope_names(tiny):
    model, _ = tiny
    assert len(set_trainable(model, "all", 0)) == len(list(model.parameters()))
    assert set_trainable(model, "last_k", 0) == ["model.norm.weight", "lm_head.weight"]
    with pytest.raises(CompoError, match="last_k"):
        set_trainable(model, "last_k", 3)


def test_training_raises_preference_accuracy(tiny, easy_encoded, tmp_path):
    model, tokenizer = tiny
    pad = tokenizer.pad_token_id
    chosen, rejected = score_pairs(model, easy_encoded, pad)
    acc_before = (chosen.sum_logps > rejected.sum_logps).float().mean().item()
    assert acc_before < 1.0  # otherwise the test shows nothing
    out = RunDir(tmp_path)
    metrics = _trainer(epochs=6, loss=DPO(beta=0.5)).train(model, easy_encoded, pad, out)
    chosen, rejected = score_pairs(model, easy_encoded, pad)
    assert (chosen.sum_logps > rejected.sum_logps).float().mean().item() == 1.0
    assert metrics["loss_last"] < metrics["loss_first"] == pytest.approx(math.log(2), abs=1e-4)
    rows = [json.loads(x) for x in (tmp_path / "trace" / "dpo.jsonl").read_text().splitlines()]
    assert len(rows) == metrics["total_steps"] == 12
    assert {"loss", "reward_margin", "accuracy", "logp_chosen", "logp_rejected", "lr"} <= set(
        rows[0]
    )


@pytest.mark.parametrize("name", ["ipo", "cdpo", "rdpo", "hinge", "simpo", "cpo", "orpo"])
def test_every_loss_trains(tiny, easy_encoded, tmp_path, name):
    model, tokenizer = tiny
    trainer = _trainer(loss=name, epochs=3)
    metrics = trainer.train(model, easy_encoded, tokenizer.pad_token_id, RunDir(tmp_path))
    assert metrics["reward_margin_last"] > metrics["reward_margin_first"]


def test_sft_raises_the_chosen_likelihood(tiny, easy_encoded, tmp_path):
    model, tokenizer = tiny
    metrics = _trainer(loss="sft", epochs=3).train(
        model, easy_encoded, tokenizer.pad_token_id, RunDir(tmp_path)
    )
    assert metrics["logp_chosen_last"] > metrics["logp_chosen_first"]
    assert metrics["loss_last"] < metrics["loss_first"]


def test_confidence_weighting_zero_weight_pair_contributes_nothing(tiny, easy_encoded, tmp_path):
    model, tokenizer = tiny
    one_pair = easy_encoded[:1]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = _trainer(weight_by_confidence=True, batch_size=1)
    trainer.train(model, one_pair, tokenizer.pad_token_id, RunDir(tmp_path), confidences=[0.0])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_same_seed_same_result_and_resume_matches_uninterrupted(
    tiny, easy_encoded, tmp_path, monkeypatch
):
    from compo.models import TinyModel

    model, tokenizer = tiny
    pad = tokenizer.pad_token_id
    _trainer(epochs=2, seed=3).train(model, easy_encoded, pad, RunDir(tmp_path / "a"))
    twin, _ = TinyModel(seed=0).load()
    _trainer(epochs=2, seed=3).train(twin, easy_encoded, pad, RunDir(tmp_path / "b"))
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q), name

    # Killed after committing step 2 of 4 (state saved every step), then resumed from dpo_state/;
    # warm-up and a cosine decay, so every step has its own learning rate.
    schedule = dict(epochs=2, seed=3, warmup_steps=1, schedule="cosine")
    straight, _ = TinyModel(seed=0).load()
    _trainer(**schedule).train(straight, easy_encoded, pad, RunDir(tmp_path / "s"))
    real = compo.dpo.save_state

    def dies_after_step_2(*args):
        real(*args)
        if args[-1]["step"] == 2:
            raise KeyboardInterrupt

    interrupted, _ = TinyModel(seed=0).load()
    monkeypatch.setattr(compo.dpo, "save_state", dies_after_step_2)
    with pytest.raises(KeyboardInterrupt):
        _trainer(**schedule, save_every=1).train(
            interrupted, easy_encoded, pad, RunDir(tmp_path / "c")
        )
    monkeypatch.setattr(compo.dpo, "save_state", real)
    # Nothing in the state is a pickle (torch.save writes a zip holding data.pkl): safetensors
    # and JSON only, so resuming never unpickles a file from the run dir.
    saved = sorted((tmp_path / "c" / "dpo_state").iterdir())
    assert {f.suffix for f in saved} == {".safetensors", ".json"}, saved
    assert not any(f.read_bytes().startswith(b"PK") for f in saved)
    resumed, _ = TinyModel(seed=0).load()
    metrics = _trainer(**schedule).train(resumed, easy_encoded, pad, RunDir(tmp_path / "c"))
    assert metrics["resumed_from_step"] == 2 and metrics["steps_run"] == 2
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7, msg=name)
    want, got = _trace(tmp_path / "s"), _trace(tmp_path / "c")
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert [r["lr"] for r in got] == [r["lr"] for r in want]
    assert len({r["lr"] for r in want}) == 4  # the check would be void on a flat schedule

    # Done already: resuming runs nothing; a different setup is refused in one line.
    again, _ = TinyModel(seed=0).load()
    metrics = _trainer(**schedule).train(again, easy_encoded, pad, RunDir(tmp_path / "c"))
    assert metrics["steps_run"] == 0
    with pytest.raises(CompoError, match=r"written with dpo\.epochs=2, this run has 3"):
        _trainer(**{**schedule, "epochs": 3}).train(
            again, easy_encoded, pad, RunDir(tmp_path / "c")
        )


def test_frozen_trunk_cache_gives_the_same_training(tiny, easy_encoded, tmp_path):
    from compo.models import TinyModel
    from compo.trunk import FrozenTrunkCache

    model, tokenizer = tiny
    pad = tokenizer.pad_token_id
    trainer = _trainer(scope="last_k", last_k=1, epochs=2)
    _, scorer = trainer.prepare(model, easy_encoded, pad)
    assert scorer is not model  # the cached view, not a fallback
    cache = FrozenTrunkCache(model, 1)
    full = score_pairs(cache.filling(), easy_encoded, pad)
    cached = score_pairs(cache.cached(), easy_encoded, pad, batch_size=3)
    for f, c in zip(full, cached, strict=True):
        torch.testing.assert_close(c.sum_logps, f.sum_logps, rtol=0, atol=1e-4)

    trainer.train(model, easy_encoded, pad, RunDir(tmp_path / "cached"))
    plain, _ = TinyModel(seed=0).load()
    _trainer(scope="last_k", last_k=1, epochs=2, cache_trunk=False).train(
        plain, easy_encoded, pad, RunDir(tmp_path / "plain")
    )
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


def test_trunk_recorded_while_scoring_is_reused(tiny, easy_encoded):
    model, tokenizer = tiny
    pad = tokenizer.pad_token_id
    trainer = _trainer(scope="last_k", last_k=1)
    set_trainable(model, "last_k", 1)
    trunk = trainer.frozen_trunk(model)
    before = score_pairs(trunk.filling(), easy_encoded, pad)
    assert trunk.covers(easy_encoded[1:3])
    (ref_chosen, _), scorer = trainer.prepare(model, easy_encoded[1:3], pad, trunk=trunk)
    assert scorer is not model
    torch.testing.assert_close(ref_chosen, before[0].sum_logps[1:3], rtol=0, atol=1e-4)


def test_ld_alpha_trains_and_one_counts_every_token(tiny, easy_encoded, tmp_path):
    model, tokenizer = tiny
    pad = tokenizer.pad_token_id
    policy = score_pairs(model, easy_encoded, pad)
    full, ld = DPO(ld_alpha=1.0), DPO()
    torch.testing.assert_close(full.logps(policy[0]), ld.logps(policy[0]), rtol=1e-5, atol=1e-5)
    metrics = _trainer(loss=DPO(beta=0.5, ld_alpha=0.3), epochs=3).train(
        model, easy_encoded, pad, RunDir(tmp_path)
    )
    assert metrics["reward_margin_last"] > metrics["reward_margin_first"]


def test_contrast_sft_renders_the_question_and_the_negative_answer():
    from compo.losses import ContrastSFT
    from compo.types import PreferencePair

    loss = ContrastSFT(template="Q: {prompt} | avoid: {rejected} | better:")
    plain = loss.rewrite(PreferencePair("a", "Capital?", "Rome.", "Paris."))
    assert plain.prompt == "Q: Capital? | avoid: Paris. | better:" and plain.chosen == "Rome."
    chat = loss.rewrite(
        PreferencePair("b", [{"role": "user", "content": "Hi"}], "Hello!", "Go away.")
    )
    assert chat.prompt == [{"role": "user", "content": "Q: Hi | avoid: Go away. | better:"}]
    with pytest.raises(CompoError, match=r"dpo\.loss\.template"):
        ContrastSFT(template="{question} {rejected}")


def test_contrast_sft_trains_the_positive_answer_through_the_pipeline(tmp_path, write_jsonl):
    from conftest import EASY_PAIRS, run_compo

    data = write_jsonl([p.to_dict() for p in EASY_PAIRS])
    metrics = run_compo(
        tmp_path, f"data.path={data}", "splitter=none", "optimizer=none", "eval=none",
        "dpo=contrast_sft", "dpo.lr=1e-3", "dpo.epochs=4", "dpo.scope=all",
    )  # fmt: skip
    assert metrics["dpo.loss_last"] < metrics["dpo.loss_first"]
    assert metrics["dpo.logp_chosen_last"] > metrics["dpo.logp_chosen_first"]


def test_sft_then_dpo_in_one_run_takes_the_sft_model_as_reference(tmp_path, write_jsonl):
    from conftest import EASY_PAIRS, run_compo

    data = write_jsonl([p.to_dict() for p in EASY_PAIRS])
    metrics = run_compo(
        # eval on: the base model's scores exist, and the DPO step must not take them as reference
        tmp_path, f"data.path={data}", "splitter=none", "optimizer=none",
        "dpo=dpo", "dpo.lr=1e-3", "dpo.scope=all", "dpo.sft_epochs=3", "dpo.sft_lr=2e-3",
    )  # fmt: skip
    assert metrics["sft.steps_run"] == 3 and metrics["sft.loss_last"] < metrics["sft.loss_first"]
    assert metrics["dpo.steps_run"] == 1  # 4 pairs, batches of 4
    # At its first step the policy is the SFT model, which is also the reference: loss ln 2.
    assert metrics["dpo.loss_first"] == pytest.approx(math.log(2), abs=1e-5)
    assert (tmp_path / "trace" / "sft.jsonl").is_file() and (tmp_path / "sft_state").is_dir()


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_kto_loss_matches_formula_and_its_reference_point_is_detached():
    from compo.losses import KTO

    z = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    loss, chosen_r, _ = KTO(beta=0.5, desirable_weight=2.0, undesirable_weight=1.0)(
        PAIR, NO_REF, kl=z
    )
    # Summed log-probs: chosen -4, rejected -6, reference 0.
    want = (2.0 * (1 - _sig(0.5 * (-4 - 0.2))) + (1 - _sig(0.5 * (0.2 + 6)))) / 2
    assert loss.item() == pytest.approx(want) and chosen_r.item() == pytest.approx(-2.0)
    assert not loss.requires_grad  # z is an estimate, not a path for gradients (as in the paper)


def test_kto_trains_and_its_kl_starts_at_zero(tiny, easy_encoded, tmp_path):
    from compo.kto_reference import MismatchedKL

    model, tokenizer = tiny
    pad = tokenizer.pad_token_id
    kl = MismatchedKL(model, easy_encoded, pad, 8, None)
    # The policy is still the reference (up to batch-composition rounding).
    assert kl.kl([0, 1, 2]).item() == pytest.approx(0.0, abs=1e-4)
    assert kl.pairs[0].chosen_ids == easy_encoded[1].chosen_ids  # prompt 0, replies of pair 1
    metrics = _trainer(loss="kto", epochs=4).train(model, easy_encoded, pad, RunDir(tmp_path))
    assert metrics["reward_margin_last"] > metrics["reward_margin_first"]
    rows = [json.loads(x) for x in (tmp_path / "trace" / "dpo.jsonl").read_text().splitlines()]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4) and all(r["kl"] >= 0 for r in rows)


@pytest.mark.parametrize("template", ["{prompt.upper} {rejected}", "just text", "", "{prompt}"])
def test_contrast_sft_template_must_hold_the_question_and_the_negative_answer(template):
    from compo.losses import ContrastSFT

    with pytest.raises(CompoError, match=r"dpo\.loss\.template"):
        ContrastSFT(template=template)


@pytest.mark.parametrize("options", [{"per_token": False}, {"ld_alpha": 0.5}])
def test_sft_refuses_options_it_would_ignore(options):
    with pytest.raises(CompoError, match=r"dpo\.loss\.(per_token|ld_alpha)"):
        SFT(**options)
