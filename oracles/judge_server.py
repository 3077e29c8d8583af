"""``compo-judge-server``: a small OpenAI-compatible server backed by a local chat model.

    compo-judge-server                          # SmolLM2-135M-Instruct on 127.0.0.1:8000
    compo-judge-server --model tiny --port 0    # tiny random model, any free port (printed)
    compo-judge-server --model rule             # a deterministic rule judge (tests, demos)
    compo-judge-server --model tiny --faults 429,500,delay,malformed --delay-seconds 3
    compo-judge-server --model rule --faults 429-retry-after-ms,408,409 --retry-after 0.3

It serves ``GET /v1/models`` and ``POST /v1/chat/completions`` (non-streaming) on 127.0.0.1 only.
``--faults`` lists what successive chat requests get (``ok``, ``429``, ``500``, ``408``, ``409``,
``429-retry-after`` / ``429-retry-after-ms``: a 429 asking for ``--retry-after`` seconds in a
``Retry-After`` header (whole seconds) or a ``retry-after-ms`` header, ``delay`` past the client's
timeout, ``malformed``: a reply that is no valid answer, ``badjson``: a body that is not JSON);
after the list, requests succeed, or the list repeats with ``--repeat-faults``. That fixed
schedule makes retry, abstention and budget behaviour testable over real HTTP.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from compo.interfaces import CompoError, load_language_model

log = logging.getLogger(__name__)

FAULTS = (
    "ok", "429", "500", "408", "409", "429-retry-after", "429-retry-after-ms", "delay",
    "malformed", "badjson",
)  # fmt: skip
_SECTION = re.compile(r"\[Response A\]\n(.*)\n\n\[Response B\]\n(.*)\n\nWhich response", re.S)


class RuleBackend:
    """Answers the judge prompt of :mod:`oracles.openai_judge` by :func:`readable_text` (fast)."""

    name = "rule"

    def chat(self, messages: list[dict[str, str]], max_tokens: int) -> tuple[str, int, int]:
        from oracles.scorer import readable_text

        text = "\n".join(m.get("content", "") for m in messages)
        found = _SECTION.search(text)
        if not found:
            answer = "TIE"
        else:
            a, b = (readable_text(s) for s in found.groups())
            answer = "A" if a > b else "B" if b > a else "TIE"
        return answer, max(1, len(text) // 4), 1


class ModelBackend:
    """Greedy replies from a local causal LM with a chat template.

    Args:
        spec: ``smollm2``, ``tiny`` or a local model directory.
    """

    def __init__(self, spec: str) -> None:
        self.name, self.model, self.tokenizer = load_language_model(spec)
        self._lock = threading.Lock()  # one generation at a time: CPU-bound, not thread-safe

    def chat(self, messages: list[dict[str, str]], max_tokens: int) -> tuple[str, int, int]:
        import torch

        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        with self._lock, torch.no_grad():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max(1, min(max_tokens, 256)),
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        new = out[0, ids.shape[1] :]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return text.strip(), int(ids.shape[1]), int(new.shape[0])


class FaultSchedule:
    """What the n-th chat request gets: ``faults[n]``, then ``ok`` (or the list again)."""

    def __init__(self, faults: list[str], repeat: bool = False) -> None:
        bad = [f for f in faults if f not in FAULTS]
        if bad:
            raise ValueError(f"unknown fault(s) {bad}; choose from {list(FAULTS)}")
        self.faults, self.repeat, self.count = faults, repeat, 0
        self._lock = threading.Lock()

    def next(self) -> str:
        with self._lock:
            n, self.count = self.count, self.count + 1
        if not self.faults:
            return "ok"
        if self.repeat:
            return self.faults[n % len(self.faults)]
        return self.faults[n] if n < len(self.faults) else "ok"


class _Handler(BaseHTTPRequestHandler):
    server: JudgeServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet: requests go to logging.debug
        log.debug("%s " + fmt, self.address_string(), *args)

    def _send(
        self, status: int, body: bytes, ctype: str = "application/json", headers: Any = ()
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode())

    def _error(self, status: int, message: str, kind: str, headers: Any = ()) -> None:
        body = {"error": {"message": message, "type": kind, "code": status}}
        self._send(status, json.dumps(body).encode(), headers=headers)

    def _authorised(self) -> bool:
        want = self.server.api_key
        if want and self.headers.get("Authorization", "") != f"Bearer {want}":
            self._error(401, "invalid API key", "invalid_request_error")
            return False
        return True

    def do_GET(self) -> None:
        if not self._authorised():
            return
        if self.path.rstrip("/") == "/v1/models":
            models = [{"id": self.server.model_name, "object": "model", "owned_by": "compo"}]
            self._json(200, {"object": "list", "data": models})
        else:
            self._error(404, f"no route {self.path}", "not_found")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if not self._authorised():
            return
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._error(404, f"no route {self.path}", "not_found")
            return
        try:
            request = json.loads(raw)
            messages = request["messages"]
        except (ValueError, KeyError, TypeError):
            self._error(400, "body must be JSON with 'messages'", "invalid_request_error")
            return
        fault = self.server.faults.next()
        self.server.served[fault] = self.server.served.get(fault, 0) + 1
        if fault == "429":
            self._error(429, "rate limited (injected)", "rate_limit_error")
            return
        if fault == "500":
            self._error(500, "server error (injected)", "server_error")
            return
        if fault in ("408", "409"):
            self._error(int(fault), f"HTTP {fault} (injected)", "invalid_request_error")
            return
        if fault.startswith("429-retry-after"):
            wait = self.server.retry_after
            header = (
                ("retry-after-ms", str(round(wait * 1000)))
                if fault.endswith("-ms")
                else ("Retry-After", str(math.ceil(wait)))
            )
            self._error(429, "rate limited (injected)", "rate_limit_error", [header])
            return
        if fault == "badjson":
            self._send(200, b"<html>not json</html>", "application/json")
            return
        if fault == "delay":
            time.sleep(self.server.delay_seconds)
        text, n_prompt, n_completion = self.server.backend.chat(
            messages, int(request.get("max_tokens") or 16)
        )
        if fault == "malformed":
            text = "Well, it depends on many things."
        self._json(
            200,
            {
                "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": request.get("model", self.server.model_name),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": n_prompt,
                    "completion_tokens": n_completion,
                    "total_tokens": n_prompt + n_completion,
                },
            },
        )


class JudgeServer(ThreadingHTTPServer):
    """The HTTP server; ``url`` is its ``/v1`` base URL.

    Args:
        backend: Has ``name`` and ``chat(messages, max_tokens) -> (text, n_prompt, n_completion)``.
        port: TCP port on 127.0.0.1 (0: any free port).
        faults: Fault schedule (see module docstring).
        repeat_faults: Cycle through ``faults`` forever.
        delay_seconds: How long a ``delay`` fault waits before answering.
        retry_after: Seconds a ``429-retry-after(-ms)`` fault asks the client to wait.
        api_key: If set, requests must carry ``Authorization: Bearer <api_key>``.
        model_name: Model id reported by ``/v1/models`` (default: the backend's name).
    """

    daemon_threads = True

    def __init__(
        self,
        backend: Any,
        port: int = 0,
        faults: list[str] | None = None,
        repeat_faults: bool = False,
        delay_seconds: float = 5.0,
        api_key: str | None = None,
        model_name: str | None = None,
        retry_after: float = 1.0,
    ) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.backend, self.api_key, self.delay_seconds = backend, api_key, delay_seconds
        self.retry_after = retry_after
        self.faults = FaultSchedule(list(faults or []), repeat_faults)
        self.model_name = model_name or backend.name
        self.served: dict[str, int] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def start(self) -> JudgeServer:
        """Serves in a daemon thread (tests, in-process use); stop with ``shutdown()``."""
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self


def make_backend(spec: str):
    """``rule``, ``tiny``, ``smollm2`` or a local model directory."""
    return RuleBackend() if spec == "rule" else ModelBackend(spec)


def build_parser() -> argparse.ArgumentParser:
    """The command line; vLLM's flag names (``--served-model-name``, ``--api-key``) are accepted
    too, so one script can start either server."""
    parser = argparse.ArgumentParser(prog="compo-judge-server", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2", help="smollm2 | tiny | rule | <local dir>")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    parser.add_argument(
        "--model-name", "--served-model-name", default=None, help="id served by /v1/models"
    )
    parser.add_argument("--faults", default="", help=f"comma list of {', '.join(FAULTS)}")
    parser.add_argument(
        "--repeat-faults", action="store_true", help="cycle through --faults forever"
    )
    parser.add_argument(
        "--delay-seconds", type=float, default=5.0, help="how long a 'delay' fault waits"
    )
    parser.add_argument(
        "--retry-after",
        type=float,
        default=1.0,
        help="seconds a '429-retry-after(-ms)' fault asks the client to wait",
    )
    keys = parser.add_mutually_exclusive_group()
    keys.add_argument(
        "--api-key-env", default=None, help="require the key held by this environment variable"
    )
    keys.add_argument(
        "--api-key", default=None, help="require this key (vLLM's flag; visible in `ps`)"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    key = args.api_key
    if args.api_key_env:
        key = os.environ.get(args.api_key_env)
        if not key:
            parser.exit(2, f"compo-judge-server: error: {args.api_key_env} is not set\n")
    try:
        backend = make_backend(args.model)
        server = JudgeServer(backend, args.port, faults, args.repeat_faults, args.delay_seconds,
                             key, args.model_name, args.retry_after)  # fmt: skip
    except (ValueError, OSError) as exc:
        parser.exit(2, f"compo-judge-server: error: {exc}\n")
    except CompoError as exc:  # from model loading: one line, no traceback
        parser.exit(2, f"compo-judge-server: error: {exc}\n")
    print(f"compo-judge-server: listening on {server.url} (model {server.model_name})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    sys.exit(0)


if __name__ == "__main__":
    main()
