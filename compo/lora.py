"""LoRA adapters for the first-order stage, through ``peft`` (``pip install "compo[lora]"``).

``dpo.lora.r > 0`` puts low-rank adapters on the linear layers of the blocks the stage trains
(``dpo.scope``: the last k blocks, or all of them) and trains the adapters alone: base weights,
norms and the output layer stay frozen. Nothing else changes for the stage: its reference is the
starting policy's scores (:mod:`compo.reference`; equal to the adapted model's at step 0, since
B starts at zero), and the frozen-trunk cache stays valid (the blocks below hold no adapter).

At the end of training the adapter is written in PEFT's format (``adapter_model.safetensors``,
``adapter_config.json``), then merged into the weights: ComPO perturbs the output layer of the
merged model, and the checkpoint is a plain model with the adapter beside it
(``checkpoint/adapter/``, loadable with ``peft.PeftModel.from_pretrained`` onto the starting
model).
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compo import settings
from compo.models import write_dir_atomically
from compo.trunk import transformer_blocks

ALL_LINEAR = "all-linear"


def _linear_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    return (nn.Linear, Conv1D)


class LoRA:
    """The ``dpo.lora`` settings; ``r=0`` switches LoRA off.

    Args:
        r: Rank of the adapters (0: no LoRA; the stage trains its scope's weights directly).
        alpha: Scale numerator: the update is ``B @ A * alpha / r``.
        dropout: Dropout on the adapters' input while training, in [0, 1).
        target_modules: ``all-linear`` (every linear layer of the trained blocks) or names
            matched against module names' ends, as peft does (``[q_proj, v_proj]``).

    Raises:
        SettingError: A setting is outside its domain, or ``r > 0`` and peft is not installed.
    """

    def __init__(
        self,
        r: int = 0,
        alpha: float = 16.0,
        dropout: float = 0.05,
        target_modules: str | Sequence[str] = ALL_LINEAR,
    ) -> None:
        self.r = settings.number("dpo.lora.r", r, integer=True, ge=0)
        self.alpha = settings.number("dpo.lora.alpha", alpha, gt=0)
        self.dropout = settings.number("dpo.lora.dropout", dropout, ge=0, lt=1)
        if target_modules == ALL_LINEAR:
            self.target_modules: str | list[str] = ALL_LINEAR
        else:
            self.target_modules = settings.names("dpo.lora.target_modules", target_modules)
            if not self.target_modules:
                raise settings.SettingError(
                    f"dpo.lora.target_modules must name at least one module, or be {ALL_LINEAR}"
                )
        if self.r and importlib.util.find_spec("peft") is None:
            raise settings.SettingError(
                'dpo.lora.r > 0 needs peft: pip install "compo[lora]" (or set dpo.lora.r=0)'
            )

    @property
    def enabled(self) -> bool:
        return self.r > 0

    def settings(self) -> dict[str, Any] | None:
        """What the trained weights depend on (None when off); recorded in ``dpo_state/``."""
        if not self.enabled:
            return None
        return {
            "r": self.r,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "target_modules": self.target_modules,
        }

    def targets(self, model: nn.Module, scope: str, last_k: int) -> list[str]:
        """Full names of the linear layers that get an adapter, in module order.

        Raises:
            SettingError: The scope holds no block, or a listed name matches no linear layer
                of the trained blocks.
        """
        blocks = list(transformer_blocks(model))
        if scope == "last_k":
            if not 1 <= last_k <= len(blocks):
                raise settings.SettingError(
                    f"dpo.lora needs trained blocks: dpo.last_k must be in [1, {len(blocks)}], "
                    f"got {last_k}"
                )
            blocks = blocks[len(blocks) - last_k :]
        inside = {id(b) for b in blocks}
        prefixes = tuple(f"{n}." for n, m in model.named_modules() if id(m) in inside)
        linear = [
            name
            for name, module in model.named_modules()
            if name.startswith(prefixes) and isinstance(module, _linear_types())
        ]
        if self.target_modules == ALL_LINEAR:
            return linear

        def matches(name: str, target: str) -> bool:
            return name == target or name.endswith(f".{target}")

        for target in self.target_modules:
            if not any(matches(name, target) for name in linear):
                ends = sorted({name.rpartition(".")[2] for name in linear})
                raise settings.SettingError(
                    f"dpo.lora.target_modules: {target!r} matches no linear layer of the "
                    f"trained blocks ({prefixes[0]}...; dpo.scope={scope}); they have {ends}"
                )
        return [n for n in linear if any(matches(n, t) for t in self.target_modules)]

    def attach(self, model: nn.Module, scope: str, last_k: int, seed: int) -> Adapter:
        """Adds fresh adapters to ``model`` (in place); only they are trainable afterwards.

        A's initialisation draws from a generator seeded with ``seed`` (the global RNG is left
        as it was), so a resumed run starts from the same adapters before loading its state.
        """
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.targets(model, scope, last_k),
            bias="none",
        )
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # transformers' deprecation notice for an attribute peft reads; not the user's.
            warnings.simplefilter("ignore", FutureWarning)
            torch.manual_seed(seed)
            wrapped = get_peft_model(model, config)
        return Adapter(model, wrapped)


class Adapter:
    """Adapters attached to a model: their parameter names, writing them, merging them.

    Args:
        model: The model the adapters were added to (changed in place by peft).
        wrapped: peft's ``PeftModel`` around it.
    """

    def __init__(self, model: nn.Module, wrapped: Any) -> None:
        self.model, self.wrapped = model, wrapped
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]

    def save(self, path: Path) -> Path:
        """Writes the adapter in PEFT's format (safetensors), replacing ``path`` atomically."""
        return write_dir_atomically(path, self.wrapped.save_pretrained)

    def merge(self) -> nn.Module:
        """Adds ``B @ A * alpha / r`` into each target's weight and removes the adapter layers;
        ``model`` is a plain model again (the same object)."""
        merged = self.wrapped.merge_and_unload()
        if merged is not self.model:  # peft returns the model it wrapped, changed in place
            raise RuntimeError("peft merged into a copy of the model")
        return merged
