"""Black-box oracles teach: every output-level design moves the model toward what the judge likes.

The judge is a scorer that prefers shorter answers (score = -len(text)), used strictly as a black
box: ComPO sees its comparisons or scores only. Each design trains the tiny model on six prompts
and must shorten its greedy answers to six prompts it never saw. Plus: the radius search, the tie
rule, the all-tie warning, judge-labelled pairs and the oracle contract.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from compo.cli import CONFIG_DIR
from compo.encoding import encode_pairs
from compo.interfaces import ComparisonOracle, OutputJudge, Verdict
from compo.models import TinyModel
from compo.rundir import RunDir
from compo.types import PreferencePair
from compo.zo import ComPO, GaussianSphere, SupportRestricted
from compo.zo.estimator import MonteCarlo
from compo.zo.radius import RadiusSearch
from compo.zo.scope import Scope
from oracles.generative import GenerativeOracle
from oracles.judged_pairs import JudgedPairsOracle
from oracles.sample_scored import SampleScoredOracle
from oracles.scorer import ScorerJudge
from tests.conftest import QUESTIONS

TRAIN = [q for q, _ in QUESTIONS]
HELD_OUT = [
    "Name an animal.",
    "What is 3+5?",
    "Capital of Spain?",
    "Name a drink.",
    "Opposite of up?",
    "Name a tree.",
]
MAX_NEW = 24
pytestmark = pytest.mark.usefixtures("one_thread")  # step-by-step decoding of a tiny model


def shorter(text: str) -> float:
    """The judge's taste: shorter answers are better."""
    return -float(len(text))


def constant(text: str) -> float:
    return 1.0


