"""The first-order stage's step loop: from a step number to the next optimizer step, to the end.

:class:`StepLoop` takes each step's rows from an order drawn from (seed, epoch), runs them in
micro-batches under autocast and seeded dropout, accumulates the gradient of the step's mean loss,
clips it, steps AdamW and the learning-rate schedule (:func:`lr_scheduler`), appends the step's
row to the trace, stops at a non-finite loss and has the resume state saved every ``save_every``
steps. The batch order and the dropout masks depend on the step alone and the schedule's state is
part of ``dpo_state/``, so a resumed run takes the steps the interrupted one would have taken.
:class:`compo.dpo.DPOTrainer` sets the loop up (trainable parameters, reference log-probs, resume);
:func:`compo.dpo_metrics.summary` reads its trace back into metrics.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from compo import distributed
from compo.errors import CompoError
from compo.interfaces import local_generator
from compo.kto_reference import MismatchedKL
from compo.rundir import TraceWriter
from compo.scoring import score_pairs

# dpo.schedule -> transformers' scheduler. Every one starts with ``warmup_steps`` of linear
# warm-up from 0 (transformers' own "constant" would ignore the warm-up). Schedules needing more
# than the step counts (a plateau metric, decay steps, a floor) are not offered.
SCHEDULES = {
    "constant": "constant_with_warmup",
    "constant_with_warmup": "constant_with_warmup",
    "linear": "linear",
    "cosine": "cosine",
    "cosine_with_restarts": "cosine_with_restarts",
    "polynomial": "polynomial",
    "inverse_sqrt": "inverse_sqrt",
}

# The labels of unpaired examples, as the suffixes of their per-label statistics
# (``reward_desirable``, ``n_undesirable``, ...).
LABEL_SIDES = ("desirable", "undesirable")


def lr_scheduler(optimizer, schedule: str, warmup_steps: int, total_steps: int):
    """``transformers.get_scheduler`` for ``dpo.schedule``: one multiplier per optimizer step.

    Its state (the step count) is part of ``dpo_state/``, so a resumed run continues the same
    learning rates.
    """
    from transformers import get_scheduler

    return get_scheduler(
        SCHEDULES[schedule],
        optimizer,
        num_warmup_steps=warmup_steps,
        num_training_steps=total_steps,
    )


@contextlib.contextmanager
def _seeded_dropout(*key: int, device: torch.device):
    """Dropout masks (LoRA's, the model's) drawn from a seed of ``key``, not from wherever the
    global RNG stands, so a resumed run draws the same masks; the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(local_generator(*key).initial_seed())
        yield


