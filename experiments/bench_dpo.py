"""Throughput and peak memory of one DPO optimizer step on the default model, alone or against TRL.

    # compo against TRL 1.16's DPOTrainer (run on an idle machine; the ratio is the claim):
    OMP_NUM_THREADS=2 python experiments/bench_dpo.py --vs-trl --threads 2 --rounds 3 --steps 5
    python experiments/bench_dpo.py                               # SmolLM2-135M, last 2 blocks
    python experiments/bench_dpo.py --scope all --batch-size 2    # every parameter
    python experiments/bench_dpo.py --model tiny --steps 2        # seconds, for a smoke test
    python experiments/bench_dpo.py --vs-trl --model tiny --rounds 1 --steps 1   # smoke test

A step is what ``compo.dpo.DPOTrainer`` does per batch after its reference pass (which, under
``scope=last_k``, also caches the frozen blocks' output: ``compo.trunk.FrozenTrunkCache``): score
chosen and rejected replies with the autograd graph (``compo.scoring.score_pairs``), the loss,
backward, clipping and AdamW. The pairs are random token ids of fixed lengths (throughput does not
depend on the text). Tokens/s counts every token of both sequences of each pair (the prompt
twice). Memory: on CPU the peak resident set size during the timed steps (``experiments.memory``,
sampled every 5 ms), next to the RSS before them (weights, optimizer state, trunk cache, imported
libraries and whatever loading left); on CUDA ``torch.cuda.max_memory_allocated``.

``--vs-trl`` measures the same step in TRL 1.16 (``pip install -e ".[experiments]"``): its
``DPOTrainer`` on the same model (loaded the same way, output layer untied), the same token ids,
the same trainable parameters (``--scope``/``--last-k`` freeze the rest before TRL sees the model),
loss ``sigmoid`` with beta 0.1, AdamW at a constant learning rate, clipping at 1.0, no gradient
checkpointing unless ``--gradient-checkpointing``, and reference log-probs precomputed in both
(TRL: ``precompute_ref_log_probs=True``; compo: its reference pass, untimed in both). A TRL step is
timed from its ``on_step_begin`` to its ``on_step_end`` callback (forward, backward, clipping,
optimizer; the batch is collated before). Each arm runs in a fresh process (its own peak memory),
interleaved compo, TRL, compo, TRL ... for ``--rounds``; each process runs one untimed warm-up step
then ``--steps`` timed ones. The load averages (``uptime``) are printed before and after: the
comparison means something only when they stay low.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from compo.dpo import DPOTrainer
from compo.encoding import EncodedPair
from compo.models import EmbeddedSmolLM2, TinyModel
from compo.scoring import score_pairs
from compo.trunk import set_trainable
from experiments.memory import MIB, PeakRSS

BETA, LR, MAX_GRAD_NORM = 0.1, 1e-6, 1.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--response-len", type=int, default=128)
    parser.add_argument("--scope", choices=["all", "last_k"], default="last_k")
    parser.add_argument("--last-k", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--no-cache-trunk", action="store_true", help="compo: run the frozen blocks at every step"
    )
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument(
        "--vs-trl", action="store_true", help="compo against TRL's DPOTrainer, interleaved"
    )
    parser.add_argument("--rounds", type=int, default=3, help="--vs-trl: compo+TRL processes")
    parser.add_argument(
        "--worker", choices=["compo", "trl"], default=None, help=argparse.SUPPRESS
    )  # one arm of --vs-trl, in its own process: prints one JSON line
    return parser


def load(args):
    loader = EmbeddedSmolLM2() if args.model == "smollm2" else TinyModel(seed=0)
    model, tokenizer = loader.load()
    return loader.name, model, tokenizer


def batch(args, vocab: int) -> list[EncodedPair]:
    """The same random token ids in every process (seed 0)."""
    gen = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=gen).tolist()

    return [
        EncodedPair(str(i), ids(args.prompt_len), ids(args.response_len), ids(args.response_len))
        for i in range(args.batch_size)
    ]


def tokens_per_step(args) -> int:
    return args.batch_size * 2 * (args.prompt_len + args.response_len)


def measure_compo(args) -> dict:
    """compo's DPO step: seconds per step, tokens/s and memory (see the module docstring)."""
    name, model, tokenizer = load(args)
    pairs = batch(args, model.config.vocab_size)
    trainer = DPOTrainer(
        scope=args.scope,
        last_k=args.last_k,
        cache_trunk=not args.no_cache_trunk,
        lr=LR,
        max_grad_norm=MAX_GRAD_NORM,
    )
    set_trainable(model, args.scope, args.last_k)
    # What DPOTrainer.train does first: reference log-probs and, for last_k, the frozen-trunk cache.
    prepare_started = time.perf_counter()
    ref, scorer = trainer.prepare(model, pairs, tokenizer.pad_token_id)
    prepare_seconds = time.perf_counter() - prepare_started
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    model.train()

    def step() -> float:
        scores = score_pairs(
            scorer, pairs, tokenizer.pad_token_id, batch_size=2 * len(pairs), requires_grad=True
        )
        loss, _ = trainer.compute_loss(scores, ref)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    first_loss = step()  # warm-up: allocates the optimizer state
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as memory:
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        seconds = (time.perf_counter() - started) / args.steps
    return {
        "arm": "compo",
        "model": name,
        "cached_trunk": scorer is not model,
        "trainable": sum(p.numel() for p in params),
        "total": sum(p.numel() for p in model.parameters()),
        "seconds_per_step": seconds,
        "tokens_per_second": tokens_per_step(args) / seconds,
        "rss_before_mib": memory.start_mib,
        "peak_rss_mib": memory.peak_mib,
        "peak_cuda_mib": torch.cuda.max_memory_allocated() / MIB
        if torch.cuda.is_available()
        else None,
        "reference_seconds": prepare_seconds,
        "first_loss": first_loss,
    }


