"""compo-judge-server: a real OpenAI-compatible server, driven by the official client."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import openai
import pytest

from compo.errors import CompoError
from oracles.judge_server import FaultSchedule, JudgeServer, ModelBackend
from oracles.openai_judge import OpenAIJudge

GOOD = "Red, blue and yellow are the primary colors."
BAD = "\x01\x02 zz zz zz zz"


def test_fault_schedule_is_deterministic():
    once = FaultSchedule(["429", "500"])
    assert [once.next() for _ in range(4)] == ["429", "500", "ok", "ok"]
    cycle = FaultSchedule(["delay", "ok"], repeat=True)
    assert [cycle.next() for _ in range(4)] == ["delay", "ok", "delay", "ok"]
    with pytest.raises(ValueError, match="unknown fault"):
        FaultSchedule(["503"])


def test_command_prints_its_port_and_serves_the_client(tmp_path):
    env = {**os.environ, "JUDGE_KEY": "sk-local"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "oracles.judge_server", "--model", "rule", "--port", "0",
         "--api-key-env", "JUDGE_KEY"],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        url = re.search(r"listening on (http://127\.0\.0\.1:\d+/v1)", line).group(1)
        client = openai.OpenAI(base_url=url, api_key="sk-local", max_retries=0, timeout=10)
        assert [m.id for m in client.models.list()] == ["rule"]
        reply = client.chat.completions.create(
            model="rule",
            messages=[{"role": "user", "content": "no judge prompt here"}],
            max_tokens=4,
        )
        assert reply.choices[0].message.content == "TIE" and reply.usage.total_tokens > 0
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_tiny_model_backend_answers_over_http(monkeypatch, tmp_path):
    monkeypatch.setenv("K", "x")
    server = JudgeServer(ModelBackend("tiny")).start()
    try:
        judge = OpenAIJudge(model=server.model_name, base_url=server.url, api_key_env="K",
                            cache=False, reply_tokens=3, max_consecutive_failures=4)  # fmt: skip
        judge.check()
        started = time.perf_counter()
        # A random model's reply is no valid answer: the judge never guesses, it asks again and
        # stops the run once max_consecutive_failures requests in a row were invalid.
        with pytest.raises(CompoError, match=r"4 requests .* failed in a row .*invalid reply"):
            judge.judge("Name three primary colors.", GOOD, BAD)
        seconds = time.perf_counter() - started
    finally:
        server.shutdown()
        server.server_close()
    assert judge.usage()["requests"] == 4 and judge.usage()["invalid_replies"] == 4
    assert seconds < 30


@pytest.mark.slow
def test_smollm2_judges_over_http(monkeypatch, capsys):
    monkeypatch.setenv("K", "x")
    server = JudgeServer(ModelBackend("smollm2")).start()
    try:
        judge = OpenAIJudge(model=server.model_name, base_url=server.url, api_key_env="K",
                            cache=False, reply_tokens=4, timeout=120)  # fmt: skip
        judge.check()
        started = time.perf_counter()
        # One request: SmolLM2-135M rarely keeps to "A"/"B"/"TIE" (it tends to start a sentence),
        # which a full judge() would count as failed requests until the failure limit stops it.
        answer, reason = judge.ask("Name three primary colors.", GOOD, "Bananas are tall.")
        seconds = time.perf_counter() - started
    finally:
        server.shutdown()
        server.server_close()
    assert answer in ("A", "B", "TIE") or reason.startswith("invalid reply")
    usage = judge.usage()
    assert usage["requests"] == 1 and usage["tokens"] > 0
    with capsys.disabled():
        print(f"\nsmollm2 judge: {answer} ({reason}) in {seconds:.1f} s; {usage}")
