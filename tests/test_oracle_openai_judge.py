"""openai_judge through the real ``openai`` client over HTTP against compo-judge-server."""

from __future__ import annotations

import datetime
import email.utils
import logging
import sqlite3
import time

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from compo.cli import CONFIG_DIR
from compo.errors import CompoError
from compo.rundir import RunDir, atomic_write_text
from oracles.base import Verdict
from oracles.judge_server import JudgeServer, RuleBackend
from oracles.openai_judge import BudgetExhausted, OpenAIJudge, parse_answer, retry_after

KEY = "sk-test-0123456789-SECRET"
GOOD = "Red, blue and yellow are the primary colors."
BAD = "\x01\x02 zz zz zz zz"
PROMPT = "Name three primary colors."


class AlwaysA:
    """A judge with total position bias."""

    name = "always-a"

    def chat(self, messages, max_tokens):
        return "A", 10, 1


@pytest.fixture
def serve():
    servers = []

    def _serve(backend=None, **kwargs):
        srv = JudgeServer(backend or RuleBackend(), api_key=KEY, **kwargs).start()
        servers.append(srv)
        return srv

    yield _serve
    for srv in servers:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def judge_for(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPO_TEST_KEY", KEY)

    def _judge(server, **kwargs):
        args = dict(
            model=server.model_name,
            base_url=server.url,
            api_key_env="COMPO_TEST_KEY",
            cache_path=str(tmp_path / "verdicts.sqlite"),
            backoff_base=0.01,
            timeout=2.0,
        )
        args.update(kwargs)
        return OpenAIJudge(**args)

    return _judge


def test_parse_answer_is_strict():
    assert [parse_answer(t) for t in ("A", " b ", "[[A]]", "tie.", "**B**")] == [
        "A",
        "B",
        "A",
        "TIE",
        "B",
    ]
    assert parse_answer("A is better") is None
    assert parse_answer("") is None and parse_answer(None) is None


def test_consistent_answers_give_a_verdict(serve, judge_for):
    judge = judge_for(serve())
    assert judge.judge(PROMPT, GOOD, BAD).verdict == Verdict.CURRENT_BETTER
    assert judge.judge(PROMPT, BAD, GOOD).verdict == Verdict.PERTURBED_BETTER
    usage = judge.usage()
    assert usage["requests"] == 2 and usage["tokens"] > 0 and usage["cache_hits"] == 1


def test_position_bias_is_a_tie(serve, judge_for):
    judge = judge_for(serve(AlwaysA()), cache=False)
    result = judge.judge(PROMPT, GOOD, BAD)
    assert result.verdict == Verdict.TIE and "inconsistent" in result.reason
    assert judge.usage()["inconsistent"] == 1


def test_retries_429_500_and_timeouts(serve, judge_for):
    server = serve(faults=["429", "500", "delay", "ok"], delay_seconds=1.5)
    judge = judge_for(server, timeout=0.5, cache=False, max_concurrency=1)
    assert judge.judge(PROMPT, GOOD, BAD).verdict == Verdict.CURRENT_BETTER
    usage = judge.usage()
    assert usage["retries"] == 3 and usage["requests"] == 5 and usage["failed_requests"] == 0
    assert server.served == {"429": 1, "500": 1, "delay": 1, "ok": 2}


def test_malformed_replies_abstain_and_are_counted(serve, judge_for):
    # One order of the comparison gets a malformed reply, the other a real answer: an abstention.
    judge = judge_for(serve(faults=["malformed"]), cache=False, max_concurrency=1)
    result = judge.judge(PROMPT, GOOD, BAD)
    assert result.verdict == Verdict.TIE and result.reason.startswith("abstain")
    usage = judge.usage()
    assert usage["invalid_replies"] == 1 and usage["abstentions"] == 1
    # Abstentions are not cached: asking again (server healthy now) gives the real verdict.
    judge.use_cache = True
    assert judge.judge(PROMPT, GOOD, BAD).verdict == Verdict.CURRENT_BETTER


def test_retries_exhausted_abstain_then_stop(serve, judge_for):
    server = serve(faults=["500", "500"])  # the first request fails twice, its retry too
    judge = judge_for(server, max_retries=1, cache=False, max_concurrency=1)
    first = judge.judge(PROMPT, GOOD, BAD)
    assert first.verdict == Verdict.TIE and "HTTP 500" in first.reason
    server = serve(faults=["500"], repeat_faults=True)
    down = judge_for(server, max_retries=1, cache=False, max_consecutive_failures=4)
    with pytest.raises(CompoError, match=r"4 requests .* failed in a row"):
        down.judge(PROMPT, GOOD, BAD)


def test_budget_stops_the_run_with_a_clear_message(serve, judge_for):
    judge = judge_for(serve(), max_requests=3, cache=False, max_concurrency=1)
    judge.judge(PROMPT, GOOD, BAD)
    with pytest.raises(BudgetExhausted, match=r"budget spent .*3/3 requests") as spent:
        judge.judge(PROMPT, GOOD + "!", BAD)
    assert "cached" not in str(spent.value)  # cache=False: nothing was kept, so say nothing
    cached = judge_for(serve(), max_requests=2, max_concurrency=1)
    cached.judge(PROMPT, GOOD, BAD)
    with pytest.raises(BudgetExhausted, match=r"\(verdicts so far are cached\)"):
        cached.judge(PROMPT, GOOD + "!", BAD)
    tokens = judge_for(serve(), max_tokens=10, cache=False, max_concurrency=1)
    with pytest.raises(CompoError, match="tokens"):
        tokens.judge(PROMPT, GOOD, BAD)


def test_cache_is_shared_across_judges_and_orders(serve, judge_for):
    server = serve()
    judge_for(server).judge(PROMPT, GOOD, BAD)
    again = judge_for(server)  # a rerun or another sweep job
    assert again.judge(PROMPT, GOOD, BAD).verdict == Verdict.CURRENT_BETTER
    assert again.judge(PROMPT, BAD, GOOD).verdict == Verdict.PERTURBED_BETTER
    assert again.usage()["requests"] == 0 and again.usage()["cache_hits"] == 2
    other_model = judge_for(server, model="another-judge")
    other_model.judge(PROMPT, GOOD, BAD)
    assert other_model.usage()["requests"] == 2  # the judge model is part of the key


def test_missing_key_and_unreachable_endpoint_fail_fast(monkeypatch, serve, judge_for):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(CompoError, match="environment variable NO_SUCH_KEY_VAR is not set"):
        OpenAIJudge(api_key_env="NO_SUCH_KEY_VAR").check()
    monkeypatch.setenv("NO_SUCH_KEY_VAR", "  ")  # set, but to nothing: a different mistake
    with pytest.raises(CompoError, match="environment variable NO_SUCH_KEY_VAR is empty"):
        OpenAIJudge(api_key_env="NO_SUCH_KEY_VAR").check()
    monkeypatch.setenv("COMPO_TEST_KEY", KEY)
    down = OpenAIJudge(base_url="http://127.0.0.1:9/v1", api_key_env="COMPO_TEST_KEY")
    with pytest.raises(
        CompoError, match=r"cannot reach http://127.0.0.1:9/v1 \(connection refused\)"
    ):
        down.check()
    monkeypatch.setenv("WRONG_KEY", "sk-wrong")
    wrong = judge_for(serve(), api_key_env="WRONG_KEY")
    with pytest.raises(CompoError, match="rejected the key in WRONG_KEY") as info:
        wrong.check()
    assert "sk-wrong" not in str(info.value)
    keyless = judge_for(serve(), api_key_env=None)
    with pytest.raises(CompoError, match="rejected the request") as info:
        keyless.check()
    assert "no key was sent: oracle.judge.api_key_env is null" in str(info.value)
    assert "None" not in str(info.value)


def test_key_never_reaches_config_logs_trace_or_cache(serve, judge_for, tmp_path, caplog):
    """Everything a run writes, grepped for the key."""
    from compo.encoding import EncodedPair
    from compo.models import TinyModel
    from compo.zo.directions import GaussianSphere
    from compo.zo.scope import Scope
    from oracles.generative import GenerativeOracle

    caplog.set_level(logging.DEBUG)
    run = RunDir(tmp_path / "run")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny", "oracle=openai_judge"])
    atomic_write_text(run.path / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    assert "api_key_env: OPENAI_API_KEY" in (run.path / "config.yaml").read_text()

    server = serve(faults=["500", "malformed"])
    judge = judge_for(server, cache_path=str(run.path / "verdicts.sqlite"))
    judge.check()
    model, tokenizer = TinyModel().load()
    oracle = GenerativeOracle(judge, max_new_tokens=8)
    oracle.bind(tokenizer, run)
    scope = Scope(model)
    pair = EncodedPair("p1", tokenizer(PROMPT)["input_ids"], [1], [2])
    oracle.begin(model, scope, [pair], tokenizer.pad_token_id, iteration=0, head=None)
    oracle.compare(GaussianSphere().sample(0, 0, [0, 1], scope.shapes).scaled(50.0))
    run.log_metrics("oracle", oracle.usage())
    oracle._trace.close()
    judge.cache().close()

    assert (run.path / "trace" / "oracle.jsonl").is_file()
    for path in run.path.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    assert KEY not in caplog.text
    rows = sqlite3.connect(run.path / "verdicts.sqlite").execute("SELECT * FROM verdicts")
    assert all(KEY not in str(row) for row in rows)


class Chatty:
    """A judge that never answers in the required format (e.g. a wrong model behind the URL)."""

    name = "chatty"

    def chat(self, messages, max_tokens):
        return "I think the first one", 10, 5


def test_cache_key_holds_the_endpoint_and_sampling_settings(serve, judge_for):
    local, other = serve(), serve()  # two endpoints serving the same model name
    assert local.model_name == other.model_name and local.url != other.url
    judge_for(local).judge(PROMPT, GOOD, BAD)
    elsewhere = judge_for(other)
    elsewhere.judge(PROMPT, GOOD, BAD)
    assert elsewhere.usage()["requests"] == 2 and elsewhere.usage()["cache_hits"] == 0
    longer = judge_for(local, reply_tokens=8)  # other sampling settings, other verdicts
    longer.judge(PROMPT, GOOD, BAD)
    assert longer.usage()["requests"] == 2 and longer.usage()["cache_hits"] == 0
    same = judge_for(local)
    same.judge(PROMPT, GOOD, BAD)
    assert same.usage()["requests"] == 0 and same.usage()["cache_hits"] == 1


def test_a_judge_that_never_answers_validly_stops_the_run(serve, judge_for):
    judge = judge_for(serve(Chatty()), cache=False, max_consecutive_failures=6)
    with pytest.raises(CompoError, match=r"6 requests .* failed in a row .*invalid reply"):
        for i in range(10):
            judge.judge(PROMPT, GOOD + "!" * i, BAD)
    assert judge.usage()["invalid_replies"] == 6


def test_malformed_replies_do_not_reset_the_failure_count(serve, judge_for):
    # Alternating 500s and malformed bodies: every request fails, none may reset the count.
    server = serve(faults=["500", "malformed"], repeat_faults=True)
    judge = judge_for(
        server, cache=False, max_retries=0, max_concurrency=1, max_consecutive_failures=4
    )
    with pytest.raises(CompoError, match=r"4 requests .* failed in a row"):
        for i in range(4):
            judge.judge(PROMPT, GOOD + "!" * i, BAD)


def test_a_batch_whose_requests_all_failed_is_asked_again(serve, judge_for):
    # Both requests of the only comparison fail; the comparison is asked again (counting toward
    # max_consecutive_failures) instead of coming back as a tie an optimizer would commit.
    server = serve(faults=["malformed", "badjson"])
    judge = judge_for(server, cache=False, max_concurrency=1)
    result = judge.judge(PROMPT, GOOD, BAD)
    assert result.verdict == Verdict.CURRENT_BETTER
    assert judge.usage()["failed_requests"] == 2 and judge.usage()["requests"] == 4


# ---------------------------------------------------------------- what the server asks of a retry
def test_a_429_with_retry_after_ms_waits_as_long_as_the_server_asks(serve, judge_for):
    server = serve(faults=["429-retry-after-ms"], retry_after=0.4)
    judge = judge_for(server, cache=False, max_concurrency=1)  # own backoff: 0.01 s
    started = time.monotonic()
    assert judge.judge(PROMPT, GOOD, BAD).verdict == Verdict.CURRENT_BETTER
    assert time.monotonic() - started >= 0.4
    usage = judge.usage()
    assert usage["retries"] == 1 and usage["retry_after_waits"] == 1 and usage["requests"] == 3


def test_a_429_with_retry_after_seconds_waits_as_long_as_the_server_asks(serve, judge_for):
    server = serve(faults=["429-retry-after"], retry_after=1.0)
    judge = judge_for(server, cache=False, max_concurrency=1)
    started = time.monotonic()
    assert judge.judge(PROMPT, GOOD, BAD).verdict == Verdict.CURRENT_BETTER
    assert time.monotonic() - started >= 1.0
    assert judge.usage()["retry_after_waits"] == 1


def test_408_and_409_are_retried(serve, judge_for):
    server = serve(faults=["408", "409"])
    judge = judge_for(server, cache=False, max_concurrency=1)
    assert judge.judge(PROMPT, GOOD, BAD).verdict == Verdict.CURRENT_BETTER
    usage = judge.usage()
    assert usage["retries"] == 2 and usage["failed_requests"] == 0
    assert server.served == {"408": 1, "409": 1, "ok": 2}


def test_other_4xx_are_not_retried(serve, judge_for):
    server = serve()
    judge = judge_for(
        server,
        cache=False,
        max_concurrency=1,
        max_consecutive_failures=2,
        base_url=server.url + "/nowhere",
    )
    with pytest.raises(CompoError, match=r"2 requests .* failed in a row \(last: HTTP 404"):
        judge.judge(PROMPT, GOOD, BAD)
    assert judge.usage()["retries"] == 0 and judge.usage()["requests"] == 2


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "250", "retry-after": "7"}, 0.25),  # the finer one wins
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after": "soon"}, None),
        ({"retry-after-ms": "nan"}, None),
        ({"retry-after": "-3"}, None),
        ({"retry-after": "3600"}, None),  # beyond 60 s, as the openai client: own backoff
        ({}, None),
    ],
)
def test_retry_after_header_parsing(headers, seconds):
    assert retry_after(headers) == seconds  # the client's headers: lower-case lookups