def measure_trl(args) -> dict:
    """TRL's DPOTrainer on the same model, token ids and trainable parameters."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig
    from trl import DPOTrainer as TRLDPOTrainer

    class Pretokenized(TRLDPOTrainer):
        """The rows are token ids already (prompt_ids, chosen_ids, rejected_ids): the same ids
        as compo's arm, not a re-tokenization of text."""

        def _prepare_dataset(self, dataset, *unused, **also_unused):
            return dataset

    class StepClock(TrainerCallback):
        """Times each step; samples memory from the end of the warm-up step to the last one."""

        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.memory = PeakRSS()
            self.losses: list[float] = []

        def on_step_begin(self, args_, state, control, **kwargs):
            self.began = time.perf_counter()

        def on_log(self, args_, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:  # logged after on_step_end: outside the timed span
                self.losses.append(logs["loss"])

        def on_step_end(self, args_, state, control, **kwargs):
            if state.global_step == 1:  # the warm-up step: the optimizer state now exists
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                self.memory.__enter__()
                return
            self.seconds.append(time.perf_counter() - self.began)
            if state.global_step == state.max_steps:
                self.memory.__exit__()

    name, model, tokenizer = load(args)
    pairs = batch(args, model.config.vocab_size)
    set_trainable(model, args.scope, args.last_k)  # the trainable parameters of compo's arm
    rows = [
        {"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids}
        for p in pairs
    ]
    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(
            output_dir=out,
            per_device_train_batch_size=args.batch_size,
            max_steps=1 + args.steps,
            learning_rate=LR,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=MAX_GRAD_NORM,
            optim="adamw_torch",
            beta=BETA,
            loss_type=["sigmoid"],
            precompute_ref_log_probs=True,
            gradient_checkpointing=args.gradient_checkpointing,
            bf16=False,
            max_length=None,
            save_strategy="no",
            report_to="none",
            logging_steps=1,
            disable_tqdm=True,
            dataloader_num_workers=0,
            use_cpu=not torch.cuda.is_available(),
            seed=0,
        )
        trainer = Pretokenized(
            model=model,
            args=config,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[clock],
        )
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        result = trainer.train()
    seconds = statistics.fmean(clock.seconds)
    return {
        "arm": "trl",
        "model": name,
        "trainable": trainable,
        "total": sum(p.numel() for p in model.parameters()),
        "seconds_per_step": seconds,
        "tokens_per_second": tokens_per_step(args) / seconds,
        "rss_before_mib": clock.memory.start_mib,
        "peak_rss_mib": clock.memory.peak_mib,
        "peak_cuda_mib": torch.cuda.max_memory_allocated() / MIB
        if torch.cuda.is_available()
        else None,
        "steps_run": result.global_step,
        "first_loss": clock.losses[0] if clock.losses else None,
    }


def load_averages() -> str:
    """``uptime``'s line (its load averages), or os.getloadavg() where there is no uptime."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def vs_trl(args, argv: list[str]) -> None:
    """Runs compo and TRL in alternate fresh processes and prints their ratio."""
    passed = [a for a in argv if a not in ("--vs-trl",)]
    print(f"before: {load_averages()}")
    runs: dict[str, list[dict]] = {"compo": [], "trl": []}
    for round_ in range(args.rounds):
        for arm in ("compo", "trl"):
            command = [sys.executable, __file__, *passed, "--worker", arm]
            proc = subprocess.run(command, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"bench_dpo: the {arm} process failed:\n{proc.stderr[-4000:]}")
            run = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[arm].append(run)
            print(
                f"round {round_ + 1} {arm:5s}: {run['seconds_per_step']:.3f} s/step, "
                f"{run['tokens_per_second']:.0f} tokens/s, "
                f"peak RSS {run['peak_rss_mib']:.0f} MiB "
                f"(before the steps {run['rss_before_mib']:.0f} MiB), "
                f"trainable {run['trainable']:,}"
            )
    print(f"after: {load_averages()}")
    # Policy = reference at the first step: both losses are ln 2 = 0.6931 if both ran DPO against
    # the precomputed reference on the same batch.
    print(
        "first-step loss: " + ", ".join(f"{arm} {runs[arm][0]['first_loss']:.4f}" for arm in runs)
    )
    compo, trl = runs["compo"][0], runs["trl"][0]
    if compo["trainable"] != trl["trainable"]:
        sys.exit(
            f"bench_dpo: trainable parameters differ: {compo['trainable']} vs {trl['trainable']}"
        )

    def median(arm: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[arm])

    speed = median("compo", "tokens_per_second") / median("trl", "tokens_per_second")
    memory = median("compo", "peak_rss_mib") / median("trl", "peak_rss_mib")
    print(
        f"model={compo['model']} scope={args.scope} last_k={args.last_k} trainable="
        f"{compo['trainable'] / 1e6:.1f}M/{compo['total'] / 1e6:.1f}M "
        f"batch={args.batch_size} pairs x ({args.prompt_len}+{args.response_len}) tokens, "
        f"steps={args.steps} x rounds={args.rounds}, compo cached_trunk={compo['cached_trunk']}"
    )
    print(
        f"median tokens/s: compo {median('compo', 'tokens_per_second'):.0f}, TRL "
        f"{median('trl', 'tokens_per_second'):.0f}, ratio compo/TRL {speed:.2f}x (target >= 1.0)"
    )
    print(
        f"median peak RSS: compo {median('compo', 'peak_rss_mib'):.0f} MiB, TRL "
        f"{median('trl', 'peak_rss_mib'):.0f} MiB, ratio compo/TRL {memory:.2f} (target <= 1.0)"
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        measure = measure_compo if args.worker == "compo" else measure_trl
        print(json.dumps(measure(args)))
        return
    print(f"command: {shlex.join([sys.executable, sys.argv[0], *argv])}")
    print(f"threads={torch.get_num_threads()} OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    if args.vs_trl:
        vs_trl(args, argv)
        return
    run = measure_compo(args)
    print(
        f"model={run['model']} scope={args.scope} last_k={args.last_k} "
        f"trainable={run['trainable'] / 1e6:.1f}M/{run['total'] / 1e6:.1f}M "
        f"batch={args.batch_size} pairs x ({args.prompt_len}+{args.response_len}) tokens, "
        f"grad_ckpt={args.gradient_checkpointing}, cached_trunk={run['cached_trunk']}"
    )
    print(
        f"seconds/step={run['seconds_per_step']:.2f}  tokens/s={run['tokens_per_second']:.0f}  "
        f"pairs/s={args.batch_size / run['seconds_per_step']:.2f}"
    )
    if run["peak_cuda_mib"] is not None:
        print(f"peak_cuda_allocated_mb={run['peak_cuda_mib']:.0f}")
    print(f"reference pass (+ trunk cache): {run['reference_seconds']:.2f}s")
    print(
        f"rss_before_steps_mb={run['rss_before_mib']:.0f}  "
        f"peak_rss_during_steps_mb={run['peak_rss_mib']:.0f}"
    )


if __name__ == "__main__":
    main()
