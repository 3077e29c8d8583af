"""The first-order stage's resume state (``dpo_state/``, ``sft_state/``).

The trainable weights, the AdamW state and the learning-rate scheduler's state, committed with
sha256 hashes by :mod:`compo.state`; a state is restored only by the setup that wrote it
(``progress`` carries its identity), and a corrupt file is refused. Nothing is pickled: the
optimizer's tensors are safetensors (its other values in the file's JSON metadata), the
scheduler's state is JSON, so resuming never unpickles a file from the run dir.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from compo import distributed, state
from compo.errors import CompoError

_PLAIN = "compo.plain"  # the metadata key holding an optimizer state's non-tensor values


def optimizer_bytes(state_dict: dict[str, Any]) -> bytes:
    """An optimizer's ``state_dict()`` as safetensors: tensors keyed ``<param>.<name>``, the
    rest (``param_groups``, non-tensor per-parameter values) as JSON in the metadata."""
    tensors, plain_state = {}, {}
    for index, entry in state_dict["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                plain_state.setdefault(str(index), {})[name] = value
    plain = {"param_groups": state_dict["param_groups"], "state": plain_state}
    return safetensors_save(tensors, metadata={_PLAIN: json.dumps(plain)})


def optimizer_state(blob: bytes) -> dict[str, Any]:
    """The ``state_dict()`` :func:`optimizer_bytes` wrote."""
    header_length = int.from_bytes(blob[:8], "little")
    plain = json.loads(json.loads(blob[8 : 8 + header_length])["__metadata__"][_PLAIN])
    per_param: dict[int, dict[str, Any]] = {
        int(index): dict(values) for index, values in plain["state"].items()
    }
    for key, tensor in safetensors_load(blob).items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = tensor
    groups = plain["param_groups"]
    for group in groups:  # JSON turned AdamW's tuple into a list
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    return {"state": per_param, "param_groups": groups}


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
        "optimizer": ("safetensors", optimizer_bytes(optimizer.state_dict())),
        "scheduler": ("json", json.dumps(scheduler.state_dict()).encode()),
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
    if any(f["file"].endswith(".pt") for f in progress["files"].values()):
        raise CompoError(
            f"{state_dir}: written by an earlier compo (pickled optimizer state, no longer read); "
            "set dpo.resume=false to start over"
        )
    state.check_identity(state_dir, progress, expect, "dpo.resume")
    tensors = safetensors_load(blobs["trainable"])
    if sorted(tensors) != sorted(names):
        raise CompoError(f"{state_dir}: its trainable parameters differ from dpo.scope/last_k")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    optimizer.load_state_dict(optimizer_state(blobs["optimizer"]))
    scheduler.load_state_dict(json.loads(blobs["scheduler"]))
    return progress["step"]