def test_retry_after_as_an_http_date():
    when = email.utils.format_datetime(
        datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=30), usegmt=True
    )
    assert 25 <= retry_after({"retry-after": when}) <= 30


def test_a_resume_is_not_refused_for_a_new_budget_or_timeout():
    from oracles.generative import GenerativeOracle

    def described(**kwargs):
        return GenerativeOracle(OpenAIJudge(api_key_env=None, **kwargs)).describe()

    assert described() == described(max_requests=5000, timeout=90.0, max_retries=8, cache=False)
    assert described() != described(model="gpt-4o-mini")
    assert described() != described(base_url="http://127.0.0.1:8000/v1")


SECRET = "sk-SECRET123"


def test_a_key_with_surrounding_whitespace_is_stripped_and_never_echoed(
    serve, judge_for, monkeypatch
):
    # A key pasted with its newline used to reach the HTTP header and come back in the error.
    monkeypatch.setenv("COMPO_TEST_KEY", f" {KEY}\n")
    judge = judge_for(serve())
    judge.check()
    assert judge.judge(PROMPT, GOOD, BAD).verdict == Verdict.CURRENT_BETTER
    # The redaction covers the key as written, stripped and repr-escaped.
    for form in (f" {KEY}\n", KEY, repr(f"{KEY}\n"), repr(f"Bearer {KEY}\n".encode())):
        assert KEY not in judge._redact(f"error ({form})")


