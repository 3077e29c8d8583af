"""The first-order stage's resume state (``dpo_state/``, ``sft_state/``).

The trainable weights (safetensors), the AdamW state and the learning-rate scheduler's state,
committed with sha256 hashes by :mod:`compo.state`; a state is restored only by the setup that
wrote it (``progress`` carries its identity), and a corrupt file is refused, never unpickled: the
optimizer and scheduler states are read with ``torch.load(weights_only=True)`` after their hash
matched.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from compo import distributed, state
from compo.errors import CompoError


def _pt_bytes(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def save_state(
    state_dir: Path, model: nn.Module, names: list[str], optimizer, scheduler, progress: dict
) -> None:
    """Commits ``dpo_state/`` (rank 0 only): the trainable weights (safetensors, checked finite),
    the AdamW and scheduler states and ``progress`` (the step and the identity to resume under).
    """
    if not distributed.is_main():  # every rank holds the same state; one writes it
        return
    params = dict(model.named_parameters())
    tensors = {n: params[n].detach().contiguous().cpu() for n in names}
    state.check_finite(tensors.items(), f"resume state {state_dir}")
    payloads = {
        "trainable": ("safetensors", safetensors_save(tensors)),
        "optimizer": ("pt", _pt_bytes(optimizer.state_dict())),
        "scheduler": ("pt", _pt_bytes(scheduler.state_dict())),
    }
    state.commit(state_dir, progress["step"], payloads, progress)


def load_state(
    state_dir: Path, model: nn.Module, names: list[str], optimizer, scheduler, expect: dict
):
    """Restores a verified ``dpo_state/`` and returns its step; None when there is none."""
    loaded = state.load(state_dir, ("trainable", "optimizer", "scheduler"))
    if loaded is None:
        return None
    progress, blobs = loaded
    state.check_identity(state_dir, progress, expect, "dpo.resume")
    tensors = safetensors_load(blobs["trainable"])
    if sorted(tensors) != sorted(names):
        raise CompoError(f"{state_dir}: its trainable parameters differ from dpo.scope/last_k")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    optimizer.load_state_dict(torch.load(io.BytesIO(blobs["optimizer"]), weights_only=True))
    scheduler.load_state_dict(torch.load(io.BytesIO(blobs["scheduler"]), weights_only=True))
    return progress["step"]
