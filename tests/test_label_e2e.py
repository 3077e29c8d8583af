"""The human oracle end to end: ``compo ... oracle=human`` in a real process, labelled in a real
browser (Debian's chromium driven through chromedriver by Selenium) and over HTTP.

The browser tests skip where chromium, chromedriver or selenium is missing, except when
``COMPO_REQUIRE_BROWSER=1`` (``.ci/run`` sets it after installing them): then a missing browser
fails. Screenshots go to ``$COMPO_TEST_ARTIFACTS`` (else the test's tmp dir); they are not
committed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import mixed_pair_rows

from oracles.label_queue import LabelQueue

# Chromium on a closed network: nothing it may try to fetch or sync on its own.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WIDE, NARROW = (1280, 900), (400, 860)


def _browser_or_skip() -> tuple[str, str]:
    """Paths of chromium and chromedriver; skips (fails under COMPO_REQUIRE_BROWSER=1) without."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        chromium = None
    if chromium and driver:
        return chromium, driver
    reason = "needs chromium, chromium-driver (apt-get) and selenium (pip, dev extra)"
    if os.environ.get("COMPO_REQUIRE_BROWSER") == "1":
        pytest.fail(f"COMPO_REQUIRE_BROWSER=1 but the browser is missing: {reason}")
    pytest.skip(reason)


@pytest.fixture
def chrome(tmp_path):
    """A headless chromium driven by Selenium, with a fresh profile."""
    chromium, driver = _browser_or_skip()
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = chromium  # both paths given: Selenium Manager never downloads
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    options.add_argument(f"--window-size={WIDE[0]},{WIDE[1]}")
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(driver))
    browser.set_page_load_timeout(30)
    yield browser
    browser.quit()


