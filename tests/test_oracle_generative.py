"""GenerativeOracle: judges become ComPO oracles; weights untouched; ties from identical outputs."""

from __future__ import annotations

import warnings

import pytest
import torch

from compo.encoding import encode_pairs
from compo.interfaces import CompoError, OracleError, Verdict
from compo.rundir import RunDir
from compo.zo.directions import DirectionBatch, GaussianSphere, LowRank
from compo.zo.scope import Scope
from oracles.generative import GenerativeOracle, judge_prompt
from oracles.sample_scored import SampleScoredOracle
from oracles.scorer import ScorerJudge
from tests.conftest import EASY_PAIRS


class CountingJudge(ScorerJudge):
    def __init__(self):
        super().__init__()
        self.seen = []

    def judge(self, prompt, current, perturbed):
        self.seen.append((prompt, current, perturbed))
        return super().judge(prompt, current, perturbed)


@pytest.fixture(autouse=True)
def one_thread():
    """Step-by-step decoding of a tiny model: one thread avoids oversubscribing shared CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def setup(tiny):
    model, tokenizer = tiny
    encoded, _ = encode_pairs(EASY_PAIRS, tokenizer, 256, 128)
    return model, tokenizer, encoded[:2], Scope(model)


def _oracle(tokenizer, judge=None, **kwargs):
    kwargs.setdefault("aggregation", "majority")  # pairwise: every comparison goes to judge()
    oracle = GenerativeOracle(judge or CountingJudge(), max_new_tokens=12, **kwargs)
    oracle.bind(tokenizer)
    return oracle


def test_is_a_parameter_oracle_and_needs_a_tokenizer(setup):
    model, _, pairs, scope = setup
    oracle = GenerativeOracle(ScorerJudge())
    with pytest.raises(OracleError, match="bind"):
        oracle.begin(model, scope, pairs, 0, iteration=0, head=None)


def test_current_response_matches_hf_generate(setup):
    model, tokenizer, pairs, scope = setup
    oracle = _oracle(tokenizer)
    oracle.begin(model, scope, pairs, tokenizer.pad_token_id, iteration=0, head=None)
    ids = torch.tensor([pairs[0].prompt_ids])
    ref = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
        do_sample=False, pad_token_id=tokenizer.pad_token_id,
    )[0, ids.shape[1]:].tolist()  # fmt: skip
    assert oracle.current[0] == ref
    assert oracle.prompts[0] == "Name three primary colors."


def test_cached_decoding_uses_the_installed_transformers_name_for_the_cache(setup):
    """No deprecated keyword: transformers 5.x renamed ``past_key_values`` to ``cache`` and will
    drop the old name (5.40), which would break every generating oracle at once."""
    model, tokenizer, pairs, scope = setup
    oracle = _oracle(tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        oracle.begin(model, scope, pairs, tokenizer.pad_token_id, iteration=0, head=None)
        oracle._responses(GaussianSphere().sample(0, 0, [0, 1], scope.shapes).scaled(20.0), 0)
        prompts = [pairs[0].prompt_ids, pairs[1].prompt_ids]
        oracle.decoder.sample(prompts, 2, torch.Generator().manual_seed(0), 1.0)


def test_zero_perturbation_ties_without_asking_the_judge(setup):
    model, tokenizer, pairs, scope = setup
    judge = CountingJudge()
    oracle = _oracle(tokenizer, judge)
    oracle.begin(model, scope, pairs, tokenizer.pad_token_id, iteration=0, head=None)
    dirs = GaussianSphere().sample(0, 0, [0, 1, 2], scope.shapes)
    assert oracle.compare(dirs.scaled(0.0)) == [Verdict.TIE] * 3
    assert judge.seen == []
    usage = oracle.usage()
    assert usage["identical_ties"] == 6 and usage["queries"] == 3 and usage["judge_calls"] == 0


def test_perturbed_responses_equal_generation_with_added_weights(setup):
    """The cached-prefill path equals generating from a model whose head holds W + delta."""
    model, tokenizer, pairs, scope = setup
    oracle = _oracle(tokenizer)
    oracle.begin(model, scope, pairs, tokenizer.pad_token_id, iteration=0, head=None)
    for sampler in (GaussianSphere(), LowRank(rank=2)):
        dirs = sampler.sample(0, 0, [0, 1], scope.shapes).scaled(20.0)
        fast = oracle._responses(dirs, 0)
        for i in range(2):
            head = model.lm_head.weight
            saved = head.detach().clone()
            with torch.no_grad():
                head.add_(dirs.dense(i)[0])
            ids = torch.tensor([pairs[0].prompt_ids])
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                do_sample=False, pad_token_id=tokenizer.pad_token_id,
            )[0, ids.shape[1]:].tolist()  # fmt: skip
            with torch.no_grad():
                head.copy_(saved)
            assert fast[i] == out[: len(fast[i])]


def test_weights_are_untouched_and_large_perturbations_are_judged(setup, tmp_path):
    model, tokenizer, pairs, scope = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    judge = CountingJudge()
    oracle = _oracle(tokenizer, judge)
    run = RunDir(tmp_path)
    oracle.bind(tokenizer, run)
    oracle.begin(model, scope, pairs, tokenizer.pad_token_id, iteration=0, head=None)
    verdicts = oracle.compare(
        GaussianSphere().sample(0, 0, [0, 1, 2, 3], scope.shapes).scaled(50.0)
    )
    assert len(verdicts) == 4 and set(verdicts) <= {-1.0, 0.0, 1.0}
    assert judge.seen and oracle.usage()["judge_calls"] == len(judge.seen)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    oracle._trace.close()
    assert len((tmp_path / "trace" / "oracle.jsonl").read_text().splitlines()) == 4
    usage = oracle.usage()
    assert usage["seconds_per_query"] > 0 and "judge.calls" in usage


def test_extra_modules_restore_weights_bit_exactly(setup):
    model, tokenizer, pairs, _ = setup
    scope = Scope(model, ["model.layers.1.mlp"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    oracle = _oracle(tokenizer)
    oracle.begin(model, scope, pairs, tokenizer.pad_token_id, iteration=0, head=None)
    verdicts = oracle.compare(GaussianSphere().sample(0, 0, [0, 1], scope.shapes).scaled(30.0))
    assert len(verdicts) == 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_sampling_uses_common_random_numbers(setup):
    model, tokenizer, pairs, scope = setup
    oracle = _oracle(tokenizer, do_sample=True, seed=3)
    oracle.begin(model, scope, pairs, tokenizer.pad_token_id, iteration=0, head=None)
    assert oracle.compare(DirectionBatch.from_tensors([torch.zeros_like(scope.head.master)])) == [
        Verdict.TIE
    ]
    assert oracle.usage()["identical_ties"] == 2


def test_runs_inside_compo(setup, tmp_path):
    from compo.zo import ComPO

    model, tokenizer, pairs, _ = setup
    oracle = _oracle(tokenizer)
    oracle.bind(tokenizer, RunDir(tmp_path))
    optimizer = ComPO(num_directions=8, radius=20.0, threshold=0.0, max_iterations=2,
                      perturbation_batch=4, progress=False)  # fmt: skip
    summary = optimizer.run(model, tokenizer, pairs, oracle, RunDir(tmp_path))
    assert summary["n_iterations"] == 2
    assert oracle.usage()["queries"] >= 16


def test_judge_prompt_strips_chatml():
    text = "<|im_start|>system\nBe nice<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert judge_prompt(text + "<|im_start|>assistant\n") == "Hi"
    assert judge_prompt("plain prompt ") == "plain prompt"


class NanScoring:
    """A scoring judge (not a ScorerJudge) whose scores are NaN, e.g. a reward model overflowing."""

    name = "nan-scoring"

    def score(self, prompts, texts):
        return [float("nan")] * len(texts)

    def judge(self, prompt, current, perturbed):
        raise AssertionError("a scoring judge is asked for scores")


def test_a_non_finite_score_is_an_error_naming_the_judge(setup):
    # Used to abstain on every comparison (a run to exit 0 with a warning blaming the radius);
    # now as sample_scored: an error naming the judge.
    model, tokenizer, pairs, scope = setup
    oracle = _oracle(tokenizer, NanScoring(), aggregation="sum")
    oracle.begin(model, scope, pairs, tokenizer.pad_token_id, iteration=0, head=None)
    with pytest.raises(OracleError, match=r"^judge NanScoring: non-finite score \[nan"):
        oracle.compare(GaussianSphere().sample(0, 0, [0, 1], scope.shapes).scaled(50.0))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: GenerativeOracle(CountingJudge(), query="bogus"),
            "oracle.query: 'bogus' is not one of ['current', 'antithetic']",
        ),
        (
            lambda: GenerativeOracle(CountingJudge(), aggregation="bogus"),
            "oracle.aggregation: 'bogus' is not one of ['auto', 'sum', 'any', 'majority', 'all']",
        ),
        (
            lambda: SampleScoredOracle(CountingJudge(), ranking="bogus"),
            "oracle.ranking: 'bogus' is not one of ['reference', 'round_robin']",
        ),
    ],
)
def test_a_choice_outside_its_options_is_one_line_in_the_settings_format(build, message):
    with pytest.raises(CompoError) as info:
        build()
    assert str(info.value) == message