@pytest.mark.parametrize("value", ["sk-SECRÉT123", "sk-SEC RET123", "sk-SECRET\x07123"])
def test_a_malformed_key_is_refused_in_one_line_without_echoing_it(monkeypatch, value):
    monkeypatch.setenv("COMPO_TEST_KEY", value)
    judge = OpenAIJudge(base_url="http://127.0.0.1:9/v1", api_key_env="COMPO_TEST_KEY")
    with pytest.raises(CompoError, match="the key in COMPO_TEST_KEY is malformed") as info:
        judge.check()
    assert "SEC" not in str(info.value) and "cannot reach" not in str(info.value)


@pytest.mark.parametrize(
    "value",
    [
        SECRET, "1KEY", "MY-KEY", "",
        # Keys that are valid variable names were accepted, then printed whole ("environment
        # variable gsk_... is not set") and kept in .hydra/ and cli.log.
        "gsk_8fJ2kLmN0pQrS7tUvWxYz1234567890abcdEFGH", "hf_abcdEFGHijklMNOPqrstUVWXyz012345",
        "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
    ],
)  # fmt: skip
def test_api_key_env_must_name_a_variable(value):
    with pytest.raises(
        CompoError, match=r"oracle\.judge\.api_key_env must name an environment"
    ) as e:
        OpenAIJudge(api_key_env=value)
    assert value == "" or value not in str(e.value)
    assert e.value.secrets == ((value,) if value else ())  # scrubbed from Hydra's copy by the CLI


