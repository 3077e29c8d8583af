"""The human judge: scripted terminal answers, and the compo-label page over real HTTP."""

from __future__ import annotations

import html
import http.client
import io
import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from compo.errors import CompoError
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
        assert status == 200 and "&lt;b&gt;cur&lt;/b&gt;" in page and "<b>cur</b>" not in page
        assert '<b id="waiting">2</b>' in page and '<b id="labelled">0</b>' in page
        assert all("swapped" not in item for item in pending)  # the API is blind too
        for item, answer in zip(pending, ("1", "tie"), strict=True):
            form = urllib.parse.urlencode({"id": item["id"], "answer": answer})
            request = urllib.request.Request(
                f"{base}/label?token={token}", data=form.encode(), method="POST"
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.status == 200  # followed the 303 back to the page
    finally:
        worker.join(timeout=30)
        judge.close()
    first = LabelQueue(tmp_path / "q.sqlite").get(pending[0]["id"])
    assert first["label"] == "1"
    assert results[0].verdict == verdict_of(first).verdict != Verdict.TIE
    assert results[1].verdict == Verdict.TIE
    assert judge.usage() == dict(calls=2, identical=0, asked=2, labelled=2, reused=0, abstentions=0)


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
        body = json.dumps({"id": key, "answer": "2"}).encode()
        request = urllib.request.Request(
            f"{base}/api/label?token={token}",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.loads(response.read()) == {"ok": True}
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert (
        verdict_of(LabelQueue(tmp_path / "q.sqlite").get(key)).verdict == Verdict.PERTURBED_BETTER
    )


# --------------------------------------------------------------------------------------------
# Hostile or broken requests, over a raw socket (http.client refuses to send most of them)
# --------------------------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path):
    from oracles.human import LabelServer

    queue = LabelQueue(tmp_path / "q.sqlite")
    queue.add(PROMPT, "cur", "per", swapped=False)
    running = LabelServer(queue)
    # A short poll interval: shutdown() waits up to one interval, and this runs per test.
    threading.Thread(target=running.serve_forever, args=(0.02,), daemon=True).start()
    yield running
    running.shutdown()
    running.server_close()


def _raw(server, request: bytes, timeout: float = 5.0) -> int:
    """Sends ``request`` as is and returns the reply's status (0: closed without a reply)."""
    with socket.create_connection(server.server_address, timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        try:
            while b"\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            pytest.fail(f"no reply within {timeout} s: the handler thread is blocked")
        except ConnectionResetError:
            pass
    return int(data.split()[1]) if data.startswith(b"HTTP/") else 0


def _post(path: str, body: bytes = b"", length: str | None = None, ctype: str = "form") -> bytes:
    ctype = "application/json" if ctype == "json" else "application/x-www-form-urlencoded"
    length = str(len(body)) if length is None else length
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
    return (head + f"Content-Length: {length}\r\n\r\n").encode() + body


def _still_serving(server) -> None:
    status, body = _get(
        f"http://127.0.0.1:{server.server_address[1]}/api/pending?token={server.token}"
    )
    assert status == 200 and len(json.loads(body)) == 1


@pytest.mark.parametrize("length", ["100", "abc", "-1", str(10**12)])
def test_post_with_a_wrong_token_is_refused_before_the_body_is_read(server, capsys, length):
    # The body is announced but never sent: reading it would block the handler.
    assert _raw(server, _post("/api/label?token=wrong", length=length)) == 403
    assert _raw(server, _post("/label?token=" + "x" * 24, length=length)) == 403
    _still_serving(server)
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("length", "body", "ctype", "status"),
    [
        pytest.param("abc", b"", "form", 400, id="length-abc"),  # was a traceback, no reply
        pytest.param("-1", b"", "form", 400, id="length-negative"),  # was a blocked thread
        pytest.param("1e3", b"", "form", 400, id="length-float"),
        # Arabic-Indic digits, which int() would take.
        pytest.param("\u0661\u0662", b"", "form", 400, id="length-non-ascii-digits"),
        pytest.param(str(10**12), b"", "form", 413, id="length-huge"),  # was a MemoryError
        pytest.param(str(64 * 1024 + 1), b"", "form", 413, id="length-over-limit"),
        pytest.param(None, b"answer=1&id=\xff\xfe", "form", 400, id="invalid-utf8"),
        pytest.param(None, b"[" * 60_000, "json", 400, id="json-too-deep"),  # RecursionError
    ],
)
def test_malformed_bodies_get_a_4xx_and_the_server_keeps_serving(
    server, capsys, length, body, ctype, status
):
    head = _post(f"/api/label?token={server.token}", body, length, ctype)
    if length is not None and not length.isascii():
        head = head.replace(length.encode(), length.encode("utf-8"))
    assert _raw(server, head) == status
    _still_serving(server)
    assert "Traceback" not in capsys.readouterr().err


def test_a_body_that_never_arrives_times_out(server, capsys):
    server.request_timeout = 0.3
    request = _post(f"/api/label?token={server.token}", length="100") + b"answer=1&i"
    assert _raw(server, request, timeout=5.0) == 408
    _still_serving(server)
    assert "Traceback" not in capsys.readouterr().err


def test_a_non_ascii_token_is_refused_not_a_traceback(server, capsys):
    base = f"http://127.0.0.1:{server.server_address[1]}"
    assert _get(base + "/?token=%C3%A9")[0] == 403  # was a TypeError in compare_digest
    assert _raw(server, _post("/api/label?token=%C3%A9", b"answer=1")) == 403
    body = json.dumps({"token": server.token, "id": "x", "answer": "1"}).encode()
    assert _raw(server, _post("/api/label", body, ctype="json")) == 403  # the URL must hold it
    _still_serving(server)
    assert "Traceback" not in capsys.readouterr().err


def test_the_page_form_sends_its_token_in_the_url(server):
    """The browser's form is checked before its body is read, like any API client's URL."""
    base = f"http://127.0.0.1:{server.server_address[1]}"
    status, page = _get(server.url)
    assert status == 200
    action = html.unescape(re.search(r'<form method="post" action="([^"]+)"', page).group(1))
    assert urllib.parse.parse_qs(urllib.parse.urlparse(action).query)["token"] == [server.token]
    key = server.queue.pending()[0]["id"]
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=5)
    try:
        form = urllib.parse.urlencode({"id": key, "answer": "2"})  # no token in the body
        connection.request(
            "POST", action, form, {"Content-Type": "application/x-www-form-urlencoded"}
        )
        reply = connection.getresponse()
        assert reply.status == 303 and reply.getheader("Location").startswith("/?token=")
    finally:
        connection.close()
    assert server.queue.get(key)["label"] == "2"
    assert _get(base + "/api/pending?token=" + server.token) == (200, "[]")


# ---------------------------------------------------------------- found by a hostile probe
@pytest.mark.parametrize(
    "argv",
    [["--port", "70000"], ["--port", "-5"], ["--queue", "DIR"], ["--queue", "NOTSQLITE"]],
)
def test_compo_label_bad_port_or_queue_is_one_line(tmp_path, capsys, argv):
    from oracles.human import main

    (tmp_path / "not.sqlite").write_text("this is not a database\n" * 100)
    argv = [
        {"DIR": str(tmp_path), "NOTSQLITE": str(tmp_path / "not.sqlite")}.get(a, a) for a in argv
    ]
    if "--queue" not in argv:
        argv += ["--queue", str(tmp_path / "q.sqlite")]
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and err[0].startswith("compo-label: error:"), err


def test_a_label_with_an_unencodable_id_is_a_400(server, capsys):
    body = b'{"id": "\\udc80", "answer": "1"}'
    assert _raw(server, _post(f"/api/label?token={server.token}", body, ctype="json")) == 400
    _still_serving(server)
    assert "Traceback" not in capsys.readouterr().err


# ---------------------------------------------------------------- what the run and the page say
def _label_when_queued(queue: LabelQueue, answers: list[str], order=lambda items: items):
    """A labeller thread: once the run waits for ``len(answers)`` comparisons, answers them."""

    def run():
        for _ in range(2000):
            pending, status = queue.pending(), queue.status() or {}
            if len(pending) >= len(answers) and status.get("state") == "waiting":
                break
            time.sleep(0.01)
        for item, answer in zip(order(pending), answers, strict=False):
            queue.label(item["id"], answer)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _web_judge(tmp_path, **kwargs) -> HumanJudge:
    args = dict(mode="web", queue_path=str(tmp_path / "q.sqlite"), poll_seconds=0.02)
    return HumanJudge(**{**args, "wait_seconds": 20, **kwargs})


def test_labels_given_while_the_run_waits_are_asked_not_reused(tmp_path):
    # Was: a label given during the wait to a comparison later in the batch counted as reused.
    judge = _web_judge(tmp_path, serve=False)
    thread = _label_when_queued(LabelQueue(tmp_path / "q.sqlite"), ["tie", "tie"], reversed)
    judge.judge_batch([(PROMPT, "a", "b"), (PROMPT, "c", "d")])
    thread.join()
    assert judge.usage() == dict(calls=2, identical=0, asked=2, labelled=2, reused=0, abstentions=0)
    again = _web_judge(tmp_path, serve=False)  # a restarted run: nothing is asked again
    again.judge_batch([(PROMPT, "a", "b"), (PROMPT, "a", "a"), (PROMPT, "a", "b")])
    assert again.usage() == dict(calls=2, identical=1, asked=0, labelled=0, reused=2, abstentions=0)


def test_the_terminal_says_how_many_wait_and_where(tmp_path, capsys):
    judge = _web_judge(tmp_path, max_labels=10)
    judge.check()
    url = judge.server.url
    thread = _label_when_queued(judge.queue, ["1", "skip"])
    results = judge.judge_batch([(PROMPT, "a", "b"), (PROMPT, "c", "d")])
    thread.join()
    judge.close()
    lines = capsys.readouterr().err.splitlines()
    assert url.startswith("http://127.0.0.1:") and "/?token=" in url
    assert lines[0] == f"oracle.human: label at {url}"
    assert lines[1] == (
        f"oracle.human: 2 comparison(s) wait for a label: open {url} "
        "(labelled 0 this run of a budget of 10)"
    )
    assert lines[-1] == (
        "oracle.human: all labelled (labelled 2 this run of a budget of 10); the run continues"
    )
    assert [r.reason.startswith("abstain") for r in results] == [False, True]
    assert judge.usage()["abstentions"] == 1 and judge.usage()["labelled"] == 2
    assert LabelQueue(tmp_path / "q.sqlite").status()["state"] == "ended"


def test_unlabelled_comparisons_abstain_after_wait_seconds_with_a_warning(tmp_path, caplog):
    judge = _web_judge(tmp_path, serve=False, wait_seconds=0.2)
    result = judge.judge(PROMPT, "a", "b")
    assert result.verdict == Verdict.TIE and result.reason == "abstain: no label in time"
    assert "1 comparison(s) not labelled within oracle.judge.wait_seconds=0.2" in caplog.text
    assert judge.usage()["abstentions"] == 1 and judge.usage()["labelled"] == 0


def test_the_label_budget_stops_the_run_in_one_line_and_a_rerun_continues(tmp_path):
    judge = _web_judge(tmp_path, serve=False, max_labels=3)
    thread = _label_when_queued(LabelQueue(tmp_path / "q.sqlite"), ["1", "2"])
    judge.judge_batch([(PROMPT, "a", "b"), (PROMPT, "c", "d")])
    thread.join()
    with pytest.raises(CompoError) as info:
        judge.judge_batch([(PROMPT, "e", "f"), (PROMPT, "g", "h")])
    message = str(info.value)
    assert "\n" not in message and message.startswith("oracle.human: the next batch needs 2")
    assert "1 of oracle.judge.max_labels=3 are left" in message
    queue = LabelQueue(tmp_path / "q.sqlite")
    assert queue.status()["state"] == "stopped" and len(queue.pending()) == 0  # nothing queued
    assert queue.status()["note"] == "its next batch needs 2 new labels, 1 of its budget of 3 left"
    rerun = _web_judge(tmp_path, serve=False, max_labels=4)
    thread = _label_when_queued(queue, ["tie", "tie"])
    rerun.judge_batch([(PROMPT, x, y) for x, y in ("ab", "cd", "ef", "gh")])
    thread.join()
    assert rerun.usage()["reused"] == 2 and rerun.usage()["asked"] == 2


def test_the_budget_and_settings_are_checked_where_built():
    for kwargs, key in [
        ({"max_labels": 0}, "max_labels"),
        ({"max_labels": 2.5}, "max_labels"),
        ({"queue_path": 5}, "queue_path"),
        ({"mode": "browser"}, "mode"),
    ]:
        with pytest.raises(CompoError, match=rf"oracle\.judge\.{key}"):
            HumanJudge(**kwargs)


def _page(server, last: str | None = None) -> str:
    url = server.url + (f"&last={last}" if last else "")
    status, body = _get(url)
    assert status == 200
    return body


def _visible(page: str) -> str:
    """The page's text without its markup (hidden sections dropped), for reading what it says."""
    page = re.sub(r"<(script|style)\b.*?</\1>", "", page, flags=re.S)
    page = re.sub(r"<(\w+)[^>]*\bhidden\b[^>]*>.*?</\1>", "", page, flags=re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page)))


