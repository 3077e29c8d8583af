"""Every numeric setting is checked where it is constructed: one line naming the key and range.

Each case is a command-line override a user might type; building its group (no model is loaded
except for the model group's tiny case) must end in one :class:`CompoError` line naming the key.
"""

from __future__ import annotations

import math

import pytest
import torch
from hydra import compose, initialize_config_dir

from compo import settings
from compo.cli import CONFIG_DIR, _build, check_run_settings
from compo.errors import CompoError
from compo.models import save_checkpoint

# (overrides, group built, key the message must name)
BAD = [
    # Settings that used to train and save a wrong model with exit 0.
    (["optimizer.step_size=nan"], "optimizer", "optimizer.step_size"),
    (["splitter.delta=nan"], "splitter", "splitter.delta"),
    (["dpo.loss.beta=0"], "dpo", "dpo.loss.beta"),
    (["dpo.loss.beta=-1"], "dpo", "dpo.loss.beta"),
    (["optimizer.max_iterations=-2"], "optimizer", "optimizer.max_iterations"),
    (["data.limit=0"], "data", "data.limit"),
    (["optimizer.radius=0"], "optimizer", "optimizer.radius"),
    (["optimizer.threshold=2"], "optimizer", "optimizer.threshold"),
    # Settings that used to end in a traceback or an error without its reason.
    (["optimizer.num_directions=-3"], "optimizer", "optimizer.num_directions"),
    (["optimizer.num_directions=lots"], "optimizer", "optimizer.num_directions"),
    (["dpo.lr=nan"], "dpo", "dpo.lr"),
    (["optimizer.keep_fraction=0"], "optimizer", "optimizer.keep_fraction"),
    (["model=tiny", "model.hidden_size=62"], "model", "model.hidden_size"),
    (["model=tiny", "model.num_layers=0"], "model", "model.num_layers"),
    # The rest of each group's numbers.
    (["dpo.lr=0"], "dpo", "dpo.lr"),
    (["dpo.lr=1e300"], "dpo", "dpo.lr"),
    (["dpo.epochs=0"], "dpo", "dpo.epochs"),
    (["dpo.warmup_steps=-1"], "dpo", "dpo.warmup_steps"),
    (["dpo.weight_decay=-0.1"], "dpo", "dpo.weight_decay"),
    (["dpo.max_grad_norm=0"], "dpo", "dpo.max_grad_norm"),
    (["dpo.save_every=-1"], "dpo", "dpo.save_every"),
    (["dpo.last_k=-1"], "dpo", "dpo.last_k"),
    (["dpo=simpo", "dpo.loss.gamma=nan"], "dpo", "dpo.loss.gamma"),
    (["dpo=cdpo", "dpo.loss.label_smoothing=0.5"], "dpo", "dpo.loss.label_smoothing"),
    (["dpo=cpo", "dpo.loss.cpo_alpha=-1"], "dpo", "dpo.loss.cpo_alpha"),
    (["dpo.loss.rpo_alpha=nan"], "dpo", "dpo.loss.rpo_alpha"),
    (["dpo.loss.ld_alpha=1.5"], "dpo", "dpo.loss.ld_alpha"),
    (["dpo=kto", "dpo.loss.desirable_weight=0"], "dpo", "dpo.loss.desirable_weight"),
    (["dpo=ipo", "dpo.loss.ld_alpha=0.5"], "dpo", "dpo.loss.ld_alpha"),
    (["dpo.loss=dpo2"], "dpo", "dpo.loss"),
    (["optimizer.step_size=0"], "optimizer", "optimizer.step_size"),
    (["optimizer.threshold=-0.1"], "optimizer", "optimizer.threshold"),
    (["optimizer.clip_threshold=-1"], "optimizer", "optimizer.clip_threshold"),
    (["optimizer.keep_fraction=1.5"], "optimizer", "optimizer.keep_fraction"),
    (["optimizer.perturbation_batch=0"], "optimizer", "optimizer.perturbation_batch"),
    (["optimizer.save_every=-1"], "optimizer", "optimizer.save_every"),
    (["optimizer.batch_size=2.5"], "optimizer", "optimizer.batch_size"),
    (["optimizer.radius=inf"], "optimizer", "optimizer.radius"),
    (["optimizer=compo_lowrank", "optimizer.directions.rank=0"], "optimizer", "directions.rank"),
    (["optimizer=compo_support", "optimizer.directions.top_k=0"], "optimizer", "directions.top_k"),
    (["data.max_length=0"], "data", "data.max_length"),
    (["data.max_prompt_length=-5"], "data", "data.max_prompt_length"),
    (["splitter.delta=-1"], "splitter", "splitter.delta"),
    (["splitter.batch_size=0"], "splitter", "splitter.batch_size"),
    (["splitter=ches", "splitter.fraction=nan"], "splitter", "splitter.fraction"),
    (["splitter=confidence", "splitter.threshold=1.5"], "splitter", "splitter.threshold"),
    (["eval.batch_size=0"], "eval", "eval.batch_size"),
    (["oracle=generative", "oracle.max_new_tokens=0"], "oracle", "oracle.max_new_tokens"),
    (["oracle=generative", "oracle.temperature=nan"], "oracle", "oracle.temperature"),
    (["oracle=sample_scored", "oracle.num_samples=1"], "oracle", "oracle.num_samples"),
    (["oracle=openai_judge", "oracle.judge.timeout=0"], "oracle", "oracle.judge.timeout"),
    (["oracle=openai_judge", "oracle.judge.max_retries=-1"], "oracle", "oracle.judge.max_retries"),
    # Found by a hostile probe: booleans given as words, huge numbers, wrong types.
    (["dpo.weight_by_confidence=no"], "dpo", "dpo.weight_by_confidence"),
    (["dpo.loss.per_token=maybe"], "dpo", "dpo.loss.per_token"),
    (["splitter.per_token=2"], "splitter", "splitter.per_token"),
    (["splitter=ches", "splitter.normalize=nope"], "splitter", "splitter.normalize"),
    (["optimizer.centred=yes"], "optimizer", "optimizer.centred"),
    (["oracle=generative", "oracle.graded=1"], "oracle", "oracle.graded"),
    (["model.init_std=1e30"], "model", "model.init_std"),
    (["optimizer=compo_tiny", "optimizer.directions=5"], "optimizer", "optimizer.directions"),
    (["data.path=5"], "data", "data.path"),
    (["optimizer.pairs_path=5"], "optimizer", "optimizer.pairs_path"),
    # An unset shell variable (data.path=$DATA) must not train on the embedded default set.
    (["data.path="], "data", "data.path"),
    (["data.path=' '"], "data", "data.path"),
    (["optimizer.pairs_path="], "optimizer", "optimizer.pairs_path"),
    (["optimizer.modules=null"], "optimizer", "optimizer.modules"),
    (["optimizer.modules=foo"], "optimizer", "optimizer.modules"),
    (["oracle=human", "oracle.judge.poll_seconds=0"], "oracle", "oracle.judge.poll_seconds"),
    (["oracle=human", "oracle.judge.wait_seconds=nan"], "oracle", "oracle.judge.wait_seconds"),
    (["oracle=human", "oracle.judge.port=70000"], "oracle", "oracle.judge.port"),
    (["oracle=human", "oracle.judge.mode=browser"], "oracle", "oracle.judge.mode"),
    (["oracle=reward_model", "oracle.judge.epsilon=-1"], "oracle", "oracle.judge.epsilon"),
    (["oracle=scorer", "oracle.judge.epsilon=nan"], "oracle", "oracle.judge.epsilon"),
]


