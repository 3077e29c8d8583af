"""Trainable scope of the first-order stage and the frozen-trunk cache.

Under ``dpo.scope=last_k`` only the last k transformer blocks, the final norm and the output layer
train; the blocks below are frozen, so their output can be computed once and reused at every step
(:class:`FrozenTrunkCache`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from compo.errors import CompoError


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks (``model.layers`` of Llama-like decoders, ...)."""
    decoder = model.get_decoder()
    n = getattr(model.config, "num_hidden_layers", None)
    for module in decoder.children():
        if isinstance(module, nn.ModuleList) and (n is None or len(module) == n):
            return module
    raise CompoError(f"dpo.scope=last_k: no transformer blocks found in {type(model).__name__}")


def set_trainable(model: nn.Module, scope: str, last_k: int) -> list[str]:
    """Freezes everything outside the trainable scope and returns the trainable parameter names.

    Args:
        model: The policy (output layer already untied from the embeddings).
        scope: ``all``, or ``last_k``: the last ``last_k`` blocks, the final norm and the output
            layer (practical on a CPU: backward stops at the first trainable block).
        last_k: Blocks to train for ``last_k``.
    """
    if scope == "all":
        model.requires_grad_(True)
    elif scope == "last_k":
        blocks = transformer_blocks(model)
        if not 0 <= last_k <= len(blocks):
            raise CompoError(f"dpo.last_k must be in [0, {len(blocks)}], got {last_k}")
        model.requires_grad_(False)
        for block in list(blocks)[len(blocks) - last_k :]:
            block.requires_grad_(True)
        model.get_output_embeddings().requires_grad_(True)
        for name, module in model.get_decoder().named_children():
            if "norm" in name or name == "ln_f":  # the final norm sits between blocks and head
                module.requires_grad_(True)
    else:
        raise CompoError(f"dpo.scope: {scope!r} is not one of ['all', 'last_k']")
    return [n for n, p in model.named_parameters() if p.requires_grad]


def low_precision(model: nn.Module) -> torch.dtype | None:
    """The model's floating dtype below fp32 (its trunk's, e.g. ``dtype=bfloat16``), or None."""
    low = {p.dtype for p in model.parameters() if p.is_floating_point()} - {torch.float32}
    return min(low, key=lambda d: torch.finfo(d).bits) if low else None


def train_in_fp32(model: nn.Module, names: Sequence[str]) -> Callable[[], None]:
    """Puts the trainable parameters ``names`` in fp32 and returns the function restoring them.

    AdamW steps of a learning rate's size vanish in bf16 weights (a bf16 weight near 0.05 moves
    in steps of 2e-4), so the trained parameters are fp32 while training, as in mixed-precision
    training, and the frozen trunk keeps its dtype. Restoring casts the trained values once.
    """
    params = dict(model.named_parameters())
    low = {
        n: params[n].dtype
        for n in names
        if params[n].is_floating_point() and params[n].dtype != torch.float32
    }
    for name in low:
        params[name].data = params[name].data.float()

    def restore() -> None:
        for name, dtype in low.items():
            params[name].data = params[name].data.to(dtype)

    return restore


class _View:
    """What :func:`compo.scoring.score_sequences` needs of a model, with another decoder."""

    def __init__(self, model: nn.Module, decoder: Callable[..., Any]) -> None:
        self.config, self._model, self._decoder = model.config, model, decoder

    def get_output_embeddings(self) -> nn.Module:
        return self._model.get_output_embeddings()

    def get_decoder(self) -> Callable[..., Any]:
        return self._decoder


class FrozenTrunkCache:
    """Memoises the input of the first trainable block, so a step runs only the top of the model.

    Under ``scope=last_k`` the blocks below are frozen, so their output is a pure function of the
    token ids: computed once (during the reference pass) it serves every step, and a step runs only
    the last k blocks, the norm and the head (several times faster on a CPU with SmolLM2's 30
    blocks and k = 2). States are keyed by the token ids of the unpadded sequence and kept in the
    hidden dtype: about ``tokens x hidden_size x 4`` bytes.

    Args:
        model: The policy; its decoder must take ``inputs_embeds`` as the first block's input.
        last_k: Trainable blocks.
    """

    def __init__(self, model: nn.Module, last_k: int) -> None:
        self.model, self.decoder = model, model.get_decoder()
        self.blocks = transformer_blocks(model)
        self.attr = next(n for n, m in self.decoder.named_children() if m is self.blocks)
        self.top = nn.ModuleList(list(self.blocks)[len(self.blocks) - last_k :])
        self.states: dict[tuple[int, ...], Tensor] = {}

    def covers(self, pairs: Sequence) -> bool:
        """Whether every sequence of ``pairs`` (or of unpaired examples) has been recorded."""
        return all(tuple(p.prompt_ids + reply) in self.states for p in pairs for reply in p.replies)

    def filling(self) -> _View:
        """A view scoring with the full model while recording the trunk's output per sequence."""
        return _View(self.model, self._fill)

    def cached(self) -> _View:
        """A view running the top blocks on recorded states (every sequence must be recorded)."""
        return _View(self.model, self._run_top)

    def _fill(self, input_ids: Tensor, attention_mask: Tensor, **kwargs: Any) -> Any:
        seen: list[Tensor] = []

        def grab(module, args, kwargs):
            seen.append(args[0] if args else kwargs["hidden_states"])

        handle = self.top[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            handle.remove()
        for row, keep in enumerate(attention_mask.bool()):
            key = tuple(input_ids[row][keep].tolist())
            self.states[key] = seen[0][row][keep].detach().clone()
        return out

    def _run_top(self, input_ids: Tensor, attention_mask: Tensor, **kwargs: Any) -> Any:
        first = next(iter(self.states.values()))
        hidden = first.new_zeros((*input_ids.shape, first.shape[-1]))
        for row, keep in enumerate(attention_mask.bool()):
            hidden[row][keep] = self.states[tuple(input_ids[row][keep].tolist())]
        setattr(self.decoder, self.attr, self.top)
        try:
            return self.decoder(inputs_embeds=hidden, attention_mask=attention_mask, **kwargs)
        finally:
            setattr(self.decoder, self.attr, self.blocks)
