"""reward_model: a tiny random Llama reward model saved to disk and loaded from its path."""

from __future__ import annotations

import pytest
import torch

from compo.errors import CompoError
from oracles.base import Verdict
from oracles.reward_model import RewardModelJudge, build_tiny_reward_model

PROMPT = "Name three primary colors."


@pytest.fixture(scope="module")
def rm_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("rm")
    model, tokenizer = build_tiny_reward_model(seed=1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_loads_from_a_local_path_and_uses_its_chat_template(rm_path):
    judge = RewardModelJudge(rm_path)
    judge.check()
    assert judge.tokenizer.chat_template  # ChatML, saved with the tokenizer
    assert "<|im_start|>assistant" in judge._render(PROMPT, "Red.")
    result = judge.judge(PROMPT, "Red, blue, yellow.", "zzz")
    assert result.verdict in (Verdict.PERTURBED_BETTER, Verdict.CURRENT_BETTER)
    assert 0.5 <= result.confidence <= 1.0


def test_batched_rewards_equal_one_at_a_time(rm_path):
    judge = RewardModelJudge(rm_path, batch_size=4)
    responses = ["Red.", "Blue and yellow and red, of course.", "zz", "A much longer answer " * 3]
    batched = judge.rewards([PROMPT] * 4, responses)
    single = [judge.rewards([PROMPT], [r])[0] for r in responses]
    assert batched == pytest.approx(single, abs=1e-5)


def test_verdict_follows_rewards_and_epsilon_ties(rm_path):
    judge = RewardModelJudge(rm_path)
    a, b = judge.rewards([PROMPT, PROMPT], ["Red.", "zz"])
    expected = Verdict.PERTURBED_BETTER if b > a else Verdict.CURRENT_BETTER
    assert judge.judge(PROMPT, "Red.", "zz").verdict == expected
    wide = RewardModelJudge(rm_path, epsilon=abs(a - b) + 1.0)
    assert wide.judge(PROMPT, "Red.", "zz").verdict == Verdict.TIE
    batch = judge.judge_batch([(PROMPT, "Red.", "zz"), (PROMPT, "x", "x")])
    assert batch[1].verdict == Verdict.TIE and judge.usage()["identical"] == 1


def test_bad_path_and_wrong_head_fail_with_one_line(tmp_path, rm_path):
    with pytest.raises(CompoError, match=r"no config\.json"):
        RewardModelJudge(str(tmp_path)).check()
    from transformers import AutoConfig, LlamaForSequenceClassification

    config = AutoConfig.from_pretrained(rm_path)
    config.num_labels = 3
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "three")
    build_tiny_reward_model()[1].save_pretrained(tmp_path / "three")
    with pytest.raises(CompoError, match="3 outputs"):
        RewardModelJudge(str(tmp_path / "three")).check()


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"device": "bogus"}, r"^oracle\.judge\.device: 'bogus' is not a device torch knows"),
        (
            {"device": "cuda:7"},
            r"^oracle\.judge\.device=cuda:7: this machine has no such device "
            r"\(use oracle\.judge\.device=cpu\)$",
        ),
        ({"dtype": "bogus"}, r"^oracle\.judge\.dtype: 'bogus' is not one of"),
        ({"dtype": "int8"}, r"^oracle\.judge\.dtype: 'int8' is not one of"),
    ],
)
def test_device_and_dtype_are_checked_at_construction(rm_path, setting, message):
    # Used to be tracebacks at load (no CUDA, unknown device), a misleading "cannot load d/rm:
    # 'bogus'", or accepted with path=tiny; now checked as the top-level device and dtype are.
    for path in ("tiny", rm_path):
        with pytest.raises(CompoError, match=message):
            RewardModelJudge(path, **setting)


@pytest.mark.parametrize("path", [None, "", "  "])
def test_no_path_is_said_in_words_at_construction(path):
    with pytest.raises(CompoError, match=r"^oracle\.judge\.path") as info:
        RewardModelJudge(path)
    assert "no reward model given" in str(info.value) and "None" not in str(info.value)


def test_dtype_auto_resolves_and_tiny_is_loaded_in_the_dtype():
    assert RewardModelJudge("tiny", device="cpu", dtype="auto").dtype == "float32"
    judge = RewardModelJudge("tiny", dtype="bfloat16")
    judge.check()
    assert next(judge.model.parameters()).dtype == torch.bfloat16


def test_a_non_finite_reward_is_an_error_naming_the_judge():
    # Used to abstain (a tie per comparison) while the scoring oracles stopped: one behaviour.
    from compo.interfaces import OracleError

    judge = RewardModelJudge("tiny")
    judge.check()
    with torch.no_grad():
        judge.model.score.weight.fill_(float("nan"))
    with pytest.raises(OracleError, match=r"^judge RewardModelJudge \(tiny\): non-finite score"):
        judge.judge(PROMPT, "Red.", "zz")
