"""Every output judge honours the same contract (oracles/base.py).

Each backend runs for real: the scorer, a tiny random reward model, the OpenAI judge over HTTP
against compo-judge-server (rule backend), and the human judge with scripted input.
"""

from __future__ import annotations

import io
import math

import pytest

from compo.errors import CompoError
from oracles.base import Judgement, OracleError, OutputJudge, Verdict
from oracles.human import HumanJudge
from oracles.judge_server import JudgeServer, RuleBackend
from oracles.openai_judge import OpenAIJudge
from oracles.reward_model import RewardModelJudge
from oracles.scorer import ScorerJudge

GOOD = "Red, blue and yellow are the primary colors."
BAD = "\x01\x02 zz zz zz zz"
PROMPT = "Name three primary colors."
BACKENDS = ["scorer", "reward_model", "openai_judge", "human"]


@pytest.fixture(scope="module")
def server():
    srv = JudgeServer(RuleBackend()).start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def make(server, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPO_TEST_KEY", "sk-conformance")

    def _make(name: str, answers: str = "1\n2\ntie\nskip\n" * 4):
        if name == "scorer":
            return ScorerJudge()
        if name == "reward_model":
            return RewardModelJudge("tiny")
        if name == "openai_judge":
            return OpenAIJudge(
                model="rule",
                base_url=server.url,
                api_key_env="COMPO_TEST_KEY",
                cache_path=str(tmp_path / "verdicts.sqlite"),
                backoff_base=0.01,
            )
        return HumanJudge(
            queue_path=str(tmp_path / "labels.sqlite"),
            stdin=io.StringIO(answers),
            stdout=io.StringIO(),
        )

    return _make


def _work(judge) -> int:
    """How much the judge has actually done (calls or requests), from its own counters."""
    usage = judge.usage()
    return usage.get("requests", 0) + usage.get("calls", 0) + usage.get("sequences_scored", 0)


@pytest.mark.parametrize("name", BACKENDS)
def test_protocol_and_verdict_type(make, name):
    judge = make(name)
    assert isinstance(judge, OutputJudge)
    judge.check()
    result = judge.judge(PROMPT, GOOD, BAD)
    assert isinstance(result, Judgement)
    assert isinstance(result.verdict, Verdict)
    assert result.confidence is None or 0.0 <= result.confidence <= 1.0
    assert isinstance(result.reason, str) and result.reason


@pytest.mark.parametrize("name", BACKENDS)
def test_identical_responses_tie_without_a_call(make, name):
    judge = make(name, answers="")  # the human must not be asked: empty input would raise
    judge.check()
    before = _work(judge)
    result = judge.judge(PROMPT, GOOD, GOOD)
    assert result.verdict == Verdict.TIE
    assert _work(judge) == before
    assert judge.usage()["identical"] == 1


@pytest.mark.parametrize("name", BACKENDS)
def test_usage_counters_are_numbers(make, name):
    judge = make(name)
    judge.judge(PROMPT, GOOD, BAD)
    usage = judge.usage()
    assert usage and all(isinstance(v, int | float) for v in usage.values())
    assert usage["calls"] == 1


@pytest.mark.parametrize("name", ["scorer", "openai_judge"])
def test_swapping_the_responses_flips_a_decided_verdict(make, name):
    judge = make(name)
    a, b = judge.judge(PROMPT, GOOD, BAD), judge.judge(PROMPT, BAD, GOOD)
    assert a.verdict == Verdict.CURRENT_BETTER
    assert b.verdict == Verdict.PERTURBED_BETTER


def _broken_scorer(text: str) -> float:
    raise RuntimeError("model crashed")


@pytest.mark.parametrize("name", BACKENDS)
def test_failure_abstains_or_raises_never_invents(make, name, monkeypatch, tmp_path):
    """A backend that cannot decide returns TIE with an 'abstain' reason or raises."""
    if name == "scorer":
        judge = ScorerJudge(_broken_scorer)
        with pytest.raises(OracleError, match="model crashed"):
            judge.judge(PROMPT, GOOD, BAD)
        with pytest.raises(OracleError, match="non-finite score"):  # a broken scorer: no tie
            ScorerJudge(lambda text: math.nan).judge(PROMPT, GOOD, BAD)
    elif name == "reward_model":
        judge = RewardModelJudge(str(tmp_path / "missing"))
        with pytest.raises(CompoError, match=r"oracle\.reward_model"):
            judge.judge(PROMPT, GOOD, BAD)
    elif name == "openai_judge":
        # Nothing answers: the comparison is asked again until the failure budget stops the run.
        judge = OpenAIJudge(
            base_url="http://127.0.0.1:9/v1",
            api_key_env="COMPO_TEST_KEY",
            max_retries=1,
            backoff_base=0.01,
            max_consecutive_failures=4,
            cache=False,
        )
        with pytest.raises(CompoError, match=r"4 requests .* failed in a row"):
            judge.judge(PROMPT, GOOD, BAD)
        assert judge.usage()["abstentions"] == 0 and judge.usage()["failed_requests"] == 4
    else:
        judge = make(name, answers="")  # input closed: no answer to give
        with pytest.raises(OracleError, match="input closed"):
            judge.judge(PROMPT, GOOD, BAD)
