"""LoRA for the first-order stage (dpo.lora): only the adapters train, the merge is
W + B @ A * alpha / r, the adapter loads with peft, resume is exact, and ComPO runs after it."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import mixed_pair_rows, run_compo
from safetensors.torch import load_file

import compo.dpo
from compo.dpo import DPOTrainer
from compo.errors import CompoError
from compo.lora import LoRA
from compo.models import TinyModel
from compo.rundir import RunDir

peft = pytest.importorskip("peft")

R, ALPHA = 4, 8.0


def _trainer(**kwargs) -> DPOTrainer:
    lora = LoRA(r=R, alpha=ALPHA, dropout=kwargs.pop("dropout", 0.0), **kwargs.pop("lora", {}))
    settings = dict(lr=1e-2, batch_size=2, epochs=2, scope="last_k", last_k=1, max_grad_norm=None)
    return DPOTrainer(**{**settings, **kwargs}, lora=lora)


def _adapter(path) -> dict[str, dict[str, torch.Tensor]]:
    """``{module name: {"A": ..., "B": ...}}`` from a PEFT adapter directory."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(path / "adapter_model.safetensors").items():
        module, _, kind = key.removeprefix("base_model.model.").rpartition(".lora_")
        out.setdefault(module, {})[kind.split(".")[0]] = value
    return out


def test_only_the_adapters_train_and_the_merge_is_base_plus_b_a_scale(easy_encoded, tmp_path):
    model, tokenizer = TinyModel(seed=0).load()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics = _trainer().train(model, easy_encoded, tokenizer.pad_token_id, RunDir(tmp_path))
    # The merged model is plain again: same parameter names, no adapter layer left.
    assert [n for n, _ in model.named_parameters()] == list(before)
    assert not any("lora" in type(m).__module__ for m in model.modules())
    adapter = _adapter(tmp_path / "dpo_adapter")
    targets = {f"model.layers.1.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj")}
    targets |= {f"model.layers.1.{m}" for m in ("self_attn.v_proj", "self_attn.o_proj")}
    targets |= {f"model.layers.1.mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")}
    assert set(adapter) == targets  # all-linear within the trained block, not the output layer
    assert metrics["n_trainable_params"] == sum(
        t.numel() for a in adapter.values() for t in a.values()
    )
    for name, param in model.named_parameters():
        module = name.removesuffix(".weight")
        if module in adapter:
            a, b = adapter[module]["A"], adapter[module]["B"]
            assert b.abs().max() > 0, f"{module}: B did not train"
            torch.testing.assert_close(param, before[name] + b @ a * (ALPHA / R), rtol=0, atol=1e-6)
        else:  # embeddings, block 0, norms, the output layer: untouched (TRL-style snapshot)
            assert torch.equal(param, before[name]), f"{name} changed outside the adapters"
    # The resume state holds the adapters alone.
    state = load_file(next((tmp_path / "dpo_state").glob("trainable-*.safetensors")))
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state)


