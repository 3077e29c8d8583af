"""A human judge: in the terminal, or on a small local web page (``compo-label``).

    compo model=tiny optimizer=compo_tiny oracle=human                        # in the terminal
    compo model=tiny optimizer=compo_tiny oracle=human oracle.judge.mode=web  # prints a URL
    compo-label --queue ~/.cache/compo/labels.sqlite                          # label a queue later

Both responses are shown in random order (seeded per comparison, recorded in the queue), never as
"current" and "perturbed", and are answered ``1`` (the first/left), ``2`` (the second/right),
``tie`` or ``skip`` (skip abstains). Every comparison and label is kept in a sqlite queue
(:mod:`oracles.label_queue`) as soon as it exists, so a restart of either side loses no label,
and a comparison labelled before is not asked again. In web mode the run serves the page
(:mod:`oracles.label_server`) on 127.0.0.1 with a one-time token in its URL, prints that URL, and
while it waits prints how many comparisons wait for a label; the page can be closed and reopened
at any time. ``max_labels`` is this run's budget of new labels: a batch that would exceed it
stops the run with one line (a rerun with a larger budget continues from the last committed
iteration, reusing every label given).
"""

from __future__ import annotations

import logging
import sys
import time
import weakref
from typing import Any, TextIO

from tqdm import tqdm

from compo.interfaces import (
    CompoError,
    Judgement,
    OracleError,
    OutputJudge,
    Verdict,
    settings,
)
from oracles.label_queue import (
    ANSWERS,
    LabelQueue,
    comparison_key,
    shown_swapped,
    verdict_of,
)
from oracles.label_server import LabelServer, build_parser, main

# compo-label's pieces are re-exported: ``oracles.human`` was their home before the split.
__all__ = ["ANSWERS", "HumanJudge", "LabelBudgetSpent", "LabelQueue", "LabelServer"]
__all__ += ["build_parser", "main", "verdict_of"]

log = logging.getLogger(__name__)
HEARTBEAT = 5.0  # seconds between status refreshes while waiting (the page tells a stale run)


class LabelBudgetSpent(OracleError, CompoError):
    """This run's label budget would be exceeded; the run stops rather than guess verdicts."""


def _end_run(queue: LabelQueue, server: LabelServer | None) -> None:
    """Tells the page that the run is gone (unless it stopped with a reason) and stops serving."""
    status = queue.status() or {}
    if status.get("state") in ("waiting", "working"):
        queue.set_status(state="ended")
    if server is not None:
        server.shutdown()
        server.server_close()