@pytest.fixture
def artifacts(tmp_path) -> Path:
    path = Path(os.environ.get("COMPO_TEST_ARTIFACTS") or tmp_path / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


class HumanRun:
    """``compo`` with ``oracle=human oracle.judge.mode=web`` on the tiny model, in a subprocess.

    Its stderr is read by a thread (``lines``); ``url()`` waits for the page's address.
    """

    def __init__(self, tmp_path: Path, *overrides: str) -> None:
        pairs = tmp_path / "pairs.jsonl"
        pairs.write_text("".join(json.dumps(row) + "\n" for row in mixed_pair_rows()))
        self.run_dir, self.queue_path = tmp_path / "run", tmp_path / "labels.sqlite"
        command = [
            sys.executable, "-m", "compo", "model=tiny", f"data.path={pairs}",
            "splitter.delta=10", "dpo=none", "eval=none", "optimizer=compo_tiny",
            "optimizer.num_directions=4", "optimizer.max_iterations=3", "oracle=human",
            "oracle.max_new_tokens=8", "oracle.judge.mode=web",
            f"oracle.judge.queue_path={self.queue_path}", "oracle.judge.poll_seconds=0.05",
            f"hydra.run.dir={self.run_dir}", *overrides,
        ]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # never blocks it

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def url(self, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                found = re.search(r"oracle\.human: label at (http://\S+)", line)
                if found:
                    return found.group(1)
            assert self.proc.poll() is None, "\n".join(self.lines)
            time.sleep(0.05)
        raise AssertionError("no URL printed:\n" + "\n".join(self.lines))

    def wait(self, timeout: float = 120.0) -> int:
        code = self.proc.wait(timeout)
        time.sleep(0.2)  # the reader thread takes the last lines
        return code

    def metrics(self) -> dict:
        return json.loads((self.run_dir / "metrics.json").read_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@pytest.fixture
def human_run(tmp_path):
    runs: list[HumanRun] = []

    def start(*overrides: str) -> HumanRun:
        runs.append(HumanRun(tmp_path, *overrides))
        return runs[-1]

    yield start
    for run in runs:
        run.stop()


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _shorter(left: str, right: str) -> str:
    """The scripted labeller's taste: the shorter response (the tests' scorer prefers it too)."""
    return "1" if len(left) <= len(right) else "2"


# --------------------------------------------------------------------------------------------
# In the browser
# --------------------------------------------------------------------------------------------


def _answer_in_browser(
    chrome, run: HumanRun, url: str, artifacts: Path
) -> tuple[list[str], list[str]]:
    """Answers every comparison the run shows, by keyboard, until the run exits; after the first
    answer the labeller closes the page and opens it again.

    Returns the keys pressed and the notices the page showed after them.
    """
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    keys, notices = [], []
    deadline = time.monotonic() + 120
    while run.proc.poll() is None and time.monotonic() < deadline:
        try:
            item = chrome.find_element(By.ID, "item")
            if not item.is_displayed():
                time.sleep(0.1)  # the page reloads itself when comparisons arrive
                continue
            left = chrome.find_element(By.ID, "left").text
            right = chrome.find_element(By.ID, "right").text
        except (StaleElementReferenceException, WebDriverException):
            time.sleep(0.05)  # between two pages
            continue
        if not keys:
            _screenshots(chrome, artifacts)
        key = ["s", "t"][len(keys)] if len(keys) < 2 else _shorter(left, right)
        ActionChains(chrome).send_keys(key).perform()
        keys.append(key)
        WebDriverWait(chrome, 30).until(lambda _, old=item: _is_stale(old))
        WebDriverWait(chrome, 30).until(
            lambda c: c.execute_script("return document.readyState") == "complete"
        )
        notice = chrome.find_element(By.ID, "notice")
        notices.append(notice.text if notice.is_displayed() else "")
        if len(keys) == 1:  # closed and reopened: the page carries no state of its own
            chrome.get("about:blank")
            chrome.get(url)
    return keys, notices


def _is_stale(element) -> bool:
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException

    try:
        element.is_enabled()
    except StaleElementReferenceException:
        return True
    except WebDriverException as exc:
        # Asked while the page swaps the node out, chromedriver can answer with an inspector
        # error instead of "stale element" (seen once in CI, chromium 156): the same fact.
        if "does not belong to the document" in str(exc):
            return True
        raise
    return False


def _screenshots(chrome, artifacts: Path) -> None:
    """The page as a labeller meets it, wide and on a phone-sized screen."""
    from selenium.webdriver.common.by import By

    chrome.save_screenshot(str(artifacts / "label-page-wide.png"))
    left, right = chrome.find_element(By.ID, "left"), chrome.find_element(By.ID, "right")
    assert abs(left.location["y"] - right.location["y"]) < 5  # side by side
    chrome.set_window_size(*NARROW)
    try:
        chrome.save_screenshot(str(artifacts / "label-page-narrow.png"))
        assert right.location["y"] > left.location["y"] + left.size["height"]  # stacked
        assert chrome.execute_script(
            "return document.documentElement.scrollWidth <= window.innerWidth"
        )  # no sideways scrolling
        assert "Top" in chrome.find_element(By.CSS_SELECTOR, "button[value='1']").text
    finally:
        chrome.set_window_size(*WIDE)
    print(f"screenshots: {artifacts}/label-page-wide.png, label-page-narrow.png")


def test_a_person_labels_a_compo_run_by_keyboard_in_the_browser(chrome, human_run, artifacts):
    from selenium.webdriver.common.by import By

    run = human_run("oracle.judge.max_labels=40")
    url = run.url()
    base, token = url.split("/?")[0], url.split("token=")[1]
    # No token, a wrong one: refused, in the browser too.
    assert _status(base + "/") == 403 and _status(f"{base}/?token={token[::-1]}") == 403
    assert _status(f"{base}/api/pending?token=") == 403
    chrome.get(f"{base}/?token=wrong")
    assert "forbidden" in chrome.find_element(By.TAG_NAME, "body").text

    chrome.get(url)
    keys, notices = _answer_in_browser(chrome, run, url, artifacts)
    assert run.wait() == 0, "\n".join(run.lines)

    # After the last answer the run ended: the page says its server is gone, labels are saved.
    lost = chrome.find_element(By.ID, "lost")
    for _ in range(50):
        if lost.is_displayed():
            break
        time.sleep(0.1)
    assert lost.is_displayed() and "Every label you gave is saved" in lost.text
    assert notices[0].startswith("Skipped: this comparison carries no vote.")
    assert notices[1].startswith("Saved: a tie.")
    assert all(n.startswith(("Saved:", "Skipped:")) for n in notices), notices

    metrics = run.metrics()
    assert len(keys) >= 4 and metrics["oracle.judge.labelled"] == len(keys), (keys, metrics)
    assert metrics["oracle.judge.asked"] == len(keys) and metrics["oracle.judge.abstentions"] >= 1
    assert metrics["compo.n_applied"] > 0 and metrics["compo.changed"] is True
    stderr = "\n".join(run.lines)
    assert f"wait for a label: open {url} (labelled 0 this run of a budget of 40)" in stderr
    assert "all labelled" in stderr and "Traceback" not in stderr
    for path in run.run_dir.rglob("*"):  # the token is printed, never written
        assert not path.is_file() or token.encode() not in path.read_bytes(), path
    assert LabelQueue(run.queue_path).status()["state"] == "ended"


def test_page_renders_in_headless_chromium(tmp_path):
    """The page as chromium's own --dump-dom sees it (no driver involved)."""
    from oracles.human import HumanJudge

    chromium, _ = _browser_or_skip()
    queue = LabelQueue(tmp_path / "q.sqlite")
    queue.add("Name three primary colors.", "cur", "per", swapped=False)
    judge = HumanJudge(mode="web", queue_path=str(tmp_path / "q.sqlite"))
    judge.check()
    try:
        dom = subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
             judge.server.url],
            capture_output=True, text=True, timeout=60,
        ).stdout  # fmt: skip
    finally:
        judge.close()
    assert "Name three primary colors." in dom and 'value="tie"' in dom
    assert '<b id="older">1</b>' in dom  # queued before this judge asked anything


# --------------------------------------------------------------------------------------------
# Over HTTP: a run killed while it waits, restarted
# --------------------------------------------------------------------------------------------


def _api(base: str, token: str, path: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{base}{path}?token={token}", data, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        return json.loads(reply.read())


def _wait_for_batch(base: str, token: str, after: float, timeout: float = 60.0) -> dict:
    """The status once the run waits on a batch asked after ``after``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _api(base, token, "/api/status")
        run = status["run"] or {}
        if run.get("state") == "waiting" and run.get("asked_at", 0) > after and status["pending"]:
            return run
        time.sleep(0.05)
    raise AssertionError("the run never waited for a new batch")


def test_a_killed_run_restarts_and_reuses_every_label(human_run):
    run = human_run()
    url = run.url()
    base, token = url.split("/?")[0], url.split("token=")[1]
    first = _wait_for_batch(base, token, 0.0)
    for item in _api(base, token, "/api/pending"):
        _api(
            base,
            token,
            "/api/label",
            {"id": item["id"], "answer": _shorter(item["first"], item["second"])},
        )
    second = _wait_for_batch(base, token, first["asked_at"])
    kept = _api(base, token, "/api/pending")[0]
    _api(base, token, "/api/label", {"id": kept["id"], "answer": "tie"})
    run.proc.send_signal(signal.SIGKILL)  # mid-wait: the second iteration was never committed
    run.wait()

    again = human_run()
    new_url = again.url()
    assert new_url != url and _status(new_url) == 200  # a new token; the old page is gone
    base, token = new_url.split("/?")[0], new_url.split("token=")[1]
    deadline = time.monotonic() + 120
    while again.proc.poll() is None and time.monotonic() < deadline:
        try:
            pending = _api(base, token, "/api/pending")
            assert kept["id"] not in {item["id"] for item in pending}  # never asked again
            for item in pending:
                answer = _shorter(item["first"], item["second"])
                _api(base, token, "/api/label", {"id": item["id"], "answer": answer})
        except (urllib.error.URLError, ConnectionError):  # the run exited and took its page
            break
        time.sleep(0.05)
    assert again.wait() == 0, "\n".join(again.lines)
    metrics = again.metrics()
    assert metrics["compo.resumed_from_iteration"] == 1
    assert metrics["oracle.judge.reused"] >= 1 and second["batch"] >= 1