@pytest.mark.parametrize(
    "value", ["OPENAI_API_KEY", "MY_JUDGE_KEY_2", "my_judge_key", "X", "SK_JUDGE_KEY"]
)
def test_a_variable_name_is_accepted_as_api_key_env(value):
    assert OpenAIJudge(api_key_env=value).api_key_env == value


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/v1?api-key=SECRET123",
        "http://h/v1#SECRET123",
        "http://user:SECRET123@127.0.0.1:9/v1",
        "http://SECRET123@127.0.0.1:9/v1",
    ],
)
def test_a_base_url_with_credentials_a_query_or_fragment_is_refused(url):
    # Each used to pass and be echoed (with its secret) in "cannot reach ..." or request errors;
    # the config holding it is copied into the run dir, so it is refused before any work.
    with pytest.raises(CompoError, match=r"oracle\.judge\.base_url must not hold") as info:
        OpenAIJudge(base_url=url)
    assert "SECRET123" not in str(info.value) and "***" in str(info.value)
    assert "SECRET123" in " ".join(info.value.secrets)  # scrubbed from Hydra's copy by the CLI


def test_a_cache_path_that_is_no_sqlite_file_is_one_line(no_sqlite_file):
    # Used to end in a sqlite3.OperationalError / DatabaseError traceback.
    path, problem = no_sqlite_file
    judge = OpenAIJudge(cache_path=str(path), api_key_env=None)
    with pytest.raises(CompoError, match=rf"^oracle\.judge\.cache_path: {path} {problem}"):
        judge.cache()


@pytest.mark.parametrize("url", ["", "  ", "127.0.0.1:8000/v1", "ftp://host/v1", "http:///v1"])
def test_a_base_url_that_is_no_http_endpoint_is_refused_at_construction(url):
    # An empty one used to fall back to the official API and fail naming a URL never asked
    # for; one without a scheme failed mid-run inside httpx.
    with pytest.raises(CompoError, match=r"^oracle\.judge\.base_url must be an http\(s\) URL"):
        OpenAIJudge(base_url=url)


def test_an_empty_judge_model_is_refused_at_construction():
    with pytest.raises(CompoError, match=r"^oracle\.judge\.model is empty"):
        OpenAIJudge(model=" ")
