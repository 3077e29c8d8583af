"""A pairwise LLM judge behind any OpenAI-compatible endpoint (GPT-4, vLLM, compo-judge-server).

    export OPENAI_API_KEY=...   # the config names the variable, never the key
    compo optimizer=compo oracle=openai_judge                                  # api.openai.com
    compo-judge-server --model tiny --port 8000 &
    OPENAI_API_KEY=local compo model=tiny optimizer=compo oracle=openai_judge \\
        oracle.judge.base_url=http://127.0.0.1:8000/v1

Each comparison is asked in both orders; only a consistent pair of answers is a verdict (an LLM
judge favours one position), anything else is a tie with a reason. Transient failures (408, 409,
429, 5xx, timeouts, dropped connections) are retried after the wait the server asks for
(``retry-after-ms`` or ``Retry-After``, up to 60 s, as the openai client does) or else with
exponential backoff and jitter (the openai client's own retries are off: these are counted and
spent from the budget); a reply that is no valid answer counts as a failed request too.
``max_consecutive_failures`` failed requests in a row stop the run, and a batch whose requests all
failed is asked again rather than returned as ties. A request and token budget stops the run with
a clear message when spent, and verdicts are cached on disk, keyed on the judge's identity
(endpoint, model, template, sampling settings) and the texts, so reruns and sweep jobs do not pay
twice. The API key is read from the environment at call time (surrounding whitespace stripped, a
key with other characters than printable ASCII refused) and appears in no config, log, cache,
trace or exception. A ``base_url`` holding credentials, a query string or a fragment (where a key
would travel) is refused, and so is an ``api_key_env`` that is no variable name (most likely the
key itself); neither is repeated in the message.
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import os
import random
import re
import threading
import time
import urllib.parse
from datetime import UTC, datetime
from typing import Any

import openai
from joblib import Parallel, delayed

from compo.interfaces import CompoError, Judgement, OracleError, OutputJudge, Verdict, settings
from oracles.cache import VerdictCache

log = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "You are an impartial judge. You compare two assistant responses to the same user prompt and "
    "decide which one is more helpful, correct, honest and harmless. The order in which the "
    "responses appear and their length alone must not influence you. Reply with exactly one of "
    "A, B or TIE, and nothing else."
)
USER_TEMPLATE = (
    "[User prompt]\n{prompt}\n\n[Response A]\n{a}\n\n[Response B]\n{b}\n\n"
    "Which response is better? Reply with exactly one of: A, B, TIE."
)
TEMPLATE_ID = "compo-pairwise-v1\n" + SYSTEM_PROMPT + "\n" + USER_TEMPLATE
TEMPERATURE = 0.0  # greedy: a verdict should not depend on the sampler's luck
_ANSWER = re.compile(r"^(A|B|TIE)$")
RETRY_AFTER_MAX = 60.0  # longer waits asked by a server: our own backoff (as the openai client)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# What a key typed where its variable's name belongs looks like even when it is a valid name:
# a provider's key prefix (Groq gsk_, Hugging Face hf_, Stripe-style sk_), or a long run of
# mixed-case letters and digits, which no one names a variable.
_KEY_PREFIX = re.compile(r"^(sk|gsk|hf|xai|ghp|gho|github_pat|glpat|pk|rk)_")


def _looks_like_key(name: str) -> bool:
    mixed = any(c.islower() for c in name) and any(c.isupper() for c in name)
    digits = sum(c.isdigit() for c in name)
    return bool(_KEY_PREFIX.match(name)) or (len(name) >= 24 and mixed and digits >= 4)


_KEY_CHARS = re.compile(r"^[!-~]+$")  # printable ASCII without spaces: what an HTTP header holds


def _transient(exc: openai.APIError) -> bool:
    """Worth asking again: the statuses the openai client retries, timeouts, lost connections."""
    if isinstance(exc, openai.APIConnectionError):  # APITimeoutError included
        return True
    code = getattr(exc, "status_code", None)
    return code is not None and (code in (408, 409, 429) or code >= 500)


def retry_after(headers: Any) -> float | None:
    """Seconds a server asks a client to wait before retrying, or None.

    ``retry-after-ms`` (OpenAI's) wins over ``Retry-After`` (seconds or an HTTP date); a value
    that is unreadable, negative or over ``RETRY_AFTER_MAX`` seconds is ignored.
    """
    if headers is None:
        return None
    seconds = None
    try:
        if headers.get("retry-after-ms") is not None:
            seconds = float(headers["retry-after-ms"]) / 1000.0
        elif headers.get("retry-after") is not None:
            seconds = float(headers["retry-after"])
    except ValueError:  # Retry-After may be an HTTP date instead
        try:
            when = email.utils.parsedate_to_datetime(headers.get("retry-after") or "")
            seconds = (when - datetime.now(UTC)).total_seconds()
        except (TypeError, ValueError):
            return None
    if seconds is None or not (math.isfinite(seconds) and 0 <= seconds <= RETRY_AFTER_MAX):
        return None
    return seconds


class JudgeError(OracleError, CompoError):
    """The judge cannot go on (bad key, unreachable endpoint, budget spent): one line, exit 2."""


class BudgetExhausted(JudgeError):
    """The request or token budget is spent; the run stops rather than guess verdicts."""


def parse_answer(text: str | None) -> str | None:
    """``A``, ``B`` or ``TIE`` from a reply like ``"B"``, ``"[[A]]"`` or ``"tie."``; else None."""
    if not text:
        return None
    cleaned = text.strip().strip("[]()*\"'`.:! \n").upper()
    return cleaned if _ANSWER.match(cleaned) else None


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc)
    if "refused" in text.lower():
        return "connection refused"
    return (text.strip().splitlines() or [type(exc).__name__])[0]


def _refused(message: str, *secrets: str | None) -> settings.SettingError:
    """A setting error whose refused values the CLI scrubs from the run dir (never shown)."""
    error = settings.SettingError(message)
    error.secrets = tuple(s for s in secrets if s)
    return error


def _forms(secret: str) -> set[str]:
    """The ways an error message may spell ``secret``: as is, repr-escaped, percent-encoded."""
    forms = {secret, secret.strip()}
    for text in list(forms):
        forms |= {
            repr(text)[1:-1],
            repr(text.encode("utf-8"))[2:-1],
            urllib.parse.quote(text, safe=""),
        }
    return {f for f in forms if f}


class OpenAIJudge(OutputJudge):
    """Pairwise judge over the ``openai`` client.

    Args:
        model: Judge model name on the endpoint.
        base_url: Endpoint such as ``http://127.0.0.1:8000/v1``; None: the official API.
        api_key_env: Name of the environment variable holding the key (None: no key needed).
        timeout: Seconds per request.
        max_retries: Retries of one request after a transient failure.
        backoff_base: First backoff delay in seconds (doubles per retry, with jitter).
        backoff_max: Longest backoff delay.
        max_concurrency: Requests in flight at once (joblib threads).
        max_requests: Budget of HTTP requests (retries included) for this judge object.
        max_tokens: Budget of tokens (prompt + completion, as the server reports them).
        max_consecutive_failures: Requests that may fail in a row before the run stops.
        reply_tokens: ``max_tokens`` of each reply (the answer is one word).
        cache: Use the persistent verdict cache.
        cache_path: sqlite file; None: ``<compo cache dir>/verdicts.sqlite``.
        seed: Seeds the backoff jitter.
    """

    name = "openai_judge"

    def __init__(
        self,
        model: str = "gpt-4o",
        base_url: str | None = None,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout: float = 30.0,
        max_retries: int = 4,
        backoff_base: float = 0.5,
        backoff_max: float = 20.0,
        max_concurrency: int = 4,
        max_requests: int = 2000,
        max_tokens: int = 1_000_000,
        max_consecutive_failures: int = 10,
        reply_tokens: int = 4,
        cache: bool = True,
        cache_path: str | None = None,
        seed: int = 0,
    ) -> None:
        key = "oracle.judge"
        settings.text(f"{key}.base_url", base_url, optional=True)
        if not settings.text(f"{key}.model", model).strip():
            raise settings.SettingError(
                f"{key}.model is empty; name the judge model the endpoint serves"
            )
        if base_url is not None:
            # Credentials in a URL end up in the config copied into every run dir and in the
            # logs of servers and proxies: the key belongs in the variable named below.
            parts = urllib.parse.urlsplit(base_url)
            userinfo, at, host = parts.netloc.rpartition("@")
            if at or parts.query or parts.fragment or base_url.endswith(("?", "#")):
                shown = urllib.parse.urlunsplit(
                    (
                        parts.scheme,
                        "***@" * bool(at) + host,
                        parts.path,
                        "***" * bool(parts.query),
                        "***" * bool(parts.fragment),
                    )
                )
                raise _refused(
                    f"{key}.base_url must not hold credentials, a query string or a fragment "
                    f"(got {shown}); put the key in the variable named by {key}.api_key_env",
                    userinfo,
                    parts.query,
                    parts.fragment,
                )
            if parts.scheme not in ("http", "https") or not host:
                # Checked after the credentials, so a refused URL is never shown whole.
                raise settings.SettingError(
                    f"{key}.base_url must be an http(s) URL such as http://127.0.0.1:8000/v1, "
                    f"or null for the official API; got {base_url!r}"
                )
        if api_key_env is not None and not (
            isinstance(api_key_env, str)
            and _ENV_NAME.match(api_key_env)
            and not _looks_like_key(api_key_env)
        ):
            # Not repeated: a value that is no variable name is most likely the key itself.
            raise _refused(
                f"{key}.api_key_env must name an environment variable (it looks like a key itself)",
                str(api_key_env),
            )
        self.model, self.base_url, self.api_key_env = model, base_url, api_key_env
        self.timeout = settings.number(f"{key}.timeout", timeout, gt=0)
        self.max_retries = settings.number(f"{key}.max_retries", max_retries, integer=True, ge=0)
        self.backoff_base = settings.number(f"{key}.backoff_base", backoff_base, ge=0)
        self.backoff_max = settings.number(f"{key}.backoff_max", backoff_max, ge=0)
        for name, value in (
            ("max_concurrency", max_concurrency),
            ("max_requests", max_requests),
            ("max_tokens", max_tokens),
            ("max_consecutive_failures", max_consecutive_failures),
            ("reply_tokens", reply_tokens),
        ):
            settings.number(f"{key}.{name}", value, integer=True, ge=1)
        settings.seed(f"{key}.seed", seed)
        settings.flag(f"{key}.cache", cache)
        self.max_concurrency, self.max_requests = max_concurrency, max_requests
        self.max_tokens, self.reply_tokens = max_tokens, reply_tokens
        self.max_consecutive_failures = max_consecutive_failures
        # Everything besides the texts that decides a verdict: the verdict cache's key.
        self.identity = json.dumps(
            {
                "endpoint": self.where,
                "model": model,
                "template": TEMPLATE_ID,
                "temperature": TEMPERATURE,
                "reply_tokens": reply_tokens,
            },
            sort_keys=True,
        )
        self.use_cache, self.cache_path = cache, cache_path
        self._cache: VerdictCache | None = None
        self._client: openai.OpenAI | None = None
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._consecutive_failures = 0
        self.counts = dict.fromkeys(
            (
                "calls",
                "identical",
                "requests",
                "prompt_tokens",
                "completion_tokens",
                "tokens",
                "cache_hits",
                "abstentions",
                "invalid_replies",
                "inconsistent",
                "retries",
                "retry_after_waits",
                "failed_requests",
            ),
            0,
        )
        self.request_seconds = 0.0

    def describe(self) -> dict[str, Any]:
        """What decides a verdict (the verdict cache's key): endpoint, model, template, sampling.

        Budgets, retries, timeouts and concurrency are left out: a run stopped by its budget
        resumes its ComPO state when rerun with a larger one.
        """
        return {"type": f"{__name__}.{type(self).__qualname__}", **json.loads(self.identity)}

    @property
    def where(self) -> str:
        return self.base_url or "https://api.openai.com/v1"

    def _key(self) -> str:
        """The key from the environment, stripped of surrounding whitespace (a pasted newline).

        Raises:
            JudgeError: The variable is unset, or the key holds characters no HTTP header can
                carry (never shown: the message names the variable only).
        """
        if self.api_key_env is None:
            return "not-needed"
        raw = os.environ.get(self.api_key_env)
        key = (raw or "").strip()
        if not key:
            state = "is not set" if raw is None else "is empty"
            raise JudgeError(
                f"oracle.openai_judge: environment variable {self.api_key_env} {state}"
            )
        if not _KEY_CHARS.match(key):
            raise JudgeError(
                f"oracle.openai_judge: the key in {self.api_key_env} is malformed (it holds "
                "spaces, control or non-ASCII characters); set it to the key alone"
            )
        return key

    def _rejected(self, exc: openai.AuthenticationError) -> JudgeError:
        """The error for a server that refused the key sent (or the absence of one)."""
        if self.api_key_env is None:
            what = (
                "rejected the request: no key was sent: oracle.judge.api_key_env is null; "
                "set it to the environment variable holding the key"
            )
        else:
            what = f"rejected the key in {self.api_key_env}"
        return JudgeError(f"oracle.openai_judge: {self.where} {what} (HTTP {exc.status_code})")

    def _redact(self, text: str) -> str:
        """``text`` without the key in any spelling of it (a header error shows it escaped)."""
        key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        for form in sorted(_forms(key) if key.strip() else (), key=len, reverse=True):
            text = text.replace(form, "***")  # longest first: no partial leftovers
        return text

    def client(self) -> openai.OpenAI:
        """The ``openai`` client (built once; its own retries are off: ours count and back off)."""
        if self._client is None:
            self._client = openai.OpenAI(
                api_key=self._key(), base_url=self.base_url, timeout=self.timeout, max_retries=0
            )
        return self._client

    def cache(self) -> VerdictCache | None:
        if self.use_cache and self._cache is None:
            self._cache = VerdictCache(self.cache_path)
        return self._cache

    def check(self) -> None:
        """Fails fast on a missing key or an unreachable endpoint (one cheap ``/models`` call)."""
        client = self.client()
        try:
            listed = [m.id for m in client.models.list(timeout=min(self.timeout, 10.0))]
        except openai.AuthenticationError as exc:
            raise self._rejected(exc) from None
        except openai.APITimeoutError:
            raise JudgeError(
                f"oracle.openai_judge: {self.where} did not answer (timed out)"
            ) from None
        except openai.APIConnectionError as exc:
            reason = self._redact(_root_cause(exc))
            raise JudgeError(f"oracle.openai_judge: cannot reach {self.where} ({reason})") from None
        except openai.APIStatusError as exc:
            if exc.status_code != 404:  # some servers have no /models; chat may still work
                raise JudgeError(
                    f"oracle.openai_judge: {self.where}/models answered HTTP {exc.status_code}"
                ) from None
            return
        if listed and self.model not in listed:
            log.warning("judge model %r not listed by %s: %s", self.model, self.where, listed)
        self.cache()

    def _spend(self) -> None:
        with self._lock:
            c = self.counts
            if c["requests"] >= self.max_requests or c["tokens"] >= self.max_tokens:
                raise BudgetExhausted(
                    f"oracle.openai_judge: budget spent ({c['requests']}/{self.max_requests} "
                    f"requests, {c['tokens']}/{self.max_tokens} tokens); raise "
                    "oracle.judge.max_requests or oracle.judge.max_tokens"
                    + (" (verdicts so far are cached)" if self.use_cache else "")
                )
            c["requests"] += 1

    def _failed(self, reason: str) -> None:
        with self._lock:
            self.counts["failed_requests"] += 1
            self._consecutive_failures += 1
            stop = self._consecutive_failures >= self.max_consecutive_failures
        log.warning("judge request failed: %s", reason)
        if stop:
            raise JudgeError(
                f"oracle.openai_judge: {self.max_consecutive_failures} requests to {self.where} "
                f"failed in a row (last: {reason})"
            )

    def ask(self, prompt: str, a: str, b: str) -> tuple[str | None, str]:
        """One judge request, retried on transient failures: (``A``/``B``/``TIE`` or None, why)."""
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": USER_TEMPLATE.format(prompt=prompt, a=a, b=b)},
        ]
        reason, delay = "no attempt", 0.0
        for attempt in range(self.max_retries + 1):
            if attempt:
                with self._lock:
                    self.counts["retries"] += 1
                time.sleep(delay)
            self._spend()
            started = time.perf_counter()
            try:
                reply = self.client().chat.completions.create(
                    model=self.model,
                    messages=messages,
                    temperature=TEMPERATURE,
                    max_tokens=self.reply_tokens,
                    timeout=self.timeout,
                )
            except openai.AuthenticationError as exc:
                raise self._rejected(exc) from None
            except (openai.APIError, ValueError) as exc:
                if isinstance(exc, openai.APIError) and _transient(exc):
                    code = getattr(exc, "status_code", None)
                    reason = f"HTTP {code}" if code else type(exc).__name__
                    log.info("judge request: %s (attempt %d)", reason, attempt + 1)
                    delay = self._backoff(attempt, exc)
                    continue
                if isinstance(exc, openai.APIStatusError):  # other 4xx: asking again won't help
                    reason = f"HTTP {exc.status_code}: {self._redact(str(exc))[:200]}"
                    break
                reason = f"malformed response: {type(exc).__name__}"  # e.g. a body not JSON
                with self._lock:
                    self.counts["invalid_replies"] += 1
                break
            finally:
                with self._lock:
                    self.request_seconds += time.perf_counter() - started
            answer, reason = self._read(reply)
            if answer is None:  # an invalid reply is a failed request, not a success
                break
            with self._lock:
                self._consecutive_failures = 0
            return answer, reason
        self._failed(reason)
        return None, reason

    def _backoff(self, attempt: int, exc: openai.APIError) -> float:
        """Seconds before the next attempt: what the server asked for, else exponential."""
        asked = retry_after(getattr(getattr(exc, "response", None), "headers", None))
        with self._lock:
            if asked is not None:
                self.counts["retry_after_waits"] += 1
                return asked
            delay = min(self.backoff_max, self.backoff_base * 2**attempt)
            return delay * (0.5 + self._rng.random())  # jitter: sweep jobs do not retry in step

    def _read(self, reply) -> tuple[str | None, str]:
        usage = getattr(reply, "usage", None)
        with self._lock:
            if usage is not None:
                self.counts["prompt_tokens"] += usage.prompt_tokens or 0
                self.counts["completion_tokens"] += usage.completion_tokens or 0
                self.counts["tokens"] += usage.total_tokens or 0
        try:
            text = reply.choices[0].message.content
        except (AttributeError, IndexError, TypeError):
            text = None
        answer = parse_answer(text)
        if answer is None:
            with self._lock:
                self.counts["invalid_replies"] += 1
            return None, f"invalid reply {str(text)[:40]!r}"
        return answer, answer

    def _combine(self, first: tuple, second: tuple) -> Judgement:
        """first: A=current, B=perturbed; second: A=perturbed, B=current."""
        (x, why_x), (y, why_y) = first, second
        if x is None or y is None:
            with self._lock:
                self.counts["abstentions"] += 1
            return Judgement(Verdict.TIE, None, f"abstain: {why_x if x is None else why_y}")
        if (x, y) == ("B", "A"):
            return Judgement(Verdict.PERTURBED_BETTER, 1.0, "perturbed preferred in both orders")
        if (x, y) == ("A", "B"):
            return Judgement(Verdict.CURRENT_BETTER, 1.0, "current preferred in both orders")
        if (x, y) == ("TIE", "TIE"):
            return Judgement(Verdict.TIE, 1.0, "tie in both orders")
        with self._lock:
            self.counts["inconsistent"] += 1
        return Judgement(Verdict.TIE, 0.0, f"inconsistent across orders ({x}, {y}): tie")

    def judge(self, prompt: str, current: str, perturbed: str) -> Judgement:
        """PERTURBED_BETTER only when the judge prefers ``perturbed`` in both orders."""
        return self.judge_batch([(prompt, current, perturbed)])[0]

    def judge_batch(self, items: list[tuple[str, str, str]]) -> list[Judgement]:
        """Judges (prompt, current, perturbed) triples, ``max_concurrency`` requests at once."""
        out: list[Judgement | None] = [None] * len(items)
        todo = []
        cache = self.cache()
        for i, (prompt, current, perturbed) in enumerate(items):
            if current == perturbed:
                out[i] = Judgement(Verdict.TIE, 1.0, "identical responses")
                with self._lock:
                    self.counts["identical"] += 1
                continue
            hit = None if cache is None else cache.get(self.identity, prompt, current, perturbed)
            if hit is not None:
                out[i] = hit
                with self._lock:
                    self.counts["cache_hits"] += 1
            else:
                todo.append(i)
        if todo:
            self.client()  # a missing key fails here, before any thread starts
            tasks = []
            for i in todo:
                prompt, current, perturbed = items[i]
                tasks += [(prompt, current, perturbed), (prompt, perturbed, current)]
            answers = self._ask_all(tasks)
            # A batch in which every request failed holds no information: returned as ties, an
            # optimizer would commit the iteration and never ask again. Ask again instead; each
            # round adds to the consecutive failures, so a judge that stays down stops the run.
            while all(answer is None for answer, _ in answers):
                answers = self._ask_all(tasks)
            for j, i in enumerate(todo):
                judgement = self._combine(answers[2 * j], answers[2 * j + 1])
                out[i] = judgement
                # Failures are not cached (a rerun should ask again); real answers are.
                if cache is not None and not judgement.reason.startswith("abstain"):
                    cache.put(self.identity, *items[i], judgement)
            with self._lock:
                self.counts["calls"] += len(todo)
        return out  # type: ignore[return-value]

    def _ask_all(self, tasks: list[tuple[str, str, str]]) -> list[tuple[str | None, str]]:
        return Parallel(n_jobs=min(self.max_concurrency, len(tasks)), prefer="threads")(
            delayed(self.ask)(*task) for task in tasks
        )

    def usage(self) -> dict[str, float]:
        """Counters for ``metrics.json`` (requests include retries; seconds are wall time)."""
        with self._lock:
            return {**self.counts, "request_seconds": round(self.request_seconds, 3)}