def _mean_length(model, tokenizer, prompts) -> float:
    lengths = []
    for prompt in prompts:
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        out = model.generate(
            **enc, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        new = out[0, enc["input_ids"].shape[1] :]
        lengths.append(len(tokenizer.decode(new, skip_special_tokens=True)))
    return sum(lengths) / len(lengths)


def _train(tmp_path, make_oracle, scorer=shorter, **settings):
    model, tokenizer = TinyModel(seed=0).load()
    pairs = [PreferencePair(f"t{i}", q, "a", "b") for i, q in enumerate(TRAIN)]
    encoded, _ = encode_pairs(pairs, tokenizer, 256, 128)
    oracle = make_oracle(ScorerJudge(scorer))
    run_dir = RunDir(tmp_path)
    oracle.bind(tokenizer, run_dir)
    oracle.check()
    before = _mean_length(model, tokenizer, HELD_OUT)
    options = dict(
        directions=SupportRestricted(4),
        step_size=1.0,
        threshold=0.0,
        keep_fraction=None,
        epochs=4,
        progress=False,
        seed=0,
    )
    summary = ComPO(**(options | settings)).run(model, tokenizer, encoded, oracle, run_dir)
    return before, _mean_length(model, tokenizer, HELD_OUT), summary, oracle, run_dir


def _generative(**kwargs):
    return lambda judge: GenerativeOracle(judge, max_new_tokens=MAX_NEW, **kwargs)


def _sample_scored(**kwargs):
    return lambda judge: SampleScoredOracle(judge, num_samples=4, max_new_tokens=MAX_NEW, **kwargs)


DESIGNS = {
    "generative": (_generative(), dict(radius="auto", num_directions=32)),
    "antithetic": (_generative(query="antithetic"), dict(radius="auto", num_directions=32)),
    "graded": (_generative(graded=True), dict(radius="auto", num_directions=32)),
    # Two prompts per query: at target_differ 0.5 the search settles on r ~ 0.1, where a changed
    # response is rarely better in sum, and 2 of 18 steps applied; at 0.8, 16 of 18.
    "batched": (
        _generative(),
        dict(radius="auto", target_differ=0.8, num_directions=32, batch_size=2, epochs=6),
    ),
    "sample_scored": (_sample_scored(), dict(num_directions=256, perturbation_batch=64)),
    "sample_scored_expected": (_sample_scored(), dict(estimator="expected")),
}


@pytest.mark.parametrize("design", list(DESIGNS))
def test_each_design_teaches_the_judges_taste_on_unseen_prompts(tmp_path, design):
    make, settings = DESIGNS[design]
    before, after, summary, oracle, _ = _train(tmp_path, make, **settings)
    assert summary["n_applied"] > 0
    assert after < before - 1.0, (design, before, after)  # greedy answers got shorter
    usage = oracle.usage()
    assert usage["judge.texts_scored"] > 0  # the judge, not the likelihood, taught it


def test_the_trace_measures_steps_against_the_oracles_own_exact_direction(tmp_path):
    # sample_scored's exact direction is its policy gradient, not the likelihood oracle's: the
    # trace's cos_limit is taken against the oracle's own, so its expected steps score 1.
    *_, run_dir = _train(tmp_path, _sample_scored(), estimator="expected", epochs=1)
    rows = [json.loads(line) for line in (run_dir.path / "trace" / "compo.jsonl").open()]
    assert rows and all(r["cos_limit"] == pytest.approx(1.0) for r in rows)
    *_, run_dir = _train(tmp_path / "judge", _generative(), radius="auto", epochs=1,
                         num_directions=8, max_iterations=1)  # fmt: skip
    row = json.loads((run_dir.path / "trace" / "compo.jsonl").read_text().splitlines()[0])
    assert row["cos_limit"] is None  # a judge of text has no exact direction to compare with


def test_sample_scored_spends_k_calls_per_prompt_whatever_m(tmp_path):
    calls = []
    for m in (16, 64):
        _, _, _, oracle, _ = _train(
            tmp_path / str(m), _sample_scored(), num_directions=m, epochs=1, max_iterations=2
        )
        calls.append(oracle.usage()["judge.texts_scored"])
    assert calls == [2 * 4, 2 * 4]  # 2 iterations x 1 prompt x K = 4 samples, for any m


def test_radius_search_reaches_its_target():
    search = RadiusSearch(target=0.5, probes=8, tolerance=0.05)
    found = search.search(lambda r: 1 - math.exp(-r / 3.0), start=1.0)
    assert abs(found.share - 0.5) <= 0.05
    assert abs(found.radius - 3.0 * math.log(2)) / (3.0 * math.log(2)) < 0.3
    high = search.search(lambda r: 1.0 if r > 1e-3 else 0.0, start=1.0)
    assert high.share == 1.0 and high.radius <= 1e-3 * 4  # brackets downward too


def test_auto_radius_on_the_tiny_model_hits_the_target_share(tmp_path):
    _, _, summary, _, run_dir = _train(
        tmp_path, _generative(), radius="auto", num_directions=8, max_iterations=1, epochs=1
    )
    row = json.loads((run_dir.path / "trace" / "compo.jsonl").read_text().splitlines()[0])
    assert abs(row["radius_differ"] - 0.5) <= 0.15, row["radius_tried"]
    assert summary["radius_last"] == row["radius"] > 0
    assert summary["radius_differ_mean"] == row["radius_differ"]


def test_the_papers_radius_changes_no_response_and_the_run_says_so(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        _, _, summary, oracle, _ = _train(
            tmp_path, _generative(), radius=5e-4, num_directions=8, max_iterations=2, epochs=1
        )
    assert summary["n_applied"] == 0 and summary["decisive_share"] == 0.0
    assert "ties teach nothing" in summary["warning"]
    assert any("decided only 0 of 16" in r.getMessage() for r in caplog.records)
    assert oracle.usage()["identical_ties"] == 16


def test_all_tie_judge_warns_and_applies_nothing(tmp_path):
    _, _, summary, oracle, _ = _train(
        tmp_path, _generative(), scorer=constant, radius=20.0, num_directions=8, epochs=1
    )
    assert summary["n_applied"] == 0 and summary["n_decisive"] == 0
    assert "warning" in summary
    assert oracle.usage()["judge.texts_scored"] > 0  # responses differed; the judge tied them
    assert "try optimizer.radius=auto" in summary["warning"]


def test_an_all_tie_judge_under_radius_auto_is_not_told_to_use_radius_auto(tmp_path):
    _, _, summary, _, _ = _train(
        tmp_path, _generative(), scorer=constant, radius="auto", num_directions=8,
        max_iterations=1, epochs=1,
    )  # fmt: skip
    assert summary["n_decisive"] == 0 and summary["radius_differ_mean"] > 0
    assert "radius=auto" not in summary["warning"]
    assert "try a larger optimizer.target_differ, or an oracle with finer" in summary["warning"]


class _AllTies(ComparisonOracle):
    def begin(self, *args, **kwargs):
        pass

    def compare(self, deltas):
        return [Verdict.TIE] * len(deltas)


def test_ties_are_no_votes_unless_the_authors_rule_is_asked_for():
    model, _ = TinyModel(seed=0).load()
    scope = Scope(model)
    ignore = MonteCarlo(GaussianSphere(), num_directions=6, radius=1.0, batch=3)
    est = ignore.estimate(_AllTies(), scope, seed=0, iteration=0)
    assert est.n_tie == 6 and est.frac == 0.0
    assert all(torch.count_nonzero(t) == 0 for t in est.vector)  # no push at all
    authors = MonteCarlo(GaussianSphere(), num_directions=6, radius=1.0, batch=3, ties="current")
    est = authors.estimate(_AllTies(), scope, seed=0, iteration=0)
    assert est.n_tie == 6 and est.m == 6 and est.frac == 0.0
    assert any(torch.count_nonzero(t) > 0 for t in est.vector)  # each tie voted +1


def test_judged_pairs_reorients_drops_and_then_learns_the_judges_labels(tmp_path):
    model, tokenizer = TinyModel(seed=0).load()
    pairs = [
        PreferencePair("keep", "Name a color.", "Red.", "A long answer about colors."),
        PreferencePair("flip", "Name a fruit.", "A long answer about fruit.", "Pear."),
        PreferencePair("tie", "Name a planet.", "Mars.", "Moon."),
    ]
    encoded, _ = encode_pairs(pairs, tokenizer, 256, 128)
    oracle = JudgedPairsOracle(ScorerJudge(shorter))
    run_dir = RunDir(tmp_path)
    oracle.bind(tokenizer, run_dir)
    oracle.check()
    summary = ComPO(
        num_directions=64, step_size=1.0, threshold=0.0, keep_fraction=None, epochs=3,
        radius=1e-3, progress=False, directions=GaussianSphere(),
    ).run(model, tokenizer, encoded, oracle, run_dir)  # fmt: skip
    usage = oracle.usage()
    assert (usage["pairs_kept"], usage["pairs_flipped"], usage["pairs_dropped"]) == (1, 1, 1)
    assert usage["judge.texts_scored"] == 6  # two texts per pair, once for the whole run
    labels = [json.loads(x) for x in (run_dir.path / "judged_pairs.jsonl").read_text().splitlines()]
    assert [r["label"] for r in labels] == ["kept", "flipped", "dropped"]
    # The judged "chosen" of the flipped pair is "Pear.": its margin over the long answer grew.
    rows = [
        json.loads(x) for x in (run_dir.path / "trace" / "compo.jsonl").read_text().splitlines()
    ]
    flipped = [r for r in rows if r["pair_ids"] == ["flip"]]
    gain = sum(
        (r["logp_chosen_after"][0] - r["logp_rejected_after"][0])
        - (r["logp_chosen_before"][0] - r["logp_rejected_before"][0])
        for r in flipped
    )
    assert summary["n_applied"] > 0 and gain > 0


def test_auto_radius_is_kept_across_resume(tmp_path):
    settings = dict(radius="auto", num_directions=4, radius_every=10, epochs=1)
    _train(tmp_path, _generative(), max_iterations=2, **settings)
    progress = json.loads((tmp_path / "compo_state" / "progress.json").read_text())
    stored = progress["radius"]
    assert stored and stored > 0
    _, _, summary, _, run_dir = _train(tmp_path, _generative(), max_iterations=3, **settings)
    assert summary["resumed_from_iteration"] == 2
    rows = [
        json.loads(x) for x in (run_dir.path / "trace" / "compo.jsonl").read_text().splitlines()
    ]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert rows[2]["radius"] == stored and "radius_tried" not in rows[2]  # no new search


# ---------------------------------------------------------------------- the contract
def _oracle_configs():
    return sorted(p.stem for p in (Path(CONFIG_DIR) / "oracle").glob("*.yaml") if p.stem != "none")


@pytest.mark.parametrize("name", _oracle_configs())
def test_every_oracle_config_builds_a_comparison_oracle(name):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"oracle={name}"])
    oracle = instantiate(cfg.oracle)
    assert isinstance(oracle, ComparisonOracle)
    assert oracle.kind in ("parameter", "output")
    if "judge" in cfg.oracle:
        assert isinstance(oracle.judge, OutputJudge)


