"""The human judge: scripted terminal answers, and the compo-label page over real HTTP."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request

import pytest

from oracles.base import OracleError, Verdict
from oracles.human import HumanJudge, LabelQueue, verdict_of

PROMPT = "Name three primary colors."


def _terminal(tmp_path, answers: str, seed: int = 0) -> tuple[HumanJudge, io.StringIO]:
    out = io.StringIO()
    judge = HumanJudge(
        queue_path=str(tmp_path / "q.sqlite"), seed=seed, stdin=io.StringIO(answers), stdout=out
    )
    return judge, out


def test_terminal_shows_both_in_random_order_and_maps_answers(tmp_path):
    judge, out = _terminal(tmp_path, "maybe\n1\n")
    result = judge.judge(PROMPT, "current reply", "perturbed reply")
    text = out.getvalue()
    assert PROMPT in text and "please answer one of" in text
    first_is_current = text.index("current reply") < text.index("perturbed reply")
    expected = Verdict.CURRENT_BETTER if first_is_current else Verdict.PERTURBED_BETTER
    assert result.verdict == expected


def test_order_is_random_but_seeded(tmp_path):
    orders = set()
    for i in range(8):
        judge, out = _terminal(tmp_path / str(i), "tie\n", seed=i)
        assert judge.judge(PROMPT, "cur", "per").verdict == Verdict.TIE
        text = out.getvalue()
        orders.add(text.index("cur") < text.index("per"))
    assert orders == {True, False}


def test_skip_abstains_and_labels_survive_a_restart(tmp_path):
    judge, _ = _terminal(tmp_path, "skip\n2\n")
    assert judge.judge(PROMPT, "a", "b").reason.startswith("abstain")
    decided = judge.judge(PROMPT, "c", "d")
    restarted, out = _terminal(tmp_path, "")  # no input: must not be asked again
    assert restarted.judge(PROMPT, "c", "d") == decided
    assert out.getvalue() == "" and restarted.usage()["reused"] == 1


def test_closed_input_raises_rather_than_guessing(tmp_path):
    judge, _ = _terminal(tmp_path, "")
    with pytest.raises(OracleError, match="input closed"):
        judge.judge(PROMPT, "a", "b")


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_web_page_labels_the_queue(tmp_path):
    judge = HumanJudge(mode="web", queue_path=str(tmp_path / "q.sqlite"), poll_seconds=0.02,
                       wait_seconds=20)  # fmt: skip
    judge.check()
    url = judge.server.url
    base, token = url.split("/?")[0], url.split("token=")[1]
    results = []
    worker = threading.Thread(
        target=lambda: results.extend(
            judge.judge_batch([(PROMPT, "<b>cur</b>", "per"), (PROMPT, "x", "y")])
        )
    )
    worker.start()
    try:
        assert _get(base + "/")[0] == 403
        assert _get(base + "/?token=wrong")[0] == 403
        for _ in range(200):
            pending = json.loads(_get(f"{base}/api/pending?token={token}")[1])
            if len(pending) == 2:
                break
        status, page = _get(url)
        assert status == 200 and "&lt;b&gt;cur&lt;/b&gt;" in page and "2 comparison(s)" in page
        for item, answer in zip(pending, ("1", "tie"), strict=True):
            form = urllib.parse.urlencode({"token": token, "id": item["id"], "answer": answer})
            request = urllib.request.Request(base + "/label", data=form.encode(), method="POST")
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.status == 200  # followed the 303 back to the page
    finally:
        worker.join(timeout=30)
        judge.close()
    first = pending[0]
    assert results[0].verdict == verdict_of({**first, "label": "1"}).verdict != Verdict.TIE
    assert results[1].verdict == Verdict.TIE
    assert all(item["label"] for item in [LabelQueue(tmp_path / "q.sqlite").get(first["id"])])


def test_compo_label_command_serves_a_persisted_queue(tmp_path):
    queue = LabelQueue(tmp_path / "q.sqlite")
    key = queue.add(PROMPT, "cur", "per", swapped=False)
    proc = subprocess.Popen(
        [sys.executable, "-c", "from oracles.human import main; main()",
         "--queue", str(tmp_path / "q.sqlite")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        url = re.search(r"open (\S+)", proc.stdout.readline()).group(1)
        assert url.startswith("http://127.0.0.1:")
        base, token = url.split("/?")[0], url.split("token=")[1]
        body = json.dumps({"token": token, "id": key, "answer": "2"}).encode()
        request = urllib.request.Request(
            base + "/api/label", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.loads(response.read()) == {"ok": True}
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert (
        verdict_of(LabelQueue(tmp_path / "q.sqlite").get(key)).verdict == Verdict.PERTURBED_BETTER
    )


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_page_renders_in_headless_chromium(tmp_path):
    queue = LabelQueue(tmp_path / "q.sqlite")
    queue.add(PROMPT, "cur", "per", swapped=False)
    judge = HumanJudge(mode="web", queue_path=str(tmp_path / "q.sqlite"))
    judge.check()
    try:
        dom = subprocess.run(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
             judge.server.url],
            capture_output=True, text=True, timeout=60,
        ).stdout  # fmt: skip
    finally:
        judge.close()
    assert PROMPT in dom and 'value="tie"' in dom
