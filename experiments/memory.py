"""Peak memory of this process, sampled in a background thread (used by the benchmark scripts).

    with PeakRSS() as memory:
        work()
    print(memory.start_mib, memory.peak_mib)

The resident set size (RSS, through ``psutil``: ``pip install -e ".[experiments]"``) is read
every ``every`` seconds while the block runs, and once more at its start and end. A short spike
between two samples can be missed: the peak is a lower bound, good to a few MiB at the default
5 ms. On CUDA, compare ``torch.cuda.max_memory_allocated`` instead (device memory is not RSS).
"""

from __future__ import annotations

import os
import threading
import time

import psutil

MIB = 2**20


class PeakRSS:
    """Samples the process's resident memory and keeps the peak (bytes).

    Args:
        every: Seconds between samples.
    """

    def __init__(self, every: float = 0.005) -> None:
        self.every = every
        self.process = psutil.Process(os.getpid())
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def rss(self) -> int:
        """The resident set size now, in bytes."""
        return self.process.memory_info().rss

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = self.rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.every)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def start_mib(self) -> float:
        return self.start / MIB

    @property
    def peak_mib(self) -> float:
        return self.peak / MIB
