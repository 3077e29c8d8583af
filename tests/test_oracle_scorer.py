"""The scorer judge's dotted path: found where a user keeps it, or one line saying why not."""

from __future__ import annotations

import logging
import os
import sys

import pytest

from compo.errors import CompoError
from oracles.base import OracleError, Verdict
from oracles.scorer import ScorerJudge

PROMPT = "Name three primary colors."


def test_a_scorer_in_the_working_directory_is_found(tmp_path, monkeypatch):
    # The `compo` console script does not put the working directory on sys.path.
    package = tmp_path / "myrules_i17"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "rules.py").write_text("def shorter(text):\n    return -len(text)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd())])
    monkeypatch.delitem(sys.modules, "myrules_i17", raising=False)
    monkeypatch.delitem(sys.modules, "myrules_i17.rules", raising=False)
    judge = ScorerJudge("myrules_i17.rules.shorter")
    judge.check()
    assert judge.judge(PROMPT, "a long answer", "short").verdict == Verdict.PERTURBED_BETTER


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("no_such_pkg_i17.rules.score", "No module named 'no_such_pkg_i17'"),
        ("os.path.no_such_function", "no_such_function"),
        ("os.sep", "not callable"),
        ("json", "not callable"),
        ("nodots_i17", "No module named 'nodots_i17'"),
        ("a..b", "a..b"),
        ("", "empty"),
    ],
)
def test_a_bad_dotted_path_is_one_line_naming_the_setting(path, reason, caplog):
    caplog.set_level(logging.DEBUG)
    with pytest.raises(CompoError) as info:
        ScorerJudge(path).check()
    message = str(info.value)
    assert message.startswith("oracle.judge.scorer: ") and "\n" not in message, message
    assert repr(path) in message and reason.lower() in message.lower(), message
    # Nothing else is printed or logged: the one line is all the user sees.
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


@pytest.mark.parametrize("value", [5, 2.5, None, ["a.b"]])
def test_a_scorer_that_is_no_path_and_no_callable_is_a_setting_error(value):
    with pytest.raises(CompoError, match=r"^oracle\.judge\.scorer must be a string"):
        ScorerJudge(value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"scorer": lambda text: float("nan")},
        {"scorer": lambda text: float("inf") if len(text) % 2 else 0.0},
        {"scorer": lambda prompts, texts: [float("nan")] * len(texts), "batched": True},
    ],
)
def test_a_non_finite_score_is_an_error_naming_the_judge(kwargs):
    # Used to abstain (oracle=scorer ran to exit 0 blaming the radius; judged_pairs kept no
    # pair) while sample_scored raised: one behaviour now, from the scorer itself.
    judge = ScorerJudge(**kwargs)
    with pytest.raises(OracleError, match=r"^judge ScorerJudge \(<lambda>\): non-finite score"):
        judge.judge(PROMPT, "one", "three")
    with pytest.raises(OracleError, match=r"^judge ScorerJudge \(<lambda>\): non-finite score"):
        judge.score([PROMPT, PROMPT], ["one", "three"])
