"""Model loading, untying and checkpoints."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from compo.encoding import encode_pairs
from compo.errors import CompoError, ModelLoadError
from compo.models import EmbeddedSmolLM2, PretrainedModel, TinyModel, save_checkpoint
from compo.scoring import score_pairs
from compo.types import PreferencePair


def test_tiny_model_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first, _ = TinyModel(seed=1).load()
    assert torch.equal(torch.rand(3), expected)
    second, _ = TinyModel(seed=1).load()
    other, _ = TinyModel(seed=2).load()
    assert torch.equal(first.lm_head.weight, second.lm_head.weight)
    assert not torch.equal(first.lm_head.weight, other.lm_head.weight)


def test_tiny_tokenizer_round_trips_and_has_chat_template(tiny):
    _, tokenizer = tiny
    text = "héllo, wörld ✓"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id


def test_output_layer_is_untied_so_perturbing_it_leaves_embeddings_unchanged(tiny):
    model, _ = tiny
    assert model.config.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    embeddings = model.model.embed_tokens.weight.detach().clone()
    torch.testing.assert_close(model.lm_head.weight.detach(), embeddings)  # same values at start
    with torch.no_grad():
        model.lm_head.weight.add_(torch.ones_like(model.lm_head.weight))
    assert torch.equal(model.model.embed_tokens.weight, embeddings)


def test_checkpoint_is_safetensors_and_reloads_untied(tiny, tmp_path):
    model, tokenizer = tiny
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)
    path = save_checkpoint(model, tokenizer, tmp_path / "checkpoint")
    assert (path / "model.safetensors").is_file()
    assert not list(path.glob("*.bin")) and not list(path.glob("*.pt"))
    reloaded = AutoModelForCausalLM.from_pretrained(path)
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
    assert torch.equal(reloaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert AutoTokenizer.from_pretrained(path).chat_template
    # Saving again replaces the directory whole.
    save_checkpoint(model, tokenizer, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_local_directory_loads_through_pretrained_model(tiny, tmp_path):
    model, tokenizer = tiny
    save_checkpoint(model, tokenizer, tmp_path / "m")
    loaded, _ = PretrainedModel(str(tmp_path / "m")).load()
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_missing_model_is_a_one_line_user_error(tmp_path):
    with pytest.raises(ModelLoadError, match="cannot load model") as err:
        PretrainedModel(str(tmp_path / "nowhere")).load()
    assert "\n" not in str(err.value)
    with pytest.raises(CompoError, match=r"^model\.dtype: 'float8' is not one of"):
        PretrainedModel(str(tmp_path), dtype="float8")  # refused when built, before any loading


@pytest.mark.parametrize("name", [None, "", " "])
def test_no_model_named_is_said_in_words_when_built(name):
    # Used to be looked up on the hub as the model 'None'.
    with pytest.raises(CompoError, match=r"^model\.name_or_path: no model given") as err:
        PretrainedModel(name)
    assert "None" not in str(err.value)


@pytest.mark.slow
def test_real_default_model_loads_untied_and_scores_a_pair():
    model, tokenizer = EmbeddedSmolLM2().load()
    assert model.config.vocab_size == 49152 and model.config.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    pair = PreferencePair(
        "colors",
        "Name three primary colors.",
        "The primary colors are red, blue, and yellow.",
        "The primary colors are purple, banana, and Tuesday.",
    )
    encoded, _ = encode_pairs([pair], tokenizer, max_length=256, max_prompt_length=128)
    chosen, rejected = score_pairs(model, encoded, tokenizer.pad_token_id)
    assert torch.isfinite(chosen.sum_logps).all()
    assert chosen.sum_logps.item() > rejected.sum_logps.item()