def _group(overrides, group):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny", *overrides])
    return cfg[group]


@pytest.mark.parametrize(("overrides", "group", "key"), BAD, ids=[" ".join(o) for o, _, _ in BAD])
def test_bad_setting_is_one_line_naming_the_key(overrides, group, key, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")  # so the judge gets as far as its settings
    with pytest.raises(CompoError) as info:
        built = _build(_group(overrides, group), group)
        if group == "model":
            built.load()
    message = str(info.value)
    assert key in message and "\n" not in message, message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("seed", "abc"),
        ("seed", -1),
        ("seed", 1.5),
        ("seed", 2**64),  # torch.manual_seed overflows
        ("seed", int("9" * 400)),  # math.isfinite overflows
        ("device", "cuda:7"),
        ("device", "xpu"),  # a device type torch knows but this build has not
        ("device", "meta"),
    ],
)
def test_top_level_settings_are_checked(key, value):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny", f"{key}={value}"])
    if key == "device" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has the device")
    with pytest.raises(CompoError, match=f"^{key}"):
        check_run_settings(cfg)


def test_good_defaults_pass_every_group():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny"])
    check_run_settings(cfg)
    for group in ("data", "splitter", "dpo", "optimizer", "oracle", "eval"):
        _build(cfg[group], group)


