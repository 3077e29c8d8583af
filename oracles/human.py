"""A human judge: in the terminal, or on a small local web page (``compo-label``).

    compo model=tiny optimizer=compo oracle=human                       # answer in the terminal
    compo model=tiny optimizer=compo oracle=human oracle.judge.mode=web # prints a URL to open
    compo-label --queue ~/.cache/compo/labels.sqlite                    # label a queue later

Both responses are shown in random order (seeded), never as "current" and "perturbed", and are
answered ``1``, ``2``, ``tie`` or ``skip`` (skip abstains). Every comparison and label is kept in a
sqlite queue as soon as it exists, so a restart of either side loses no label, and a comparison
labelled before is not asked again. The web page binds to 127.0.0.1 and needs the one-time token
printed in its URL.

A label is posted to ``/label`` (the page's form) or ``/api/label`` (JSON), with the token in the
URL (``?token=...``): a request without the right token is refused (403) before its body is read.
Bodies are at most ``MAX_BODY`` bytes of UTF-8 and must arrive within
``LabelServer.request_timeout`` seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import html
import json
import random
import secrets
import sqlite3
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import parse_qs, urlparse

from compo.interfaces import (
    Judgement,
    OracleError,
    OutputJudge,
    Verdict,
    default_cache_dir,
    settings,
)
from oracles.cache import open_sqlite

ANSWERS = ("1", "2", "tie", "skip")
MAX_BODY = 64 * 1024  # a label is under 200 bytes; anything near this is not a label


class LabelQueue:
    """Comparisons waiting for (or holding) a human label, in one sqlite file.

    Args:
        path: The sqlite file; None: ``<compo cache dir>/labels.sqlite``.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        if path is None:
            path = default_cache_dir() / "labels.sqlite"
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = open_sqlite(
            self.path,
            "CREATE TABLE IF NOT EXISTS items (id TEXT PRIMARY KEY, prompt TEXT, first TEXT, "
            "second TEXT, swapped INTEGER, label TEXT, created REAL, labelled REAL)",
        )

    def add(self, prompt: str, current: str, perturbed: str, swapped: bool) -> str:
        """Queues a comparison (kept as is if already queued) and returns its id."""
        key = hashlib.sha256(json.dumps([prompt, current, perturbed]).encode()).hexdigest()[:24]
        first, second = (perturbed, current) if swapped else (current, perturbed)
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR IGNORE INTO items VALUES (?, ?, ?, ?, ?, NULL, ?, NULL)",
                (key, prompt, first, second, int(swapped), time.time()),
            )
        return key

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM items WHERE id = ?", (key,)).fetchone()
        return self._row(row) if row else None

    def pending(self) -> list[dict[str, Any]]:
        """Unlabelled comparisons, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM items WHERE label IS NULL ORDER BY created, id"
            ).fetchall()
        return [self._row(r) for r in rows]

    def label(self, key: str, answer: str) -> bool:
        """Stores ``answer`` (1, 2, tie, skip) for item ``key``; False if there is no such item."""
        if answer not in ANSWERS:
            raise ValueError(f"answer must be one of {ANSWERS}, got {answer!r}")
        with self._lock, self._db:
            cur = self._db.execute(
                "UPDATE items SET label = ?, labelled = ? WHERE id = ?", (answer, time.time(), key)
            )
        return cur.rowcount == 1

    @staticmethod
    def _row(row: tuple) -> dict[str, Any]:
        names = ("id", "prompt", "first", "second", "swapped", "label", "created", "labelled")
        return dict(zip(names, row, strict=True))


def verdict_of(item: dict[str, Any]) -> Judgement:
    """Turns a labelled item into a judgement of (current, perturbed)."""
    answer = item["label"]
    if answer == "skip":
        return Judgement(Verdict.TIE, None, "abstain: skipped by the human")
    if answer == "tie":
        return Judgement(Verdict.TIE, 1.0, "human: tie")
    first_wins = answer == "1"
    perturbed_wins = first_wins == bool(item["swapped"])
    verdict = Verdict.PERTURBED_BETTER if perturbed_wins else Verdict.CURRENT_BETTER
    return Judgement(verdict, 1.0, f"human chose response {answer}")


# --------------------------------------------------------------------------------------------
# The web page (compo-label)
# --------------------------------------------------------------------------------------------

_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>compo-label</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}pre{{white-space:pre-wrap;
background:#f4f4f4;padding:.6em}}button{{font-size:1.1em;margin-right:.6em}}</style></head><body>
<h1>compo-label</h1><p id="pending">{n} comparison(s) waiting</p>{body}</body></html>"""
_ITEM = """<h2>Prompt</h2><pre id="prompt">{prompt}</pre>
<h2>Response 1</h2><pre id="first">{first}</pre><h2>Response 2</h2><pre id="second">{second}</pre>
<form method="post" action="/label?token={token}"><input type="hidden" name="id" value="{id}">
<button name="answer" value="1">1 is better</button><button name="answer" value="2">2 is better
</button><button name="answer" value="tie">tie</button><button name="answer" value="skip">skip
</button></form>"""