def test_an_answer_is_confirmed_and_the_page_says_what_happens_next(server):
    key = server.queue.pending()[0]["id"]
    other = server.queue.add(PROMPT, "left text", "right text", swapped=False)
    server.queue.set_status(new_run=True, state="waiting", labelled_before=0, batch=2, asked=2,
                            asked_at=server.queue.ask([key, other]), budget=5)  # fmt: skip
    text = _visible(_page(server))
    assert "Labelled this run: 0 Waiting: 2 Budget: 5 (3 left)" in text
    assert "The run is waiting for your labels." in text
    assert "Which response answers the prompt better?" in text
    server.queue.label(key, "1")
    text = _visible(_page(server, last="1"))
    assert (
        "Saved: the left (top) response is better. Next: the comparison below (1 unlabelled" in text
    )
    assert "Labelled this run: 1 Waiting: 1" in text
    server.queue.label(other, "skip")
    server.queue.set_status(state="working", labelled_before=2, batch=0)
    text = _visible(_page(server, last="skip"))
    assert "Skipped: this comparison carries no vote." in text
    assert "Nothing to label right now." in text and "generating new responses" in text
    assert "Labelled this run: 2 Waiting: 0" in text
    server.queue.set_status(state="ended")
    assert "The run has ended and every label is saved: you can close this page." in _visible(
        _page(server)
    )
    note = "its next batch needs 4 new labels, 1 of its budget of 5 left"
    server.queue.set_status(state="stopped", note=note)
    assert f"The run stopped: {note}." in _visible(_page(server))


