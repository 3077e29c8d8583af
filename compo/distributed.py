"""torch.distributed helpers: split ComPO's perturbations across processes started by torchrun.

    torchrun --nproc_per_node=2 -m compo model=tiny optimizer=compo_tiny oracle=likelihood

Every rank loads the data and the model, splits and runs DPO identically (all of it is
seed-derived); only the m perturbations of a ComPO iteration are divided. Direction i is
regenerated from (seed, iteration, i) on whichever rank owns it, so ranks exchange nothing but
partial sums and vote counts, and every rank then applies the same update. Only rank 0 writes the
run dir. Without torchrun's environment (``WORLD_SIZE`` unset or 1) every helper is a no-op.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from compo.rundir import RunDir

log = logging.getLogger(__name__)

# ComPO's first collective comes after data loading, eval.before, the split and DPO, which every
# rank runs in full: the default 10-minute timeout would kill a long DPO stage.
TIMEOUT = datetime.timedelta(hours=6)


def init_from_env() -> bool:
    """Joins the process group described by torchrun's environment, if any.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. The
    backend is gloo for CPU tensors and, when CUDA is present, nccl for CUDA tensors (one group
    serves both); each process then uses GPU ``LOCAL_RANK``, so ``device=cuda`` means its own GPU.

    Returns:
        True when running with more than one process.
    """
    if dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend=backend, init_method="env://", timeout=TIMEOUT)
    log.info("rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 when not distributed)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """True on the one process that writes the run dir."""
    return rank() == 0


def partition(m: int, rank: int, world: int) -> range:
    """The contiguous share of indices ``0..m-1`` owned by ``rank`` (sizes differ by at most 1)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    base, extra = divmod(m, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sums ``tensor`` over all ranks in place (and returns it); a no-op with one process."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. the run dir Hydra chose there)."""
    if world_size() <= 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Waits for every rank (a no-op with one process)."""
    if world_size() > 1:
        dist.barrier()


def finalize() -> None:
    """Leaves the process group (safe to call when there is none)."""
    if dist.is_initialized():
        dist.destroy_process_group()


class _NullTrace:
    def write(self, row: Mapping[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NullTrace:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class ReadOnlyRunDir(RunDir):
    """The run dir as a non-main rank sees it: it may read resume state, it writes nothing.

    Metrics are kept in memory (the stages read them back) and traces are discarded; rank 0
    writes the same rows, since every rank holds the same reduced results.
    """

    def log_metrics(self, prefix: str, values: Mapping[str, Any]) -> None:
        for key, value in values.items():
            self.metrics[f"{prefix}.{key}"] = value

    def trace(self, name: str) -> Any:
        return _NullTrace()

    def write_rows(self, name: str, rows: list[Mapping[str, Any]]) -> None:
        pass