def test_every_judge_config_is_in_the_conformance_registry():
    from tests.test_oracle_conformance import BACKENDS

    judges = sorted(p.stem for p in (Path(CONFIG_DIR) / "oracle" / "judge").glob("*.yaml"))
    assert judges == sorted(BACKENDS)


# ---------------------------------------------------------------------- real judges end to end
def test_llm_judge_over_http_teaches_through_compo(tmp_path, monkeypatch):
    """GenerativeOracle and SampleScoredOracle with OpenAIJudge against compo-judge-server."""
    from oracles.judge_server import JudgeServer, RuleBackend
    from oracles.openai_judge import OpenAIJudge

    monkeypatch.setenv("COMPO_TEST_KEY", "sk-local")
    server = JudgeServer(RuleBackend()).start()
    try:
        for name, make, settings in (
            ("generative", _generative(), dict(radius="auto", num_directions=8)),
            ("sample_scored", _sample_scored(), dict(num_directions=64)),
        ):

            def with_http_judge(_judge, make=make, name=name):
                judge = OpenAIJudge(
                    model="rule",
                    base_url=server.url,
                    api_key_env="COMPO_TEST_KEY",
                    cache_path=str(tmp_path / f"{name}.sqlite"),
                    backoff_base=0.01,
                )
                return make(judge)

            _, _, summary, oracle, _ = _train(
                tmp_path / name, with_http_judge, max_iterations=3, epochs=1, **settings
            )
            usage = oracle.usage()
            assert usage["judge.requests"] > 0, name  # the server was asked
            assert summary["n_applied"] > 0 and summary["n_decisive"] > 0, (name, summary)
    finally:
        server.shutdown()
        server.server_close()