class HumanJudge(OutputJudge):
    """Asks a person which response is better.

    Args:
        mode: ``terminal`` (stdin/stdout) or ``web`` (serves the compo-label page in-process).
        queue_path: sqlite queue; None: ``<compo cache dir>/labels.sqlite``.
        seed: Seeds the order in which responses are shown.
        port: Web page port on 127.0.0.1 (0: any free port; the URL is printed).
        serve: In web mode, serve the page here (False: run ``compo-label`` on the same queue).
        wait_seconds: Web mode: abstain for comparisons not labelled by then (None: wait).
        poll_seconds: Web mode: how often the queue is read.
        max_invalid: Terminal: unrecognised answers in a row before the comparison is skipped.
        max_labels: This run's budget of new labels (None: no limit); labels given before are
            reused for free.
        stdin: Input stream (tests); None: ``sys.stdin``.
        stdout: Output stream (tests); None: ``sys.stdout``.
    """

    name = "human"

    def __init__(
        self,
        mode: str = "terminal",
        queue_path: str | None = None,
        seed: int = 0,
        port: int = 0,
        serve: bool = True,
        wait_seconds: float | None = None,
        poll_seconds: float = 0.5,
        max_invalid: int = 5,
        max_labels: int | None = None,
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
    ) -> None:
        key = "oracle.judge"
        settings.choice(f"{key}.mode", mode, ("terminal", "web"))
        settings.text(f"{key}.queue_path", queue_path, optional=True)
        settings.seed(f"{key}.seed", seed)
        settings.flag(f"{key}.serve", serve)
        settings.number(f"{key}.port", port, integer=True, ge=0, le=65535)
        settings.number(f"{key}.wait_seconds", wait_seconds, gt=0, optional=True)
        settings.number(f"{key}.poll_seconds", poll_seconds, gt=0)
        settings.number(f"{key}.max_invalid", max_invalid, integer=True, ge=1)
        settings.number(f"{key}.max_labels", max_labels, integer=True, ge=1, optional=True)
        self.mode, self.queue_path, self.port, self.serve = mode, queue_path, port, serve
        self.seed, self.wait_seconds, self.poll_seconds = seed, wait_seconds, poll_seconds
        self.max_invalid, self.max_labels = max_invalid, max_labels
        self.stdin, self.stdout = stdin, stdout
        self.queue: LabelQueue | None = None
        self.server: LabelServer | None = None
        self._ended: weakref.finalize | None = None
        self.counts = dict.fromkeys(
            ("calls", "identical", "asked", "labelled", "reused", "abstentions"), 0
        )

    def describe(self) -> dict[str, Any]:
        """What the verdicts depend on besides the person: the order responses are shown in.

        Where and how long the page is served, and the budget, are left out: a run stopped by
        its budget or restarted on another port resumes its ComPO state.
        """
        return {"type": f"{__name__}.{type(self).__qualname__}", "seed": self.seed}

    def check(self) -> None:
        """Opens the queue and, in web mode, starts the page and prints its URL."""
        if self.queue is None:
            self.queue = LabelQueue(self.queue_path)
        if self.mode == "web" and self.serve and self.server is None:
            self.server = LabelServer(self.queue, self.port).start()
            # stderr, not logging: the URL holds the token, and log files reach the run dir.
            print(f"oracle.human: label at {self.server.url}", file=sys.stderr, flush=True)
        if self._ended is None:
            self._status("working", new_run=True, labelled_before=0, batch=0, since=time.time())
            # At exit (or when this judge is dropped) the page learns that the run is gone.
            self._ended = weakref.finalize(self, _end_run, self.queue, self.server)

    def judge(self, prompt: str, current: str, perturbed: str) -> Judgement:
        """Asks which response is better (or reuses the label given before)."""
        return self.judge_batch([(prompt, current, perturbed)])[0]

    def judge_batch(self, items: list[tuple[str, str, str]]) -> list[Judgement]:
        """Queues every comparison first, so the person sees the whole batch at once."""
        self.check()
        out: list[Judgement | None] = [None] * len(items)
        keys: dict[int, str] = {}
        for i, (prompt, current, perturbed) in enumerate(items):
            if current == perturbed:
                self.counts["identical"] += 1
                out[i] = Judgement(Verdict.TIE, 1.0, "identical responses")
                continue
            self.counts["calls"] += 1
            keys[i] = comparison_key(prompt, current, perturbed)
        known = self.queue.labels(keys.values())  # comparisons queued (and labelled?) before
        new = [key for key in dict.fromkeys(keys.values()) if known.get(key) is None]
        self._spend(len(new))  # before queueing: a stopped run leaves nothing to label
        for i, key in keys.items():
            self.queue.add(*items[i], shown_swapped(self.seed, key))
        self.counts["asked"] += len(new)
        self.counts["reused"] += len(keys) - len(new)  # answered by a label given before
        if new:
            asked_at = self.queue.ask(new)
            if self.mode == "terminal":
                for key in new:
                    self._ask_terminal(self.queue.get(key))
            else:
                self._wait(new, asked_at)
        labels = self.queue.labels(keys.values())
        self.counts["labelled"] += sum(labels[key] is not None for key in new)
        self._status("working", labelled_before=self.counts["labelled"], batch=0)
        for i, key in keys.items():
            if labels[key] is None:
                out[i] = Judgement(Verdict.TIE, None, "abstain: no label in time")
            else:
                out[i] = verdict_of(self.queue.get(key))
            self.counts["abstentions"] += out[i].reason.startswith("abstain")
        return out  # type: ignore[return-value]

    def _status(self, state: str, **fields: Any) -> None:
        self.queue.set_status(
            state=state, budget=self.max_labels, asked=self.counts["asked"], **fields
        )

    def _spend(self, n: int) -> None:
        """Stops the run before asking for labels beyond ``max_labels``."""
        if self.max_labels is None or self.counts["asked"] + n <= self.max_labels:
            return
        left = self.max_labels - self.counts["asked"]
        note = (
            f"its next batch needs {n} new labels, {left} of its budget of {self.max_labels} left"
        )
        self.queue.set_status(state="stopped", note=note)
        raise LabelBudgetSpent(
            f"oracle.human: the next batch needs {n} new label(s), {left} of "
            f"oracle.judge.max_labels={self.max_labels} are left; raise it to continue (labels "
            f"are kept in {self.queue.path}, a rerun resumes from the last committed iteration)"
        )

    def _ask_terminal(self, item: dict[str, Any]) -> None:
        out, inp = self.stdout or sys.stdout, self.stdin or sys.stdin
        rule = "-" * 72
        out.write(f"\n{rule}\nPROMPT:\n{item['prompt']}\n{rule}\n[1]\n{item['first']}\n")
        out.write(f"{rule}\n[2]\n{item['second']}\n{rule}\n")
        for _ in range(self.max_invalid):
            out.write("Which is better? 1 / 2 / tie / skip: ")
            out.flush()
            line = inp.readline()
            if not line:
                raise OracleError("oracle.human: input closed before an answer was given")
            answer = line.strip().lower()
            if answer in ANSWERS:
                self.queue.label(item["id"], answer)
                return
            out.write(f"please answer one of {', '.join(ANSWERS)}\n")
        self.queue.label(item["id"], "skip")

    def _wait(self, keys: list[str], asked_at: float) -> None:
        """Blocks until every key is labelled (or ``wait_seconds`` pass), saying how many wait."""
        deadline = None if self.wait_seconds is None else time.monotonic() + self.wait_seconds
        before, shown, beat = self.counts["labelled"], None, 0.0
        while True:
            waiting = sum(label is None for label in self.queue.labels(keys).values())
            now = time.monotonic()
            if waiting != shown or now - beat >= HEARTBEAT:
                self._status("waiting", labelled_before=before, batch=len(keys), asked_at=asked_at)
                beat = now
            if waiting != shown:
                self._say(waiting, before + len(keys) - waiting, first=shown is None)
                shown = waiting
            if not waiting:
                return
            if deadline is not None and now > deadline:
                log.warning(
                    "oracle.human: %d comparison(s) not labelled within "
                    "oracle.judge.wait_seconds=%s: they abstain (no vote)",
                    waiting,
                    self.wait_seconds,
                )
                return
            time.sleep(self.poll_seconds)

    def _say(self, waiting: int, labelled: int, first: bool) -> None:
        """One terminal line (above any progress bar): what waits, where to label it."""
        budget = "" if self.max_labels is None else f" of a budget of {self.max_labels}"
        counts = f"labelled {labelled} this run{budget}"
        if not waiting:
            line = f"oracle.human: all labelled ({counts}); the run continues"
        elif first:
            where = (
                f"open {self.server.url}"
                if self.server
                else f"run compo-label --queue {self.queue.path}"
            )
            line = f"oracle.human: {waiting} comparison(s) wait for a label: {where} ({counts})"
        else:
            line = f"oracle.human: {waiting} waiting ({counts})"
        tqdm.write(line, file=sys.stderr)

    def usage(self) -> dict[str, int]:
        return dict(self.counts)

    def close(self) -> None:
        """Stops the page (if served here) and marks the run as ended in the queue."""
        if self._ended is not None:
            self._ended()
        self.server = None