def _is_text(value: str) -> bool:
    """False for a string with a lone surrogate (JSON's ``"\\udc80"``): sqlite cannot store it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _LabelHandler(BaseHTTPRequestHandler):
    server: LabelServer

    def setup(self) -> None:
        # A client that announces a body and never sends it must not hold a thread forever.
        self.timeout = self.server.request_timeout
        super().setup()

    def log_message(self, fmt: str, *args: Any) -> None:
        pass  # the URL carries the token: keep it out of the terminal and the logs

    def _send(self, status: int, body: str, ctype: str = "text/html; charset=utf-8") -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def _refuse(self, status: int, message: str) -> None:
        """Replies ``status`` and closes: what is left of the body must not pass as a request."""
        self.close_connection = True
        self._send(status, message + "\n", "text/plain; charset=utf-8")

    def _ok(self, token: str | None) -> bool:
        # Bytes: compare_digest raises TypeError on str with non-ASCII characters.
        if token and hmac.compare_digest(token.encode(), self.server.token.encode()):
            return True
        self._refuse(403, "forbidden: open the URL with the token that compo-label printed")
        return False

    def _body(self) -> str | None:
        """The request body as text, or None once an error reply has been sent."""
        lengths = self.headers.get_all("Content-Length") or ["0"]
        text = lengths[0].strip()
        # isdecimal alone would let int() take non-ASCII digits.
        if len(set(lengths)) > 1 or not (text.isascii() and text.isdecimal()):
            self._refuse(400, "bad request: Content-Length must be one non-negative integer")
            return None
        length = int(text)
        if length > MAX_BODY:
            self._refuse(413, f"request body too large: {length} bytes, at most {MAX_BODY}")
            return None
        try:
            data = self.rfile.read(length)
        except TimeoutError:
            self._refuse(408, "request timeout: the body did not arrive in time")
            return None
        if len(data) < length:  # the client hung up mid-body: nobody is left to answer
            self.close_connection = True
            return None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            self._refuse(400, "bad request: the body is not UTF-8")
            return None

    def do_GET(self) -> None:
        url = urlparse(self.path)
        query = parse_qs(url.query)
        if not self._ok((query.get("token") or [None])[0]):
            return
        items = self.server.queue.pending()
        if url.path == "/api/pending":
            self._send(200, json.dumps(items), "application/json")
        elif url.path == "/":
            esc = {k: html.escape(str(v)) for k, v in (items[0] if items else {}).items()}
            body = _ITEM.format(token=self.server.token, **esc) if items else "<p>All done.</p>"
            self._send(200, _PAGE.format(n=len(items), body=body))
        else:
            self._send(404, "not found\n")

    def do_POST(self) -> None:
        url = urlparse(self.path)
        if not self._ok((parse_qs(url.query).get("token") or [None])[0]):
            return
        raw = self._body()
        if raw is None:
            return
        if self.headers.get("Content-Type", "").startswith("application/json"):
            try:
                parsed = json.loads(raw)
            except (ValueError, RecursionError):
                self._refuse(400, "bad request: the body is not JSON")
                return
            form = {k: str(v) for k, v in parsed.items()} if isinstance(parsed, dict) else {}
        else:
            form = {k: v[0] for k, v in parse_qs(raw).items()}
        if url.path not in ("/label", "/api/label"):
            self._send(404, "not found\n")
            return
        answer, key = form.get("answer", ""), form.get("id", "")
        if not _is_text(key):
            self._send(400, "bad label: the id is not valid Unicode text\n")
            return
        if answer not in ANSWERS or not self.server.queue.label(key, answer):
            self._send(400, f"bad label: id {key!r}, answer {answer!r}\n")
        elif url.path.startswith("/api/"):
            self._send(200, json.dumps({"ok": True}), "application/json")
        else:
            self.send_response(303)
            self.send_header("Location", f"/?token={self.server.token}")
            self.send_header("Content-Length", "0")
            self.end_headers()


class LabelServer(ThreadingHTTPServer):
    """Serves the labelling page for ``queue`` on 127.0.0.1; ``url`` includes the token.

    Args:
        queue: The comparisons to label.
        port: Port on 127.0.0.1 (0: any free port).
        request_timeout: Seconds a client may take to send a request before it is dropped.
    """

    daemon_threads = True

    def __init__(self, queue: LabelQueue, port: int = 0, request_timeout: float = 30.0) -> None:
        super().__init__(("127.0.0.1", port), _LabelHandler)
        self.queue, self.token = queue, secrets.token_urlsafe(18)
        self.request_timeout = request_timeout

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/?token={self.token}"

    def start(self) -> LabelServer:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self


# --------------------------------------------------------------------------------------------
# The judge
# --------------------------------------------------------------------------------------------


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
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
    ) -> None:
        key = "oracle.judge"
        settings.choice(f"{key}.mode", mode, ("terminal", "web"))
        settings.seed(f"{key}.seed", seed)
        settings.flag(f"{key}.serve", serve)
        settings.number(f"{key}.port", port, integer=True, ge=0, le=65535)
        settings.number(f"{key}.wait_seconds", wait_seconds, gt=0, optional=True)
        settings.number(f"{key}.poll_seconds", poll_seconds, gt=0)
        settings.number(f"{key}.max_invalid", max_invalid, integer=True, ge=1)
        self.mode, self.queue_path, self.port, self.serve = mode, queue_path, port, serve
        self.wait_seconds, self.poll_seconds = wait_seconds, poll_seconds
        self.max_invalid = max_invalid
        self.stdin, self.stdout = stdin, stdout
        self._rng = random.Random(seed)
        self.queue: LabelQueue | None = None
        self.server: LabelServer | None = None
        self.counts = dict.fromkeys(("calls", "identical", "asked", "reused", "abstentions"), 0)

    def check(self) -> None:
        """Opens the queue and, in web mode, starts the page and prints its URL."""
        if self.queue is None:
            self.queue = LabelQueue(self.queue_path)
        if self.mode == "web" and self.serve and self.server is None:
            self.server = LabelServer(self.queue, self.port).start()
            print(f"compo-label: open {self.server.url}", file=sys.stderr, flush=True)

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
            keys[i] = self.queue.add(prompt, current, perturbed, self._rng.random() < 0.5)
        for i, key in keys.items():
            item = self.queue.get(key)
            if item["label"] is not None:
                self.counts["reused"] += 1
            elif self.mode == "terminal":
                self._ask_terminal(item)
            item = self._wait(key) if self.mode == "web" else self.queue.get(key)
            if item is None or item["label"] is None:
                out[i] = Judgement(Verdict.TIE, None, "abstain: no label in time")
            else:
                out[i] = verdict_of(item)
            self.counts["abstentions"] += out[i].reason.startswith("abstain")
        return out  # type: ignore[return-value]

    def _ask_terminal(self, item: dict[str, Any]) -> None:
        out, inp = self.stdout or sys.stdout, self.stdin or sys.stdin
        rule = "-" * 72
        out.write(f"\n{rule}\nPROMPT:\n{item['prompt']}\n{rule}\n[1]\n{item['first']}\n")
        out.write(f"{rule}\n[2]\n{item['second']}\n{rule}\n")
        self.counts["asked"] += 1
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

    def _wait(self, key: str) -> dict[str, Any] | None:
        self.counts["asked"] += 1
        deadline = None if self.wait_seconds is None else time.monotonic() + self.wait_seconds
        while True:
            item = self.queue.get(key)
            if item["label"] is not None or (deadline and time.monotonic() > deadline):
                return item
            time.sleep(self.poll_seconds)

    def usage(self) -> dict[str, int]:
        return dict(self.counts)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``compo-label``."""
    parser = argparse.ArgumentParser(prog="compo-label", description="Label queued comparisons.")
    parser.add_argument("--queue", default=None, help="sqlite queue (default: compo cache dir)")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free)")
    return parser


def main(argv: list[str] | None = None) -> None:
    """``compo-label``: serves the labelling page for a queue until interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.exit(2, f"compo-label: error: --port must be in [0, 65535], got {args.port}\n")
    try:
        server = LabelServer(LabelQueue(args.queue), args.port)
    except (OSError, sqlite3.Error) as exc:  # port in use, queue not a sqlite file
        parser.exit(2, f"compo-label: error: {exc}\n")
    print(f"compo-label: open {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