class StepLoop:
    """The optimizer steps of one phase (``dpo``, ``sft``) over ``n_rows`` encoded rows.

    Args:
        n_rows: Pairs (or unpaired examples) trained on.
        batch_size: Rows per forward/backward pass.
        grad_accum: Passes per optimizer step.
        epochs: Passes over the rows.
        seed: Seeds the batch order and the dropout masks.
        max_grad_norm: Gradient clipping (None: off).
        save_every: Save the resume state every this many steps (0: only the caller's at the end).
        phase: ``dpo`` or ``sft``: names the divergence error.
        desc: The progress bar's label.
    """

    def __init__(
        self,
        n_rows: int,
        batch_size: int,
        grad_accum: int,
        epochs: int,
        seed: int,
        max_grad_norm: float | None,
        save_every: int,
        phase: str,
        desc: str,
    ) -> None:
        self.n_rows, self.batch_size, self.seed = n_rows, batch_size, seed
        self.max_grad_norm, self.save_every = max_grad_norm, save_every
        self.phase, self.desc = phase, desc
        self.per_step = batch_size * grad_accum
        self.steps_per_epoch = math.ceil(n_rows / self.per_step)
        self.total = self.steps_per_epoch * epochs

    def rows(self, step: int) -> tuple[int, list[int]]:
        """The epoch of optimizer step ``step`` (from 0) and the rows it trains on."""
        epoch, index = divmod(step, self.steps_per_epoch)
        # The order depends on (seed, epoch) alone, so a resumed run sees the same batches.
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.n_rows, generator=gen).tolist()
        return epoch, order[index * self.per_step : (index + 1) * self.per_step]

    def run(
        self,
        step: int,
        *,
        scorer: nn.Module,
        pairs: Sequence,
        pad_token_id: int,
        compute_loss: Callable[..., tuple[Tensor, dict[str, float]]],
        reference: tuple[Tensor, ...],
        weights: Tensor | None,
        labels: Tensor | None,
        mismatched: MismatchedKL | None,
        params: list[nn.Parameter],
        optimizer: torch.optim.Optimizer,
        scheduler,
        amp: torch.dtype | None,
        device: torch.device,
        trace: TraceWriter,
        save: Callable[[int], None],
    ) -> tuple[int, int]:
        """Trains from ``step`` (0, or the step a resumed state holds) to :attr:`total`.

        Args:
            step: The optimizer steps already taken.
            scorer: The model (or frozen-trunk view) that scores a batch with gradient.
            pairs: The encoded rows.
            pad_token_id: Padding id.
            compute_loss: ``(scores, reference, weights, kl, labels)`` of a micro-batch to its
                mean loss and summed statistics (:meth:`compo.dpo.DPOTrainer.compute_loss`).
            reference: Reference log-probs of every row, one tensor per reply.
            weights: Per-row loss weights (confidences), or None.
            labels: Per-row labels of unpaired examples (true: desirable); None for pairs.
            mismatched: KTO's reference point, for a loss with ``needs_kl``; else None.
            params: The trained parameters (clipped together).
            optimizer: AdamW over ``params``.
            scheduler: Its learning-rate schedule (:func:`lr_scheduler`).
            amp: The autocast dtype (None: none).
            device: The model's device (whose RNG the seeded dropout forks).
            trace: Gets one row per step.
            save: Saves the resume state at the step it is given.

        Returns:
            The step reached (:attr:`total`) and the tokens trained on.
        """
        total, tokens = self.total, 0
        autocast = (
            torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
        )
        # A context manager: a stage failing mid-step leaves no half-drawn bar before its error.
        with tqdm(
            total=total,
            initial=step,
            desc=self.desc,
            leave=False,
            disable=not distributed.is_main(),
        ) as bar:
            while step < total:
                epoch, rows = self.rows(step)
                sums: dict[str, float] = {}
                step_tokens = 0
                for start in range(0, len(rows), self.batch_size):
                    micro = rows[start : start + self.batch_size]
                    batch = [pairs[i] for i in micro]
                    with autocast, _seeded_dropout(self.seed, step, start, device=device):
                        scores = score_pairs(
                            scorer, batch, pad_token_id, batch_size=2 * len(batch),
                            requires_grad=True,
                        )  # fmt: skip
                        kl = mismatched.kl(micro) if mismatched is not None else None
                    loss, stats = compute_loss(
                        scores,
                        tuple(r[micro] for r in reference),
                        weights[micro] if weights is not None else None,
                        kl,
                        labels[micro] if labels is not None else None,
                    )
                    if kl is not None:
                        stats["kl"] = kl.item() * len(micro)
                    # Scale so the accumulated gradient is that of the mean over the whole step.
                    (loss * len(micro) / len(rows)).backward()
                    for key, value in stats.items():
                        sums[key] = sums.get(key, 0.0) + value
                    step_tokens += sum(
                        len(p.prompt_ids) * len(p.replies) + sum(map(len, p.replies)) for p in batch
                    )
                grad_norm = None
                if self.max_grad_norm is not None:
                    grad_norm = nn.utils.clip_grad_norm_(params, self.max_grad_norm).item()
                lr = optimizer.param_groups[0]["lr"]  # this step's rate, set by the scheduler
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens += step_tokens
                row = {"step": step, "epoch": epoch, "lr": lr}
                row.update(_step_means(sums, len(rows)))
                row.update(grad_norm=grad_norm, n_pairs=len(rows), tokens=step_tokens)
                trace.write(row)
                if not math.isfinite(row["loss"]):  # stop now, not after the remaining steps
                    raise CompoError(
                        f"{self.phase}: the loss is {row['loss']} at step {step}: the run diverged "
                        "(lower dpo.lr) or the model holds NaN/inf; nothing saved"
                    )
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.2f}")
                if self.save_every and step % self.save_every == 0 and step < total:
                    save(step)
        return step, tokens


def _step_means(sums: dict[str, float], n_rows: int) -> dict[str, Any]:
    """A step's trace values from its summed batch statistics: means over the step's rows; a
    statistic of one label's examples (``*_desirable``) over that label's count (None without
    such examples in the step); the counts themselves as integers."""
    out: dict[str, Any] = {}
    for key, value in sums.items():
        side = key.rsplit("_", 1)[-1]
        if key.startswith("n_"):
            out[key] = int(value)
        elif side in LABEL_SIDES:
            count = sums[f"n_{side}"]
            out[key] = value / count if count else None
        else:
            out[key] = value / n_rows
    return out
