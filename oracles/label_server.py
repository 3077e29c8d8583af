"""``compo-label``: the labelling page of a human-oracle queue, served on 127.0.0.1.

    compo-label --queue ~/.cache/compo/labels.sqlite      # prints the URL with its token

``oracle=human oracle.judge.mode=web`` serves the same page from inside the run. The page shows
the prompt and both responses side by side in the queue's recorded random order (where they
start to differ highlighted), the answers left / right / tie / skip (keys ``1 2 t s``), the run's
progress (labelled, waiting, budget) and, after each answer, what happens next. Its HTML, CSS and
script are one file, ``label_page.html``: no external asset, every value escaped.

Every request needs the one-time token printed in the URL (``?token=...``); one without it is
refused (403) before its body is read. Routes: ``GET /`` (the page), ``GET /api/pending`` (the
waiting comparisons, without which side is which), ``GET /api/status`` (counts and the run's
state), ``POST /label`` (the page's form, answered by a redirect to the page) and
``POST /api/label`` (JSON ``{"id": ..., "answer": "1" | "2" | "tie" | "skip"}``). Bodies are at
most ``MAX_BODY`` bytes of UTF-8 and must arrive within ``LabelServer.request_timeout`` seconds.
"""

from __future__ import annotations

import argparse
import hmac
import html
import json
import secrets
import sqlite3
import string
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlparse

from compo.interfaces import CompoError
from oracles.label_queue import ANSWERS, LabelQueue

MAX_BODY = 64 * 1024  # a label is under 200 bytes; anything near this is not a label
SILENT_AFTER = 30.0  # seconds: a waiting run refreshes its status every few seconds
PAGE = string.Template(resources.files("oracles").joinpath("label_page.html").read_text("utf-8"))
# Only this page's own style and script (by nonce) and requests to this server: works offline.
CSP = (
    "default-src 'none'; style-src 'nonce-{n}'; script-src 'nonce-{n}'; connect-src 'self'; "
    "form-action 'self'; img-src data:; base-uri 'none'; frame-ancestors 'none'"
)
SAVED = {
    "1": "Saved: the left (top) response is better.",
    "2": "Saved: the right (bottom) response is better.",
    "tie": "Saved: a tie.",
    "skip": "Skipped: this comparison carries no vote.",
    "dup": "That comparison already had a label; the first answer stands.",
}
# Control characters other than tab and newline, shown as their Unicode pictures (U+2400...).
_VISIBLE = {c: 0x2400 + c for c in range(32) if c not in (9, 10)} | {127: 0x2421}


def _split(text: str, other: str) -> tuple[str, str]:
    """``text`` as (the start it shares with ``other``, cut at a word break; the rest)."""
    n = 0
    while n < min(len(text), len(other)) and text[n] == other[n]:
        n += 1
    if n < len(text):  # back to the start of the word in which they part
        n = max(text.rfind(" ", 0, n), text.rfind("\n", 0, n)) + 1
    return text[:n], text[n:]


