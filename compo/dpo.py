"""First-order stage: DPO and its variants on the clean pairs.

The loss is one of :data:`compo.losses.LOSSES`, chosen by ``dpo.loss``. Reference log-probs are
computed once before training (or taken from the run's :class:`compo.reference.ReferenceScores`,
with the frozen blocks' output recorded on the way; a pass of its own goes through the run's
``reference_cache`` too), so no reference model stays in memory while training
(:class:`compo.dpo_reference.PhaseReference`).
:meth:`DPOTrainer.fit` is the stage the recipe calls; :meth:`DPOTrainer.train` is the same on
encoded pairs, for use as a library.

:meth:`DPOTrainer.train` is the stage's recipe: trainable parameters, reference, resume, the
step loop (:class:`compo.dpo_loop.StepLoop`), LoRA merge, metrics (:mod:`compo.dpo_metrics`).
Each optimizer step appends a row to ``trace/dpo.jsonl`` with the loss, reward margin, accuracy
and the batch's mean log pi(y+) and log pi(y-), so likelihood displacement shows as it happens.
``dpo_state/`` holds what resuming needs: the trainable weights (safetensors), the AdamW state
and the step, committed with sha256 hashes (:mod:`compo.dpo_state`); a corrupt file is refused.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from compo import distributed, settings, state
from compo.dpo_loop import SCHEDULES, StepLoop, lr_scheduler
from compo.dpo_metrics import pair_stats, summary, unpaired_stats
from compo.dpo_reference import PhaseReference
from compo.dpo_state import load_state, save_state
from compo.encoding import labels_of
from compo.errors import CompoError
from compo.interfaces import plain_settings
from compo.kto_reference import MismatchedKL
from compo.lora import LoRA
from compo.losses import LOSSES, SFT, PairwiseLoss
from compo.reference_cache import ReferenceCache
from compo.rundir import RunDir
from compo.scoring import SequenceScores
from compo.stages import Job, Outcome
from compo.trunk import FrozenTrunkCache, low_precision, set_trainable, train_in_fp32

log = logging.getLogger(__name__)


class DPOTrainer:
    """Trains a policy on preference pairs with a loss of :mod:`compo.losses`.

    Args:
        loss: A :class:`compo.losses.PairwiseLoss` (built from ``dpo.loss`` with its own
            hyper-parameters), or a name of :data:`compo.losses.LOSSES` for its defaults.
        weight_by_confidence: Multiply each pair's loss by its ``confidence``.
        lr: Peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: Optimizer steps of linear warm-up (from 0, as in transformers).
        schedule: After warm-up (``transformers.get_scheduler``): constant, linear (to zero),
            cosine, cosine_with_restarts, polynomial, inverse_sqrt (see :data:`SCHEDULES`).
        epochs: Passes over the pairs.
        batch_size: Pairs per forward/backward pass.
        grad_accum: Passes per optimizer step.
        max_grad_norm: Gradient clipping (None: off).
        scope: ``all`` or ``last_k`` trainable parameters.
        last_k: Transformer blocks trained under ``scope=last_k``.
        gradient_checkpointing: Recompute activations in backward (less memory, ~30% slower).
        bf16: bfloat16 autocast (for GPUs; log-probs stay fp32).
        seed: Seeds the shuffling generator.
        resume: Continue from ``dpo_state/`` in the run dir when it exists.
        save_every: Also write ``dpo_state/`` every this many steps (0: only at the end).
        ref_batch_size: Sequences per pass when computing reference log-probs.
        cache_trunk: Under ``scope=last_k``, run the frozen blocks once (see
            :class:`FrozenTrunkCache`) instead of at every step.
        sft_epochs: First train this many epochs of SFT on the chosen replies (the classic
            SFT -> DPO chain, in ``sft_state/`` and ``trace/sft.jsonl``); the preference loss
            then takes the SFT model as its reference. 0: no SFT step.
        sft_lr: The SFT step's learning rate (None: ``lr``).
        lora: LoRA adapters on the trained blocks instead of training their weights
            (:class:`compo.lora.LoRA`; None or ``r=0``: off). The adapter is merged at the end
            and written to ``<phase>_adapter/``, then into ``checkpoint/adapter/``.
    """

    def __init__(
        self,
        loss: PairwiseLoss | str = "dpo",
        weight_by_confidence: bool = False,
        lr: float = 5e-6,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        schedule: str = "constant",
        epochs: int = 1,
        batch_size: int = 4,
        grad_accum: int = 1,
        max_grad_norm: float | None = 1.0,
        scope: str = "last_k",
        last_k: int = 2,
        gradient_checkpointing: bool = False,
        bf16: bool = False,
        seed: int = 0,
        resume: bool = True,
        save_every: int = 0,
        ref_batch_size: int = 8,
        cache_trunk: bool = True,
        sft_epochs: int = 0,
        sft_lr: float | None = None,
        lora: LoRA | None = None,
    ) -> None:
        settings.choice("dpo.schedule", schedule, SCHEDULES)
        settings.choice("dpo.scope", scope, ("all", "last_k"))
        for name, value in (
            ("epochs", epochs),
            ("batch_size", batch_size),
            ("grad_accum", grad_accum),
            ("ref_batch_size", ref_batch_size),
        ):
            settings.number(f"dpo.{name}", value, integer=True, ge=1)
        for name, value in (
            ("warmup_steps", warmup_steps),
            ("save_every", save_every),
            ("last_k", last_k),
            ("sft_epochs", sft_epochs),
        ):
            settings.number(f"dpo.{name}", value, integer=True, ge=0)
        settings.number("dpo.sft_lr", sft_lr, gt=0, le=1, optional=True)
        settings.seed("dpo.seed", seed)
        for name, value in (
            ("weight_by_confidence", weight_by_confidence),
            ("gradient_checkpointing", gradient_checkpointing),
            ("bf16", bf16),
            ("resume", resume),
            ("cache_trunk", cache_trunk),
        ):
            settings.flag(f"dpo.{name}", value)
        settings.number("dpo.lr", lr, gt=0, le=1)  # AdamW overflows on absurd rates
        settings.number("dpo.weight_decay", weight_decay, ge=0)
        settings.number("dpo.max_grad_norm", max_grad_norm, gt=0, optional=True)
        if isinstance(loss, str):
            loss = LOSSES[settings.choice("dpo.loss", loss, LOSSES)]()
        if not isinstance(loss, PairwiseLoss):
            raise settings.SettingError(
                f"dpo.loss must be a loss of compo.losses (e.g. dpo=ipo), got {type(loss).__name__}"
            )
        if lora is not None and not isinstance(lora, LoRA):
            raise settings.SettingError(
                f"dpo.lora must be null or compo.lora.LoRA settings, got {type(lora).__name__}"
            )
        self.lora = lora if lora is not None and lora.enabled else None
        self.loss, self.loss_name = loss, loss.name
        self.weight_by_confidence = weight_by_confidence
        self.lr, self.weight_decay = lr, weight_decay
        self.warmup_steps, self.schedule = warmup_steps, schedule
        self.epochs, self.batch_size, self.grad_accum = epochs, batch_size, grad_accum
        self.max_grad_norm = max_grad_norm
        self.scope, self.last_k = scope, last_k
        self.gradient_checkpointing, self.bf16 = gradient_checkpointing, bf16
        self.seed, self.resume, self.save_every = seed, resume, save_every
        self.ref_batch_size, self.cache_trunk = ref_batch_size, cache_trunk
        self.sft_epochs, self.sft_lr = sft_epochs, sft_lr
        self.phase = "dpo"  # names the state dir, trace and metrics ("sft" for the SFT step)

    @property
    def unpaired_fix(self) -> str | None:
        """None when this stage trains on unpaired examples, else the setting that makes it."""
        if not self.loss.accepts_unpaired:
            return "dpo=kto"
        if self.loss.ld_alpha is not None:  # LD-DPO weighs the length both replies of a pair share
            return "dpo.loss.ld_alpha=null"
        if self.sft_epochs:  # the SFT step trains on chosen replies
            return "dpo.sft_epochs=0"
        return None

    def fit(self, job: Job, rows: Sequence[int]) -> Outcome:
        """The first-order stage: trains on the pairs at ``rows`` (the clean split)."""
        if not rows:
            log.warning("dpo: skipped: the splitter left no clean pairs")
            return Outcome({"dpo": {"skipped_reason": "no clean pairs"}})
        ready = job.reference.ready  # reused when an earlier stage computed them
        encoded = [job.encoded[i] for i in rows]
        confidences = [job.pairs[i].confidence for i in rows]
        metrics: dict[str, dict[str, Any]] = {}
        files: dict[str, Path] = {}
        if self.sft_epochs:
            sft = copy.copy(self)
            sft.loss, sft.loss_name, sft.phase = SFT(), "sft", "sft"
            sft.epochs, sft.lr, sft.sft_epochs = self.sft_epochs, self.sft_lr or self.lr, 0
            metrics["sft"] = sft.train(
                job.policy, encoded, job.pad_token_id, job.out,
                confidences=confidences, reference_cache=job.reference.cache,
            )  # fmt: skip
            if self.lora:  # on the starting model; the DPO adapter is on the SFT model
                files["sft_adapter"] = sft.adapter_dir(job.out)
            ready = False  # the reference is now the SFT model: scored anew by train()
        if self.loss.rewrites_pairs:  # other prompts: encoded anew, the shared scores do not apply
            rewritten = [self.loss.rewrite(job.pairs[i]) for i in rows]
            encoded, report = job.data.encode(rewritten, job.tokenizer)
            if report.n_prompt_truncated:
                log.warning(
                    "dpo: %d rewritten prompts were truncated; raise data.max_prompt_length",
                    report.n_prompt_truncated,
                )
            ready = False
        dpo_metrics = self.train(
            job.policy,
            encoded,
            job.pad_token_id,
            job.out,
            confidences=confidences,
            reference=job.reference.rows(rows) if ready else None,
            trunk=job.reference.trunk if ready else None,
            reference_cache=job.reference.cache,
        )
        job.reference.trunk = None  # frees the recorded states: no later stage reads them
        if self.lora:
            files["adapter"] = self.adapter_dir(job.out)
        return Outcome({**metrics, "dpo": dpo_metrics}, changed=True, files=files)

    def adapter_dir(self, out: RunDir) -> Path:
        """Where :meth:`train` writes this phase's LoRA adapter (``dpo_adapter/``)."""
        return out.path / f"{self.phase}_adapter"

    def settings(self) -> dict[str, Any]:
        """What the trained weights depend on (recorded in ``dpo_state/`` and checked on resume)."""
        return {
            "loss": plain_settings(self.loss),
            "weight_by_confidence": self.weight_by_confidence,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "warmup_steps": self.warmup_steps,
            "schedule": self.schedule,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "max_grad_norm": self.max_grad_norm,
            "scope": self.scope,
            "last_k": self.last_k,
            "bf16": self.bf16,
            "seed": self.seed,
            "lora": self.lora.settings() if self.lora else None,
        }

    def compute_loss(
        self,
        policy: tuple[SequenceScores, ...],
        reference: tuple[Tensor, ...],
        weights: Tensor | None = None,
        kl: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Mean (optionally confidence-weighted) loss of a batch and its summed step statistics
        (:func:`compo.dpo_metrics.pair_stats`, :func:`compo.dpo_metrics.unpaired_stats`).

        Args:
            policy: The policy's (chosen, rejected) scores, or (completion,) of unpaired examples.
            reference: The reference's log-probs, in the same order.
            weights: Per-item weights (confidences), or None.
            kl: The batch's KL estimate, for a loss with ``needs_kl``.
            labels: The unpaired examples' labels (true: desirable); None for pairs.
        """
        if labels is not None:
            losses, rewards = self.loss.unpaired(policy[0], reference[0], labels, kl)
            stats = unpaired_stats(policy[0], rewards, labels)
        else:
            losses, chosen_r, rejected_r = self.loss(policy, reference, kl)
            stats = pair_stats(policy, chosen_r, rejected_r)
        if weights is not None:
            losses = losses * weights
        return losses.mean(), {"loss": losses.detach().sum().item(), **stats}

    def _reference(self) -> PhaseReference:
        # Built on each use, from the settings as they are now: fit() gives its SFT copy
        # another loss.
        return PhaseReference(
            self.loss, self.scope, self.last_k, self.cache_trunk, self.ref_batch_size
        )

    def frozen_trunk(self, model: nn.Module) -> FrozenTrunkCache | None:
        """An empty cache of the blocks this stage freezes, or None when it trains them all.

        Filled while the reference scores are computed (see :class:`compo.reference`), it saves
        :meth:`prepare` a full forward pass and every training step the frozen blocks
        (:meth:`compo.dpo_reference.PhaseReference.frozen_trunk`).
        """
        return self._reference().frozen_trunk(model)

    def reference_logps(self, model, pairs, pad_token_id) -> tuple[Tensor, Tensor]:
        """Reference log-probs of ``pairs`` (zeros for reference-free losses)."""
        return self._reference().prepare(model, pairs, pad_token_id).logps

    def prepare(
        self,
        model,
        pairs,
        pad_token_id,
        reference=None,
        trunk: FrozenTrunkCache | None = None,
        reference_cache: ReferenceCache | None = None,
    ) -> tuple[tuple, Any]:
        """Reference log-probs of ``pairs`` and the model (or cached view) to train with
        (:meth:`compo.dpo_reference.PhaseReference.prepare`, which documents the arguments).

        Returns:
            ``((ref_chosen, ref_rejected), scorer)``.
        """
        ref, scorer, _ = self._reference().prepare(
            model, pairs, pad_token_id, reference, trunk, reference_cache
        )
        return ref, scorer

    def train(
        self,
        model: nn.Module,
        pairs: Sequence,
        pad_token_id: int,
        out: RunDir,
        confidences: Sequence[float] | None = None,
        reference: tuple[SequenceScores, SequenceScores] | None = None,
        trunk: FrozenTrunkCache | None = None,
        reference_cache: ReferenceCache | None = None,
    ) -> dict[str, Any]:
        """Trains ``model`` in place on encoded ``pairs``.

        Args:
            model: The policy; on entry it is also the reference model.
            pairs: :class:`compo.encoding.EncodedPair` items (the clean side), or
                ``EncodedExample`` items for a loss that trains on unpaired examples (KTO).
            pad_token_id: Padding id.
            out: The run dir (``trace/dpo.jsonl``, ``dpo_state/``).
            confidences: Per-pair confidence, needed with ``weight_by_confidence``.
            reference: (chosen, rejected) scores of ``pairs`` under the starting model, if already
                computed; otherwise they are computed here, before any update.
            trunk: The frozen blocks' output, recorded while ``reference`` was computed.
            reference_cache: Where a reference pass computed here is looked up and stored
                (``reference_cache``; its hit is ``reference_cache_hit`` in the metrics).

        Returns:
            Flat metrics for ``dpo.*``.
        """
        started = time.perf_counter()
        device = next(model.parameters()).device
        labels = labels_of(pairs)
        if labels is not None and self.unpaired_fix:
            raise CompoError(
                f"{self.phase}: unpaired examples need another setting: {self.unpaired_fix}"
            )
        adapter = None
        if self.lora:  # only the adapters train: every weight of the model stays frozen
            adapter = self.lora.attach(model, self.scope, self.last_k, self.seed)
            names = adapter.names
        else:
            names = set_trainable(model, self.scope, self.last_k)
        ref, scorer, cache_hit = self._reference().prepare(
            model, pairs, pad_token_id, reference, trunk, reference_cache
        )
        # A low-precision trunk (dtype=bfloat16) runs under autocast to its dtype, the trained
        # parameters in fp32 (restored to their dtype at the end).
        amp = torch.bfloat16 if self.bf16 else low_precision(model)
        mismatched = None
        if self.loss.needs_kl:  # before any update: its reference side is the starting model
            mismatched = MismatchedKL(
                model, pairs, pad_token_id, self.ref_batch_size, f"{self.phase}/kl-reference"
            )
        balance: dict[str, Any] = {}
        if labels is not None:
            balance = {"n_desirable": sum(labels), "n_undesirable": len(labels) - sum(labels)}
            advice = self.loss.balance_warning(*balance.values())
            if advice:
                log.warning("%s", advice)
                balance["warning"] = advice
            labels = torch.tensor(labels, dtype=torch.bool, device=device)
        weights = None
        if self.weight_by_confidence:
            if confidences is None:
                raise ValueError("weight_by_confidence needs confidences")
            weights = torch.tensor(list(confidences), dtype=torch.float32, device=device)

        restore_dtypes = train_in_fp32(model, names)
        params = [p for p in model.parameters() if p.requires_grad]
        n_trainable = sum(p.numel() for p in params)
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        loop = StepLoop(
            len(pairs), self.batch_size, self.grad_accum, self.epochs, self.seed,
            self.max_grad_norm, self.save_every, self.phase, f"{self.phase}/{self.loss_name}",
        )  # fmt: skip
        total = loop.total
        scheduler = lr_scheduler(optimizer, self.schedule, self.warmup_steps, total)
        identity = {"n_pairs": len(pairs), "total_steps": total, "loss": self.loss_name}
        # A state continues only the run that wrote it: same settings, same pairs and labels
        # (and confidences when they weight the loss), same starting weights.
        setup = {
            "dpo": self.settings(),
            "data": state.digest_pairs(pairs, confidences if self.weight_by_confidence else None),
            "start": state.digest_tensors(p for _, p in sorted(model.named_parameters())),
        }
        state_dir = out.path / f"{self.phase}_state"

        def save(step: int) -> None:
            save_state(state_dir, model, names, optimizer, scheduler, {**setup, "step": step})

        step = 0
        if self.resume:
            # Verified before use: a truncated or altered file is a CompoError, never loaded.
            step = load_state(state_dir, model, names, optimizer, scheduler, setup) or 0
            if step:
                log.info(
                    "%s: resuming from %s at step %d of %d", self.phase, state_dir, step, total
                )
        trace_path = out.path / "trace" / f"{self.phase}.jsonl"
        if distributed.is_main():  # rows after the last commit (or all, on a fresh start) rerun
            state.truncate_trace(trace_path, lambda r: r["step"] <= step, "step")
        # Rank 0 overwrites dpo_state/ from its first step on: every rank must have read it.
        distributed.barrier()
        if self.gradient_checkpointing:
            # Non-reentrant, so blocks after frozen ones still get gradients.
            # (transformers 5 renamed the method; 4.x has only the old name.)
            enable = getattr(model, "activation_checkpointing_enable", None)
            (enable or model.gradient_checkpointing_enable)({"use_reentrant": False})
        log.info(
            "%s: %s on %d %s, %d steps, %d trainable parameters (%s%s)", self.phase,
            self.loss_name, len(pairs), "pairs" if labels is None else "unpaired examples", total,
            n_trainable, self.scope,
            f", LoRA r={self.lora.r} on {len(names) // 2} layers" if self.lora else "",
        )  # fmt: skip
        start_step = step
        train_started = time.perf_counter()
        model.train()
        with out.trace(self.phase) as trace:
            step, tokens = loop.run(
                step, scorer=scorer, pairs=pairs, pad_token_id=pad_token_id,
                compute_loss=self.compute_loss, reference=ref, weights=weights, labels=labels,
                mismatched=mismatched, params=params, optimizer=optimizer, scheduler=scheduler,
                amp=amp, device=device, trace=trace, save=save,
            )  # fmt: skip
        model.eval()
        if self.gradient_checkpointing:
            disable = getattr(model, "activation_checkpointing_disable", None)
            (disable or model.gradient_checkpointing_disable)()
        if step > start_step:
            save(step)
        restore_dtypes()
        if adapter is not None:
            if distributed.is_main():
                adapter.save(self.adapter_dir(out))
            adapter.merge()  # ComPO and the checkpoint see a plain model with the update in it
        train_seconds = time.perf_counter() - train_started
        metrics = summary(trace_path, identity, start_step, n_trainable, tokens, train_seconds)
        metrics["seconds"] = round(time.perf_counter() - started, 3)
        metrics.update(balance)
        if cache_hit is not None:
            metrics["reference_cache_hit"] = int(cache_hit)
        return metrics