@pytest.mark.parametrize(
    ("value", "kwargs", "ok"),
    [
        (1, {"integer": True, "ge": 1}, True),
        (True, {"integer": True, "ge": 0}, False),
        (2.0, {"integer": True, "ge": 0}, False),
        (math.nan, {"gt": 0}, False),
        (math.inf, {"gt": 0}, False),
        ("0.1", {"gt": 0}, False),
        (0.0, {"ge": 0, "lt": 1}, True),
        (1.0, {"ge": 0, "lt": 1}, False),
        (None, {"gt": 0, "optional": True}, True),
        (None, {"gt": 0}, False),
    ],
)
def test_number_domain(value, kwargs, ok):
    if ok:
        assert settings.number("k", value, **kwargs) == value
    else:
        with pytest.raises(settings.SettingError, match=r"^k must be"):
            settings.number("k", value, **kwargs)


def test_number_message_names_the_range():
    with pytest.raises(settings.SettingError) as info:
        settings.number("optimizer.keep_fraction", 0, gt=0, le=1, optional=True)
    assert str(info.value) == (
        "optimizer.keep_fraction must be a finite number in (0, 1] or null, got 0"
    )


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_no_checkpoint_with_nan_or_inf_weights(tiny, tmp_path, bad):
    model, tokenizer = tiny
    with torch.no_grad():
        model.lm_head.weight[3, 5] = bad
    with pytest.raises(CompoError, match=r"lm_head\.weight"):
        save_checkpoint(model, tokenizer, tmp_path / "checkpoint")
    assert not (tmp_path / "checkpoint").exists()


@pytest.mark.parametrize(
    ("key", "check", "value"),
    [
        ("seed", settings.seed, "3"),
        ("optimizer.step_size", lambda k, v: settings.number(k, v, gt=0), "0.5"),
        ("optimizer.centred", settings.flag, "true"),
    ],
)
def test_a_number_or_flag_given_as_text_says_how_to_decode_it(key, check, value):
    # seed=${oc.env:SEED,3} gives the text '3': "got '3'" left the user puzzled. The advice names
    # the failing key and is quoted so that it survives a shell as typed.
    with pytest.raises(settings.SettingError) as info:
        check(key, value)
    advice = f"""'{key}="${{oc.decode:${{oc.env:VAR,{value}}}}}"'"""
    assert str(info.value).endswith(
        f"got {value!r} (text, as ${{oc.env:...}} gives: decode it, on the command line {advice})"
    )


def test_a_word_that_is_no_number_gets_no_decoding_hint():
    with pytest.raises(settings.SettingError) as info:
        settings.number("optimizer.step_size", "big", gt=0)
    assert str(info.value).endswith("got 'big'")


def test_a_required_setting_left_unset_is_one_line_naming_it(tmp_path):
    # compo model=pretrained without model.name_or_path ended in a 40-line MissingMandatoryValue.
    from conftest import run_compo

    with pytest.raises(CompoError) as info:
        run_compo(tmp_path, "model=pretrained")
    assert str(info.value).startswith("model.name_or_path: must be set (it has no default)")
    assert "\n" not in str(info.value)