def test_the_adapter_loads_with_peft_onto_the_starting_model(easy_encoded, tmp_path):
    model, tokenizer = TinyModel(seed=0).load()
    _trainer(lora={"target_modules": ["q_proj", "v_proj"]}).train(
        model, easy_encoded, tokenizer.pad_token_id, RunDir(tmp_path)
    )
    config = json.loads((tmp_path / "dpo_adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (R, ALPHA)
    assert sorted(config["target_modules"]) == [
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    base, _ = TinyModel(seed=0).load()
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "dpo_adapter").merge_and_unload()
    for (name, got), want in zip(loaded.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=name)


def test_dropout_is_seeded_and_resume_is_exact(tiny, easy_encoded, tmp_path, monkeypatch):
    pad = tiny[1].pad_token_id
    settings = dict(dropout=0.3, epochs=2, batch_size=1, warmup_steps=1, schedule="linear")
    runs = []
    for global_seed in (1, 2):  # where the global RNG stands must not matter
        torch.manual_seed(global_seed)
        model, _ = TinyModel(seed=0).load()
        _trainer(**settings).train(model, easy_encoded, pad, RunDir(tmp_path / str(global_seed)))
        runs.append(model)
    for (name, p), q in zip(runs[0].named_parameters(), runs[1].parameters(), strict=True):
        assert torch.equal(p, q), name

    real = compo.dpo.save_state

    def dies_after_step_3(*args):
        real(*args)
        if args[-1]["step"] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(compo.dpo, "save_state", dies_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        _trainer(**settings, save_every=1).train(
            TinyModel(seed=0).load()[0], easy_encoded, pad, RunDir(tmp_path / "c")
        )
    monkeypatch.setattr(compo.dpo, "save_state", real)
    torch.manual_seed(3)
    resumed, _ = TinyModel(seed=0).load()
    metrics = _trainer(**settings).train(resumed, easy_encoded, pad, RunDir(tmp_path / "c"))
    assert metrics["resumed_from_step"] == 3 and metrics["steps_run"] == 5
    for (name, p), q in zip(runs[0].named_parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7, msg=name)
    adapters = [_adapter(tmp_path / d / "dpo_adapter") for d in ("1", "c")]
    assert adapters[0].keys() == adapters[1].keys()

    # Another rank is another adapter: the state is refused in one line naming the setting.
    with pytest.raises(CompoError, match=r"written with dpo\.lora\.r=4, this run has 8; "):
        DPOTrainer(
            lr=1e-2, batch_size=1, epochs=2, scope="last_k", last_k=1, max_grad_norm=None,
            warmup_steps=1, schedule="linear", lora=LoRA(r=8, alpha=ALPHA, dropout=0.3),
        ).train(TinyModel(seed=0).load()[0], easy_encoded, pad, RunDir(tmp_path / "c"))  # fmt: skip


def test_a_bf16_trunk_trains_fp32_adapters(easy_encoded, tmp_path):
    model, tokenizer = TinyModel(seed=0, dtype="bfloat16").load()
    _trainer().train(model, easy_encoded, tokenizer.pad_token_id, RunDir(tmp_path))
    state = load_file(next((tmp_path / "dpo_state").glob("trainable-*.safetensors")))
    assert {t.dtype for t in state.values()} == {torch.float32}
    assert model.model.layers[1].self_attn.q_proj.weight.dtype == torch.bfloat16  # merged in
    assert model.lm_head.weight.dtype == torch.float32


def test_lora_then_compo_end_to_end(tmp_path, write_jsonl):
    run_dir = tmp_path / "run"
    metrics = run_compo(
        run_dir,
        f"data.path={write_jsonl(mixed_pair_rows())}",
        "splitter.delta=10",
        "dpo.lr=1e-2",
        "dpo.last_k=1",
        f"dpo.lora.r={R}",
        f"dpo.lora.alpha={ALPHA}",
        "optimizer=compo_tiny",
        "oracle=likelihood",
    )
    assert metrics["dpo.steps_run"] > 0 and metrics["compo.n_applied"] > 0
    checkpoint = run_dir / "checkpoint"
    weights = load_file(checkpoint / "model.safetensors")
    start, _ = TinyModel(seed=0).load()
    via_peft = peft.PeftModel.from_pretrained(start, checkpoint / "adapter").merge_and_unload()
    for name, param in via_peft.named_parameters():
        if name == "lm_head.weight":  # ComPO perturbed the merged model's output layer
            assert not torch.equal(weights[name], param)
        else:  # every other weight is the starting model's plus the adapter's update
            torch.testing.assert_close(weights[name], param, rtol=0, atol=1e-6, msg=name)
    assert metrics["dpo.n_trainable_params"] == sum(
        t.numel() for t in load_file(checkpoint / "adapter" / "adapter_model.safetensors").values()
    )


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        ({"r": -1}, "dpo.lora.r must be an integer >= 0, got -1"),
        ({"r": 4, "alpha": 0}, "dpo.lora.alpha must be a finite number > 0, got 0"),
        ({"r": 4, "dropout": 1.0}, "dpo.lora.dropout must be a finite number in [0, 1), got 1.0"),
        ({"r": 4, "target_modules": "q_proj"}, "dpo.lora.target_modules must be a list of names"),
        ({"r": 4, "target_modules": []}, "dpo.lora.target_modules must name at least one"),
    ],
)
def test_bad_lora_settings_are_one_line(lora, message):
    with pytest.raises(CompoError) as info:
        LoRA(**lora)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_targets_outside_the_trained_blocks_are_refused(easy_encoded, tmp_path):
    model, tokenizer = TinyModel(seed=0).load()
    with pytest.raises(CompoError, match=r"'lm_head' matches no linear layer of the trained"):
        _trainer(lora={"target_modules": ["lm_head"]}).train(
            model, easy_encoded, tokenizer.pad_token_id, RunDir(tmp_path)
        )
    with pytest.raises(CompoError, match=r"dpo\.lora needs trained blocks: dpo\.last_k must be"):
        _trainer(last_k=0).train(model, easy_encoded, tokenizer.pad_token_id, RunDir(tmp_path))


def test_without_peft_lora_is_one_line_naming_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a)
    )
    with pytest.raises(
        CompoError, match=r'^dpo\.lora\.r > 0 needs peft: pip install "compo\[lora\]"'
    ):
        LoRA(r=8)
    assert not LoRA(r=0).enabled  # off needs no peft


def test_lora_null_or_rank_zero_is_off(tmp_path, write_jsonl):
    data = write_jsonl(mixed_pair_rows())
    for off in ("dpo.lora=null", "dpo.lora.r=0"):
        run_dir = tmp_path / off
        run_compo(run_dir, f"data.path={data}", "optimizer=none", "eval=none", off)
        assert not (run_dir / "dpo_adapter").exists()
        assert not (run_dir / "checkpoint" / "adapter").exists()


def test_kto_reference_point_under_lora_dropout_does_not_depend_on_the_global_rng(
    tiny, easy_encoded, tmp_path
):
    # KTO's KL term runs the policy in training mode too: its dropout masks must be seeded.
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        model, _ = TinyModel(seed=0).load()
        _trainer(loss="kto", dropout=0.3).train(
            model, easy_encoded, tiny[1].pad_token_id, RunDir(tmp_path / str(global_seed))
        )
        runs.append(model)
    for (name, p), q in zip(runs[0].named_parameters(), runs[1].parameters(), strict=True):
        assert torch.equal(p, q), name