def test_a_run_not_heard_from_is_flagged_and_no_run_is_said(server):
    text = _visible(_page(server))
    assert "No run has asked through this queue yet." in text
    assert "Labelled this run: 0 Waiting: 1 Budget: none set" in text
    server.queue.set_status(state="waiting", asked_at=0.0, batch=1)
    server.queue._db.execute("UPDATE status SET value = json_set(value, '$.updated', 0)")
    server.queue._db.commit()
    assert "(Not heard from for" in _visible(_page(server))


def test_a_second_answer_does_not_overwrite_the_first(server):
    key = server.queue.pending()[0]["id"]
    base = f"http://127.0.0.1:{server.server_address[1]}"
    assert server.queue.label(key, "2") and not server.queue.label(key, "1")
    body = json.dumps({"id": key, "answer": "1"}).encode()
    request = urllib.request.Request(
        f"{base}/api/label?token={server.token}", body, {"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 409 and b"first answer stands" in info.value.read()
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=5)
    try:
        form = urllib.parse.urlencode({"id": key, "answer": "1"})
        connection.request(
            "POST", f"/label?token={server.token}", form,
            {"Content-Type": "application/x-www-form-urlencoded"},
        )  # fmt: skip
        location = connection.getresponse().getheader("Location")
    finally:
        connection.close()
    assert location.endswith("&last=dup") and server.queue.get(key)["label"] == "2"
    assert "the first answer stands" in _visible(_page(server, last="dup"))


def test_every_text_is_escaped_and_the_page_loads_nothing_from_elsewhere(server):
    server.queue.label(server.queue.pending()[0]["id"], "tie")
    hostile = '<script>alert(1)</script>"&\x01\x1b'
    server.queue.add(hostile, "same start <img src=x> left", "same start $token right", False)
    with urllib.request.urlopen(server.url, timeout=10) as reply:
        page, headers = reply.read().decode(), reply.headers
    assert "<script>alert" not in page and "<img src=x>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&quot;&amp;\u2401\u241b" in page
    assert "$token" in _visible(page)  # a response is never read as a template
    assert "<mark>&lt;img src=x&gt; left</mark>" in page  # where the two responses part
    csp = headers["Content-Security-Policy"]
    nonce = re.search(r"'nonce-([^']+)'", csp).group(1)
    assert f'<script nonce="{nonce}">' in page and f'<style nonce="{nonce}">' in page
    assert "default-src 'none'" in csp and headers["Referrer-Policy"] == "no-referrer"
    assert not re.search(r'(src|href|action)="(https?:)?//', page)  # no external asset


def test_pending_api_is_blind_and_status_api_counts(server):
    base = f"http://127.0.0.1:{server.server_address[1]}"
    pending = json.loads(_get(f"{base}/api/pending?token={server.token}")[1])
    assert [sorted(item) for item in pending] == [
        ["asked", "created", "first", "id", "prompt", "second"]
    ]
    status = json.loads(_get(f"{base}/api/status?token={server.token}")[1])
    assert status == {"labelled": 0, "pending": 1, "state": "none", "run": None}
    assert _get(f"{base}/api/status")[0] == 403


def test_a_resume_is_not_refused_for_a_new_port_wait_or_budget():
    # Part of ComPO's resume fingerprint: raising the budget (as its error says) must continue.
    from oracles.generative import GenerativeOracle

    def described(**kwargs):
        return GenerativeOracle(HumanJudge(**kwargs)).describe()

    assert described(port=0) == described(port=8123, wait_seconds=60, max_labels=5, mode="web")
    assert described(seed=0) != described(seed=1)  # another order is another experiment


def test_a_queue_path_that_is_no_sqlite_file_is_one_line(no_sqlite_file):
    # Used to end in a sqlite3.OperationalError / DatabaseError traceback.
    path, problem = no_sqlite_file
    with pytest.raises(CompoError, match=rf"^oracle\.judge\.queue_path: {path} {problem}"):
        HumanJudge(queue_path=str(path)).check()
