"""Throughput and peak memory of one DPO optimizer step on the default model.

    python experiments/bench_dpo.py                               # SmolLM2-135M, last 2 blocks
    python experiments/bench_dpo.py --scope all --batch-size 2    # every parameter
    python experiments/bench_dpo.py --model tiny --steps 2        # seconds, for a smoke test

A step is what ``compo.dpo.DPOTrainer`` does per batch after its reference pass (which, under
``scope=last_k``, also caches the frozen blocks' output: ``compo.trunk.FrozenTrunkCache``): score
chosen and rejected replies with the autograd graph (``compo.scoring.score_pairs``), the loss,
backward, clipping and AdamW. The pairs are random token ids of fixed lengths (throughput does not
depend on the text). Tokens/s counts every token of both sequences of each pair (the prompt
twice). Memory: on CPU the peak resident set size during the timed steps (sampled every 5 ms),
next to the RSS before them (weights, optimizer state, trunk cache and whatever loading left);
on CUDA ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import threading
import time

import torch

from compo.dpo import DPOTrainer
from compo.encoding import EncodedPair
from compo.models import EmbeddedSmolLM2, TinyModel
from compo.scoring import score_pairs
from compo.trunk import set_trainable


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * (4096 / 2**20)


class PeakRss:
    """Samples the resident set size in a background thread; ``peak`` in MB."""

    def __init__(self, every: float = 0.005) -> None:
        self.every, self.peak, self._stop = every, _rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb())
            time.sleep(self.every)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--response-len", type=int, default=128)
    parser.add_argument("--scope", choices=["all", "last_k"], default="last_k")
    parser.add_argument("--last-k", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--no-cache-trunk", action="store_true", help="run the frozen blocks at every step"
    )
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    loader = EmbeddedSmolLM2() if args.model == "smollm2" else TinyModel(seed=0)
    model, tokenizer = loader.load()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=gen).tolist()

    pairs = [
        EncodedPair(str(i), ids(args.prompt_len), ids(args.response_len), ids(args.response_len))
        for i in range(args.batch_size)
    ]
    trainer = DPOTrainer(scope=args.scope, last_k=args.last_k, cache_trunk=not args.no_cache_trunk)
    set_trainable(model, args.scope, args.last_k)
    # What DPOTrainer.train does first: reference log-probs and, for last_k, the frozen-trunk cache.
    prepare_started = time.perf_counter()
    ref, scorer = trainer.prepare(model, pairs, tokenizer.pad_token_id)
    prepare_seconds = time.perf_counter() - prepare_started
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    model.train()

    def step() -> None:
        scores = score_pairs(
            scorer, pairs, tokenizer.pad_token_id, batch_size=2 * len(pairs), requires_grad=True
        )
        loss, _ = trainer.compute_loss(scores, ref)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocates the optimizer state
    rss_before = _rss_mb()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with PeakRss() as peak:
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        seconds = (time.perf_counter() - started) / args.steps
    tokens = args.batch_size * 2 * (args.prompt_len + args.response_len)
    n_trainable = sum(p.numel() for p in params) / 1e6
    n_total = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(
        f"model={loader.name} scope={args.scope} last_k={args.last_k} "
        f"trainable={n_trainable:.1f}M/{n_total:.1f}M "
        f"batch={args.batch_size} pairs x ({args.prompt_len}+{args.response_len}) tokens, "
        f"grad_ckpt={args.gradient_checkpointing}, cached_trunk={scorer is not model}, "
        f"threads={torch.get_num_threads()}"
    )
    print(
        f"seconds/step={seconds:.2f}  tokens/s={tokens / seconds:.0f}  "
        f"pairs/s={args.batch_size / seconds:.2f}"
    )
    if torch.cuda.is_available():
        print(f"peak_cuda_allocated_mb={torch.cuda.max_memory_allocated() / 2**20:.0f}")
    print(f"reference pass (+ trunk cache): {prepare_seconds:.2f}s")
    print(f"rss_before_steps_mb={rss_before:.0f}  peak_rss_during_steps_mb={peak.peak:.0f}")


if __name__ == "__main__":
    main()
