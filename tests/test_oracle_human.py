"""The human judge: scripted terminal answers, and the compo-label page over real HTTP."""

from __future__ import annotations

import html
import http.client
import io
import json
import re
import shutil
import socket
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
            form = urllib.parse.urlencode({"id": item["id"], "answer": answer})
            request = urllib.request.Request(
                f"{base}/label?token={token}", data=form.encode(), method="POST"
            )
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
