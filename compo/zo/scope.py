"""Which parameters ComPO perturbs, and their fp32 master copies.

The output layer always; optionally more named modules (the paper's Table 5 perturbs the last
MLPs too). Everything else stays frozen and bit-identical. Updates of ~1e-6 vanish when added to
bf16 weights, so the optimizer works on an fp32 master copy and casts into the model when done
(for an fp32 model the master copy is the parameter itself: no extra memory).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from compo.errors import CompoError


@dataclass
class Block:
    """One perturbed parameter: where it lives in the model and its fp32 master copy."""

    name: str
    param: nn.Parameter
    master: Tensor

    @property
    def shares_storage(self) -> bool:
        return self.master.data_ptr() == self.param.data_ptr()


class Scope:
    """The perturbed parameters of ``model``: the output layer first, then ``modules``.

    Args:
        model: A causal LM whose output layer is untied from the input embeddings.
        modules: Extra module names (e.g. ``model.layers.29.mlp``) whose parameters are perturbed.

    Raises:
        CompoError: A module name does not exist, or the output layer shares its weight with
            the input embeddings (perturbing it would change them too).
    """

    def __init__(self, model: nn.Module, modules: Sequence[str] = ()) -> None:
        head = model.get_output_embeddings()
        embed = model.get_input_embeddings()
        if head.weight.data_ptr() == embed.weight.data_ptr():
            raise CompoError(
                "the output layer shares its weight with the input embeddings; load the model "
                "through compo.models (which unties it) before running ComPO"
            )
        names = {id(p): n for n, p in model.named_parameters()}
        self.blocks = [self._block(names[id(head.weight)], head.weight)]
        self.head_bias = getattr(head, "bias", None)
        available = dict(model.named_modules())
        for module_name in modules:
            if module_name not in available:
                raise CompoError(f"optimizer.modules: no module named {module_name!r} in the model")
            for sub, param in available[module_name].named_parameters():
                if all(b.param is not param for b in self.blocks):
                    self.blocks.append(self._block(f"{module_name}.{sub}", param))

    @staticmethod
    def _block(name: str, param: nn.Parameter) -> Block:
        # .float() returns the tensor itself when it is fp32 already: no copy for fp32 models.
        return Block(name, param, param.detach().float())

    @property
    def head(self) -> Block:
        return self.blocks[0]

    @property
    def shapes(self) -> list[torch.Size]:
        return [b.master.shape for b in self.blocks]

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.blocks]

    @property
    def numel(self) -> int:
        return sum(b.master.numel() for b in self.blocks)

    @property
    def head_only(self) -> bool:
        return len(self.blocks) == 1

    def masters(self) -> list[Tensor]:
        return [b.master for b in self.blocks]

    @torch.no_grad()
    def add_(self, delta: Sequence[Tensor]) -> None:
        """master += delta (fp32), then the model's weights follow (cast to their dtype)."""
        for block, d in zip(self.blocks, delta, strict=True):
            block.master.add_(d)
        self.write_back()

    @torch.no_grad()
    def write_back(self) -> None:
        """Copies the master weights into the model (a cast for bf16/fp16 models)."""
        for block in self.blocks:
            if not block.shares_storage:
                block.param.copy_(block.master)