def test_human_on_the_web_page_teaches_through_compo(tmp_path):
    """A scripted labeller answers every comparison over HTTP; the run applies steps."""
    import threading
    import urllib.request

    from oracles.human import HumanJudge

    # wait_seconds: a labeller that stopped (a refused request) fails the test instead of hanging.
    judge = HumanJudge(
        mode="web",
        queue_path=str(tmp_path / "labels.sqlite"),
        poll_seconds=0.02,
        wait_seconds=120,
    )
    judge.check()
    base = judge.server.url.split("/?")[0]
    token = judge.server.url.split("token=")[1]
    with pytest.raises(urllib.error.HTTPError, match="403"):
        urllib.request.urlopen(f"{base}/api/pending")  # no token, no page
    done = threading.Event()
    labelled = []

    def labeller():
        while not done.is_set():
            with urllib.request.urlopen(f"{base}/api/pending?token={token}") as reply:
                pending = json.loads(reply.read())
            for item in pending:  # prefers the shorter response, like the tests' scorer
                answer = "1" if len(item["first"]) <= len(item["second"]) else "2"
                body = json.dumps({"id": item["id"], "answer": answer}).encode()
                request = urllib.request.Request(
                    f"{base}/api/label?token={token}", body, {"Content-Type": "application/json"}
                )
                urllib.request.urlopen(request).close()
                labelled.append(item["id"])
            done.wait(0.02)

    thread = threading.Thread(target=labeller, daemon=True)
    thread.start()
    try:
        _, _, summary, oracle, _ = _train(
            tmp_path, lambda _: GenerativeOracle(judge, max_new_tokens=MAX_NEW),
            radius="auto", num_directions=8, max_iterations=3, epochs=1,
        )  # fmt: skip
    finally:
        done.set()
        thread.join(5)
        judge.close()
    usage = oracle.usage()
    assert (
        labelled and usage["judge.asked"] >= len(set(labelled)) and usage["judge.abstentions"] == 0
    )
    assert summary["n_applied"] > 0 and summary["n_decisive"] > 0


def test_oracle_trace_survives_the_optimizers_trace_truncation(tmp_path):
    # bind() opens trace/oracle.jsonl before ComPO truncates the traces for a fresh start; a
    # writer holding the replaced file's handle used to write every row into a deleted file.
    _, _, _, oracle, run_dir = _train(
        tmp_path, _generative(), radius=4.0, num_directions=4, max_iterations=2, epochs=1
    )
    lines = (run_dir.path / "trace" / "oracle.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == oracle.usage()["queries"] == 8
    assert sorted({r["iteration"] for r in rows}) == [0, 1]


def test_judged_pairs_describes_the_same_after_judging(tmp_path):
    # ComPO records describe() after prepare() judged the pairs: the judge's time used to be in
    # it, so a judged_pairs run was refused on every resume ("written with judge_seconds=...").
    _, tokenizer = TinyModel(seed=0).load()
    pairs = [PreferencePair("a", "Name a color.", "Red.", "A long answer about colors.")]
    encoded, _ = encode_pairs(pairs, tokenizer, 256, 128)
    fresh, judged = (JudgedPairsOracle(ScorerJudge(shorter)) for _ in range(2))
    for oracle in (fresh, judged):
        oracle.bind(tokenizer, RunDir(tmp_path))
        oracle.check()
    judged.prepare(list(encoded))
    assert judged.describe() == fresh.describe()