def _age(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _next_step(status: dict[str, Any] | None) -> str:
    """What happens now that nothing waits for a label, from the asking run's status."""
    state = (status or {}).get("state")
    if state in ("waiting", "working"):
        return (
            "The run is updating the model and generating new responses; new comparisons appear "
            "here by themselves (this page checks every second)."
        )
    if state == "ended":
        return "The run has ended and every label is saved: you can close this page."
    if state == "stopped":
        return f"The run stopped: {status.get('note', 'see its terminal')}."
    return (
        "No run is asking through this queue now. Comparisons appear here by themselves when "
        "one does (oracle=human with this queue)."
    )


def _run_line(status: dict[str, Any] | None) -> str:
    if status is None:
        return "No run has asked through this queue yet."
    state, quiet = status.get("state"), time.time() - status.get("updated", 0.0)
    line = {
        "waiting": "The run is waiting for your labels.",
        "working": "The run is working (updating the model, generating responses).",
        "ended": "The run has ended.",
        "stopped": f"The run stopped: {status.get('note', 'see its terminal')}.",
    }.get(state, f"The run's state: {state}.")
    if state == "waiting" and quiet > SILENT_AFTER:
        line += f" (Not heard from for {_age(quiet)}: it may have stopped.)"
    return line


def _progress(items: list[dict[str, Any]], status: dict[str, Any] | None, queue: LabelQueue):
    """(labelled this run, waiting for this run, budget text) as the page shows them."""
    if status is None:  # no run has asked: the queue's own counts
        return queue.count()["labelled"], len(items), "none set"
    waiting = 0
    if status.get("state") == "waiting":  # the batch the run is blocked on
        waiting = sum((i["asked"] or 0) >= status.get("asked_at", 0) for i in items)
    labelled = status.get("labelled_before", 0) + status.get("batch", 0) - waiting
    limit = status.get("budget")
    budget = "none set" if limit is None else f"{limit} ({limit - status.get('asked', 0)} left)"
    return labelled, waiting, budget


def page(queue: LabelQueue, token: str, nonce: str, last: str | None = None) -> str:
    """The page: the first waiting comparison (or what happens next), progress, run state.

    Args:
        queue: The comparisons and the asking run's status.
        token: Goes into the form's URL.
        nonce: The Content-Security-Policy nonce of the page's style and script.
        last: The answer just given (``1``, ``2``, ``tie``, ``skip``) or ``dup``; None: none.
    """
    items, status = queue.pending(), queue.status()
    labelled, waiting, budget = _progress(items, status, queue)
    item = items[0] if items else None
    notice = SAVED.get(last or "", "")
    if notice and item is not None:
        notice += f" Next: the comparison below ({len(items)} unlabelled, including it)."
    left, right = (item["first"], item["second"]) if item else ("", "")
    (left_same, left_rest), (right_same, right_rest) = _split(left, right), _split(right, left)
    values = {
        "title": f"compo-label ({len(items)} waiting)" if items else "compo-label",
        "state": (status or {}).get("state", "none"),
        "labelled": labelled,
        "waiting": waiting,
        "budget": budget,
        "older": len(items) - waiting,
        "older_hidden": "" if status is not None and len(items) > waiting else "hidden",
        "run": _run_line(status),
        "notice": notice,
        "notice_hidden": "" if notice else "hidden",
        "item_hidden": "" if item else "hidden",
        "idle_hidden": "hidden" if item else "",
        "idle": _next_step(status),
        "prompt": item["prompt"] if item else "",
        "left_same": left_same,
        "left_rest": left_rest,
        "left_empty": str(not left).lower(),
        "right_same": right_same,
        "right_rest": right_rest,
        "right_empty": str(not right).lower(),
        "item_id": item["id"] if item else "",
        "token": token,
        "nonce": nonce,
    }
    # Every value is escaped (and control characters shown as symbols): no text is markup.
    return PAGE.substitute({k: html.escape(str(v).translate(_VISIBLE)) for k, v in values.items()})


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

    def _send(
        self, status: int, body: str, ctype: str = "text/html; charset=utf-8", csp: str = ""
    ) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Referrer-Policy", "no-referrer")  # the URL holds the token
        self.send_header("X-Content-Type-Options", "nosniff")
        if csp:
            self.send_header("Content-Security-Policy", csp)
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
        queue = self.server.queue
        if url.path == "/":
            nonce = secrets.token_urlsafe(12)
            body = page(queue, self.server.token, nonce, (query.get("last") or [None])[0])
            self._send(200, body, csp=CSP.format(n=nonce))
        elif url.path == "/api/pending":  # blind: which side is the perturbed one stays hidden
            fields = ("id", "prompt", "first", "second", "created", "asked")
            items = [{k: item[k] for k in fields} for item in queue.pending()]
            self._send(200, json.dumps(items), "application/json")
        elif url.path == "/api/status":
            status = queue.status()
            body = {**queue.count(), "state": (status or {}).get("state", "none"), "run": status}
            self._send(200, json.dumps(body), "application/json")
        else:
            self._send(404, "not found\n", "text/plain; charset=utf-8")

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
            self._send(404, "not found\n", "text/plain; charset=utf-8")
            return
        answer, key = form.get("answer", ""), form.get("id", "")
        if not _is_text(key):
            self._send(400, "bad label: the id is not valid Unicode text\n")
            return
        queue = self.server.queue
        if answer not in ANSWERS or queue.get(key) is None:
            self._send(400, f"bad label: id {key!r}, answer {answer!r}\n")
            return
        stored = queue.label(key, answer)
        if url.path.startswith("/api/"):
            if stored:
                self._send(200, json.dumps({"ok": True}), "application/json")
            else:
                reply = {"ok": False, "error": "already labelled; the first answer stands"}
                self._send(409, json.dumps(reply), "application/json")
            return
        # Post/redirect/get: the page then says what was saved and what happens next.
        self.send_response(303)
        self.send_header(
            "Location", f"/?token={self.server.token}&last={'dup' if not stored else answer}"
        )
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
        threading.Thread(target=self.serve_forever, args=(0.1,), daemon=True).start()
        return self


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
        server = LabelServer(LabelQueue(args.queue, key="--queue"), args.port)
    except (OSError, sqlite3.Error, CompoError) as exc:  # port in use, queue not a sqlite file
        parser.exit(2, f"compo-label: error: {exc}\n")
    print(f"compo-label: open {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
