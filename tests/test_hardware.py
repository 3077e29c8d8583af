"""device=auto and the trunk's dtype: what resolves where, and a bf16 trunk end to end on a CPU
with fp32 log-probs, an fp32 output layer (ComPO's master is the weight itself) and fp32 training
of the trainable part."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config, mixed_pair_rows, run_compo
from safetensors.torch import load_file

import compo.scoring
import compo.zo.optimizer
from compo import settings
from compo.cli import check_run_settings
from compo.dpo import DPOTrainer
from compo.errors import CompoError
from compo.models import TinyModel
from compo.rundir import RunDir
from compo.scoring import score_pairs
from compo.zo.scope import Scope

HAS_CUDA = torch.cuda.is_available()


def test_auto_device_and_dtype_resolve_to_cpu_and_float32_here():
    if HAS_CUDA:
        pytest.skip("this machine has a GPU")
    assert settings.device("device", "auto") == "cpu"
    assert settings.dtype("dtype", "auto", "cpu") == "float32"
    assert settings.dtype("dtype", "bfloat16", "cpu") == "bfloat16"  # asked for: honoured
    cfg = compose_config()
    assert (cfg.device, cfg.dtype) == ("auto", "auto")  # the defaults
    check_run_settings(cfg)  # resolved once, so every ${device} and config.yaml say what ran
    assert (cfg.device, cfg.dtype) == ("cpu", "float32")
    assert (cfg.model.device, cfg.model.dtype) == ("cpu", "float32")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "dtype=float8",
            "dtype: 'float8' is not one of ['auto', 'float32', 'bfloat16', 'float16']",
        ),
        ("dtype=1", "dtype: 1 is not one of"),
        ("device=gpu", "device: 'gpu' is not a device torch knows"),
    ],
)
def test_bad_device_or_dtype_is_one_line(override, message):
    with pytest.raises(CompoError) as info:
        check_run_settings(compose_config(override))
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_a_bf16_trunk_keeps_the_output_layer_and_the_log_probs_in_fp32(easy_encoded):
    model, tokenizer = TinyModel(seed=0, dtype="bfloat16").load()
    exact, _ = TinyModel(seed=0).load()
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.float32
    low = score_pairs(model, easy_encoded, tokenizer.pad_token_id)
    high = score_pairs(exact, easy_encoded, tokenizer.pad_token_id)
    for got, want in zip(low, high, strict=True):
        assert got.sum_logps.dtype == torch.float32
        # Same model up to bf16 rounding of the trunk: ~1% of a sum over ~20 tokens.
        torch.testing.assert_close(got.sum_logps, want.sum_logps, rtol=0.02, atol=0.5)
    scope = Scope(model)  # ComPO's master copy of the output layer is the fp32 weight itself
    assert scope.head.master.dtype == torch.float32 and scope.head.shares_storage
    # Generation goes through the model's own forward: its bf16 hidden states meet the fp32 head.
    ids = torch.tensor([easy_encoded[0].prompt_ids])
    out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=2)
    assert out.shape == (1, ids.shape[1] + 3)


def test_dpo_trains_the_top_of_a_bf16_model_in_fp32(easy_encoded, tmp_path):
    model, tokenizer = TinyModel(seed=0, dtype="bfloat16").load()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen: list[torch.dtype] = []
    hook = model.model.layers[1].mlp.up_proj.register_forward_pre_hook(
        lambda module, args: seen.append(module.weight.dtype)
    )
    DPOTrainer(lr=1e-3, batch_size=2, epochs=2, scope="last_k", last_k=1, save_every=1).train(
        model, easy_encoded, tokenizer.pad_token_id, RunDir(tmp_path)
    )
    hook.remove()
    assert torch.float32 in seen  # trained in fp32 ...
    for name, param in model.named_parameters():
        assert param.dtype == before[name].dtype, name  # ... and back in its own dtype after
        if name.startswith("model.layers.0."):
            assert torch.equal(param, before[name]), f"{name} is frozen"
        elif name.startswith(("model.layers.1.", "lm_head")):
            assert not torch.equal(param, before[name]), f"{name} did not train"
    state = next((tmp_path / "dpo_state").glob("trainable-*.safetensors"))
    assert {t.dtype for t in load_file(state).values()} == {torch.float32}  # resume keeps fp32


def test_bf16_trunk_end_to_end_with_fp32_log_probs_and_compo_master(
    tmp_path, write_jsonl, monkeypatch
):
    real_score, real_scope = compo.scoring.score_sequences, compo.zo.optimizer.Scope
    dtypes, masters = set(), []

    def score(*args, **kwargs):
        scores = real_score(*args, **kwargs)
        dtypes.add(scores.sum_logps.dtype)
        if scores.hidden is not None:
            dtypes.add(scores.hidden.dtype)
        return scores

    class Recording(real_scope):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            masters.append((self.head.master.dtype, self.head.shares_storage))

    monkeypatch.setattr(compo.scoring, "score_sequences", score)
    monkeypatch.setattr(compo.zo.optimizer, "Scope", Recording)
    run_dir = tmp_path / "run"
    metrics = run_compo(
        run_dir,
        "dtype=bfloat16",
        f"data.path={write_jsonl(mixed_pair_rows())}",
        "splitter.delta=10",
        "dpo.lr=1e-3",
        "optimizer=compo_tiny",
        "oracle=likelihood",
    )
    assert metrics["dpo.steps_run"] > 0 and metrics["compo.n_applied"] > 0
    assert dtypes == {torch.float32}
    assert masters == [(torch.float32, True)]
    weights = load_file(run_dir / "checkpoint" / "model.safetensors")
    assert weights["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert weights["lm_head.weight"].dtype == torch.float32
    start, _ = TinyModel(seed=0, dtype="bfloat16").load()
    assert not torch.equal(weights["lm_head.weight"], start.lm_head.weight)
    assert "dtype: bfloat16" in (run_dir / "config.yaml").read_text()
