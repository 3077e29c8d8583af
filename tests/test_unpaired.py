"""Unpaired examples (prompt, completion, label): loading, KTO on them, and the stages that refuse
them (KTO's data, TRL's unpaired preference format)."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from compo.data import load_pairs
from compo.dpo import DPOTrainer, MismatchedKL
from compo.encoding import EncodedExample, encode_examples, encode_rows, labels_of
from compo.errors import CompoError, DataError
from compo.losses import KTO
from compo.rundir import RunDir
from compo.scoring import SequenceScores, score_pairs
from compo.state import digest_pairs
from compo.types import UnpairedExample

GOOD = {"prompt": "Name a color.", "completion": "Blue.", "label": True}
# Three desirable answers and one undesirable, on four prompts.
ROWS = [
    GOOD,
    {"prompt": "What is 2 + 2?", "completion": "2 + 2 = 4.", "label": True},
    {"prompt": "Say hello in French.", "completion": "Bonjour!", "label": True},
    {"prompt": "Capital of Italy?", "completion": "I do not like questions.", "label": False},
]


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def test_unpaired_rows_load_in_each_form(write_jsonl):
    turns = [{"role": "user", "content": "Capital of France?"}]
    rows = [
        {**GOOD, "id": 7, "confidence": 0.25, "source": "thumbs"},
        {"prompt": "Name a fruit.", "completion": "A chair.", "label": False},
        # TRL's conversational form
        {"prompt": turns, "completion": [{"role": "assistant", "content": "Paris."}], "label": 1},
        # a whole conversation, no prompt field: the turns before the reply are the prompt
        {"completion": [*turns, {"role": "assistant", "content": "Lyon."}], "label": "FALSE"},
        {"prompt": "Say hi.", "completion": "Hi!", "label": "true"},
        {"prompt": "Say hi.", "completion": "Go away.", "label": 0},
    ]
    result = load_pairs(write_jsonl(rows), unpaired=True)
    assert result.unpaired and not result.rejected
    examples = result.pairs
    assert all(isinstance(e, UnpairedExample) for e in examples)
    assert [e.label for e in examples] == [True, False, True, False, True, False]
    first = examples[0]
    assert (first.id, first.confidence, first.metadata) == ("7", 0.25, {"source": "thumbs"})
    assert examples[1].id == "pairs-2" and examples[1].confidence == 1.0
    assert examples[2].prompt == turns and examples[2].completion == "Paris."
    assert examples[3].prompt == turns and examples[3].completion == "Lyon."


def test_unpaired_csv_labels_are_text(tmp_path):
    path = tmp_path / "thumbs.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "completion", "label", "confidence"])
        writer.writerow(["Name a color.", "Blue.", "True", "0.8"])
        writer.writerow(["Name a color.", "Seven.", "false", ""])
        writer.writerow(["Name a color.", "Red.", "1", ""])
        writer.writerow(["Name a color.", "Nine.", " 0 ", ""])
        writer.writerow(["Name a color.", "Green.", "1.0", ""])  # pandas, a column with NaN
        writer.writerow(["Name a color.", "Ten.", "0.0", ""])
    examples = load_pairs(path, unpaired=True).pairs
    assert [e.label for e in examples] == [True, False, True, False, True, False]
    assert [e.confidence for e in examples[:2]] == [0.8, 1.0]


def test_an_unpaired_csv_without_a_label_column_is_said_of_the_file(tmp_path):
    # Before: "row 1: field 'label': is missing (true: desirable, false: undesirable) ..."
    # with the advice data.on_error=skip, which would set every row aside.
    path = tmp_path / "thumbs.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "completion"])
        writer.writerow(["Name a color.", "Blue."])
        writer.writerow(["Name a color.", "Seven."])
    with pytest.raises(DataError) as err:
        load_pairs(path, unpaired=True)
    assert str(err.value) == f"{path}: no row has a 'label' field (row 1 has: completion, prompt)"


def test_json_labels_may_be_floats_one_and_zero(write_jsonl):
    # What pandas writes for a label column that has a missing value.
    rows = [{**GOOD, "id": "a", "label": 1.0}, {**GOOD, "id": "b", "label": 0.0}]
    assert [e.label for e in load_pairs(write_jsonl(rows), unpaired=True).pairs] == [True, False]


BAD_ROWS = [
    ({"prompt": "q", "completion": "a"}, "label", "is missing"),
    ({**GOOD, "label": "yes"}, "label", "expected true or false, got 'yes'"),
    ({**GOOD, "label": 2}, "label", "expected true or false, got 2"),
    ({**GOOD, "label": 0.5}, "label", "expected true or false"),
    ({**GOOD, "label": 2.0}, "label", "expected true or false, got 2.0"),
    ({**GOOD, "label": "2"}, "label", "expected true or false, got '2'"),
    ({**GOOD, "label": "0.5"}, "label", "expected true or false, got '0.5'"),
    ({**GOOD, "label": "01"}, "label", "expected true or false, got '01'"),
    ({"prompt": "q", "label": True}, "completion", "is missing"),
    ({**GOOD, "completion": "  "}, "completion", "is empty"),
    ({**GOOD, "completion": 42}, "completion", "expected a string or chat messages, got int"),
    (
        {**GOOD, "completion": [{"role": "user", "content": "hi"}]},
        "completion",
        "the last message must be the assistant's reply",
    ),
    ({"completion": "a", "label": False}, "prompt", "is missing"),
    (
        {
            **GOOD,
            "prompt": "Name a fruit.",
            "completion": [
                {"role": "user", "content": "Name a color."},
                {"role": "assistant", "content": "Blue."},
            ],
        },
        "prompt",
        "differs from the prompt turns of 'completion'",
    ),
    ({**GOOD, "prompt": ""}, "prompt", "is empty"),
    ({**GOOD, "confidence": 1.5}, "confidence", "must be in [0, 1], got 1.5"),
    ({**GOOD, "id": "x"}, "id", "duplicate id 'x'"),
]


@pytest.mark.parametrize(("row", "field", "reason"), BAD_ROWS)
def test_a_bad_unpaired_row_is_one_line_naming_file_row_and_field(write_jsonl, row, field, reason):
    path = write_jsonl([{**GOOD, "id": "x"}, row])
    with pytest.raises(DataError) as err:
        load_pairs(path, unpaired=True)
    message = str(err.value)
    assert message.startswith(f"{path}: row 2: field '{field}': {reason}")
    assert "\n" not in message
    # on_error=skip sets it aside with its reason, nothing else is lost
    result = load_pairs(path, on_error="skip", unpaired=True)
    assert len(result.pairs) == 1
    assert [(r.row, r.field) for r in result.rejected] == [(2, field)]


def test_a_file_holds_one_kind(write_jsonl):
    pair = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path = write_jsonl([GOOD, pair])
    with pytest.raises(DataError, match=r"row 2: is a preference pair, but row 1 is an unpaired"):
        load_pairs(path, unpaired=True)
    result = load_pairs(write_jsonl([pair, GOOD, pair]), on_error="skip", unpaired=True)
    assert not result.unpaired and len(result.pairs) == 2
    assert "is an unpaired row (prompt, completion, label), but row 1 is a preference pair" in (
        result.rejected[0].reason
    )


def test_unpaired_rows_are_refused_where_pairs_are_needed(write_jsonl):
    with pytest.raises(DataError, match=r"holds unpaired rows .* preference pairs .* are needed"):
        load_pairs(write_jsonl(ROWS))


def test_encoding_counts_truncated_completions(tiny):
    _, tokenizer = tiny
    examples = [UnpairedExample("a", "Hi", "x" * 80, True), UnpairedExample("b", "Hi", "ok", False)]
    encoded, report = encode_rows(examples, tokenizer, max_length=80, max_prompt_length=40)
    assert all(isinstance(e, EncodedExample) for e in encoded)
    assert labels_of(encoded) == [True, False]
    assert report.as_metrics() == {"n_prompt_truncated": 0, "n_completion_truncated": 1}
    assert len(encoded[0].prompt_ids) + len(encoded[0].completion_ids) == 80


def test_the_resume_digest_sees_labels():
    a = [EncodedExample("a", [1, 2], [3], True)]
    b = [EncodedExample("a", [1, 2], [3], False)]
    assert digest_pairs(a) != digest_pairs(b)


# --------------------------------------------------------------------------------------------
# KTO on unpaired examples
# --------------------------------------------------------------------------------------------


def _completions(sums):
    sums = torch.tensor(sums, dtype=torch.float64)
    return SequenceScores(sums, sums / 2, torch.full_like(sums, 2))


def test_kto_unpaired_loss_matches_the_formula_and_z_is_detached():
    loss_fn = KTO(beta=0.5, desirable_weight=2.0, undesirable_weight=0.5)
    policy = _completions([-4.0, -6.0, -1.0])
    reference = torch.tensor([-5.0, -5.0, -3.0], dtype=torch.float64)
    labels = torch.tensor([True, False, False])
    z = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    loss, rewards = loss_fn.unpaired(policy, reference, labels, kl=z)
    want = [
        2.0 * (1 - _sig(0.5 * (1.0 - 0.2))),  # desirable, log-ratio +1
        0.5 * (1 - _sig(0.5 * (0.2 + 1.0))),  # undesirable, log-ratio -1
        0.5 * (1 - _sig(0.5 * (0.2 - 2.0))),  # undesirable, log-ratio +2
    ]
    assert loss.tolist() == pytest.approx(want)
    assert rewards.tolist() == pytest.approx([0.5, -0.5, 1.0])
    assert not loss.requires_grad  # the reference point is an estimate, not a gradient path


def test_kto_unpaired_rpo_alpha_adds_the_nll_of_desirable_examples_only():
    policy = _completions([-4.0, -6.0])
    labels = torch.tensor([True, False])
    reference = torch.zeros(2, dtype=torch.float64)
    plain, _ = KTO().unpaired(policy, reference, labels)
    with_nll, _ = KTO(rpo_alpha=0.5).unpaired(policy, reference, labels)
    assert (with_nll - plain).tolist() == pytest.approx([0.5 * 2.0, 0.0])  # mean NLL -(-4/2)


def test_balance_warning_follows_the_papers_range():
    assert KTO().balance_warning(10, 10) is None
    assert KTO(desirable_weight=1.2).balance_warning(10, 10) is None
    advice = KTO().balance_warning(3, 9)
    assert "outside the paper's [1, 4/3]" in advice and "desirable_weight in [3.00, 4.00]" in advice
    assert KTO(desirable_weight=3.5).balance_warning(3, 9) is None
    assert "no undesirable examples" in KTO().balance_warning(5, 0)


def test_mismatched_kl_pairs_each_prompt_with_another_prompts_completion(tiny, write_jsonl):
    model, tokenizer = tiny
    rows = [
        {"prompt": "Name a color.", "completion": c, "label": label}
        for c, label in (("Blue.", True), ("Seven.", False))
    ] + [{"prompt": "Say hi.", "completion": "Hi!", "label": True}]
    examples = load_pairs(write_jsonl(rows), unpaired=True).pairs
    encoded, _ = encode_examples(examples, tokenizer, 256, 128)
    kl = MismatchedKL(model, encoded, tokenizer.pad_token_id, 8, None)
    # 0 and 1 share a prompt: both take example 2's completion; 2 takes example 0's
    assert [m.completion_ids for m in kl.pairs] == [encoded[i].completion_ids for i in (2, 2, 0)]
    assert [m.prompt_ids for m in kl.pairs] == [e.prompt_ids for e in encoded]
    assert kl.kl([0, 1, 2]).item() == pytest.approx(0.0, abs=1e-4)  # the policy is the reference


def test_first_step_kto_loss_on_unpaired_rows_matches_a_hand_computation(
    tiny, write_jsonl, tmp_path
):
    """Reference log-probs set apart from the policy's by known offsets: the first step's loss is
    the formula on those offsets (the KL estimate starts at 0), confidence-weighted."""
    model, tokenizer = tiny
    rows = [{**r, "confidence": c} for r, c in zip(ROWS, (1.0, 0.5, 1.0, 0.8), strict=True)]
    examples = load_pairs(write_jsonl(rows), unpaired=True).pairs
    encoded, _ = encode_examples(examples, tokenizer, 256, 128)
    pad = tokenizer.pad_token_id
    (policy,) = score_pairs(model, encoded, pad)
    offsets = torch.tensor([1.0, -2.0, 0.5, 3.0])  # log pi - log pi_ref at the first step
    reference = SequenceScores(policy.sum_logps - offsets, policy.mean_logps, policy.n_tokens)
    trainer = DPOTrainer(
        loss=KTO(beta=0.5, desirable_weight=1.5, undesirable_weight=0.7),
        weight_by_confidence=True, lr=1e-3, batch_size=4, scope="all", max_grad_norm=None,
    )  # fmt: skip
    metrics = trainer.train(
        model, encoded, pad, RunDir(tmp_path), confidences=[1.0, 0.5, 1.0, 0.8],
        reference=(reference,),
    )  # fmt: skip
    terms = [
        1.0 * 1.5 * (1 - _sig(0.5 * 1.0)),
        0.5 * 1.5 * (1 - _sig(0.5 * -2.0)),
        1.0 * 1.5 * (1 - _sig(0.5 * 0.5)),
        0.8 * 0.7 * (1 - _sig(0.5 * (0.0 - 3.0))),
    ]
    assert metrics["loss_first"] == pytest.approx(sum(terms) / 4, abs=1e-5)
    assert (metrics["n_desirable"], metrics["n_undesirable"]) == (3, 1)
    assert "desirable_weight" in metrics["warning"]  # 3:1 with w_d > w_u is outside [1, 4/3]
    trace = json.loads((tmp_path / "trace" / "dpo.jsonl").read_text().splitlines()[0])
    assert trace["reward_desirable"] == pytest.approx(0.5 * (1.0 - 2.0 + 0.5) / 3, abs=1e-5)
    assert trace["reward_undesirable"] == pytest.approx(0.5 * 3.0, abs=1e-5)
    assert trace["accuracy"] == pytest.approx(2 / 4)  # +1 and +0.5 desirable: right side
    assert trace["kl"] == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("options", [{"loss": "dpo"}, {"loss": "kto", "sft_epochs": 1}])
def test_the_trainer_refuses_unpaired_examples_it_cannot_train_on(tiny, tmp_path, options):
    model, tokenizer = tiny
    encoded = [EncodedExample("a", [1, 2], [3, 4], True), EncodedExample("b", [5], [6], False)]
    with pytest.raises(CompoError, match=r"unpaired examples need another setting: dpo"):
        DPOTrainer(**options).train(model, encoded, tokenizer.pad_token_id, RunDir(tmp_path))


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------


def test_kto_on_an_unpaired_file_runs_end_to_end(tmp_path, write_jsonl, capsys):
    from conftest import run_compo

    data = write_jsonl(ROWS)
    metrics = run_compo(
        tmp_path, f"data.path={data}", "dpo=kto", "splitter=none", "optimizer=none",
        "dpo.loss.desirable_weight=2.0", "dpo.lr=1e-3", "dpo.epochs=4", "dpo.scope=all",
    )  # fmt: skip
    # At the first step policy = reference and z = 0: each example pays w/2; (3 x 2 + 1) / 2 / 4.
    assert metrics["dpo.loss_first"] == pytest.approx(0.875, abs=1e-4)
    assert metrics["dpo.loss_last"] < metrics["dpo.loss_first"]
    assert (metrics["dpo.n_desirable"], metrics["dpo.n_undesirable"]) == (3, 1)
    assert metrics["data.n_examples"] == 4 and "data.n_pairs" not in metrics  # no pairs here
    assert metrics["eval.before.n_desirable"] == 3 and "eval.before.accuracy" not in metrics
    assert metrics["eval.displacement.clean.delta_logp_desirable"] > 0
    assert metrics["eval.displacement.clean.delta_logp_undesirable"] < 0
    assert (tmp_path / "checkpoint").is_dir()
    # eval ran: the picture of pairs is missing because there are no pairs, and says so
    assert metrics["plots.skipped.logp"] == "unpaired examples: the picture needs pairs"
    table = capsys.readouterr().out  # the summary table shows what eval measured
    for key in ("delta_logp_desirable", "delta_logp_undesirable", "frac_desirable_down"):
        assert f"eval.displacement.clean.{key}" in table


def test_an_unpaired_run_resumes_and_refuses_state_of_other_labels(tmp_path, write_jsonl):
    from conftest import run_compo

    settings = ("dpo=kto", "splitter=none", "optimizer=none", "eval=none", "dpo.scope=all")
    data = write_jsonl(ROWS)
    first = run_compo(tmp_path, f"data.path={data}", *settings)
    again = run_compo(tmp_path, f"data.path={data}", *settings)
    assert first["dpo.steps_run"] == 1 and again["dpo.steps_run"] == 0  # dpo_state/ is complete
    assert again["dpo.loss_first"] == first["dpo.loss_first"]
    flipped = write_jsonl([{**r, "label": not r["label"]} for r in ROWS], name="flipped.jsonl")
    with pytest.raises(CompoError, match=r"dpo_state.* the training data .* differ"):
        run_compo(tmp_path, f"data.path={flipped}", *settings)


@pytest.mark.parametrize(
    ("overrides", "fix"),
    [
        ([], "splitter and optimizer cannot use .*; set splitter=none optimizer=none$"),
        (["splitter=none", "optimizer=none", "dpo=dpo"], "dpo cannot use .*; set dpo=kto$"),
        (["splitter=none", "optimizer=none", "dpo.sft_epochs=1"], "set dpo.sft_epochs=0$"),
        (["splitter=none", "optimizer=none", "dpo.loss.ld_alpha=0.5"], "dpo.loss.ld_alpha=null$"),
        (["splitter=confidence", "optimizer=none"], "which splitter cannot use"),
        (
            ["dpo=dpo"],
            "which splitter, dpo and optimizer .*; set splitter=none dpo=kto optimizer=none$",
        ),
    ],
)
def test_stages_that_need_pairs_refuse_an_unpaired_file(tmp_path, write_jsonl, overrides, fix):
    from conftest import run_compo

    data = write_jsonl(ROWS)
    with pytest.raises(CompoError, match=fix):
        run_compo(tmp_path, f"data.path={data}", "dpo=kto", *overrides)
    assert not (tmp_path / "checkpoint").exists() and not (tmp_path / "trace").exists()


def test_compo_reading_its_own_pairs_file_accepts_unpaired_main_data(tmp_path, write_jsonl):
    from conftest import EASY_PAIRS, run_compo

    data = write_jsonl(ROWS)
    pairs = write_jsonl([p.to_dict() for p in EASY_PAIRS], name="ambiguous.jsonl")
    metrics = run_compo(
        tmp_path, f"data.path={data}", "dpo=kto", "splitter=none", "eval=none",
        "optimizer=compo_tiny", "oracle=likelihood", f"optimizer.pairs_path={pairs}",
        "optimizer.max_iterations=1",
    )  # fmt: skip
    assert metrics["dpo.n_desirable"] == 3 and metrics["compo.n_iterations"] == 1
    # the optimizer's own file must hold pairs
    with pytest.raises(CompoError, match=r"holds unpaired rows"):
        run_compo(
            tmp_path / "again", f"data.path={data}", "dpo=kto", "splitter=none", "eval=none",
            "optimizer=compo_tiny", "oracle=likelihood", f"optimizer.pairs_path={data}",
        )  # fmt: skip


def test_the_refusal_is_one_line_and_exit_2(tmp_path, write_jsonl):
    data = write_jsonl(ROWS)
    proc = subprocess.run(
        [sys.executable, "-m", "compo", "model=tiny", f"hydra.run.dir={tmp_path / 'run'}",
         f"data.path={data}", "dpo=kto", "optimizer=none"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert errors == [
        f"compo: error: {data} holds unpaired rows (prompt, completion, label), which splitter "
        "cannot use as configured (they need preference pairs); set splitter=none"
    ]


@pytest.mark.parametrize("held", ["data.eval_fraction=0.2", "data.eval_path={data}"])
def test_a_held_out_split_of_unpaired_rows_is_one_line(tmp_path, write_jsonl, held):
    """Held-out evaluation scores preference pairs: an unpaired file cannot give them."""
    data = write_jsonl(ROWS)
    proc = subprocess.run(
        [sys.executable, "-m", "compo", "model=tiny", f"hydra.run.dir={tmp_path / 'run'}",
         f"data.path={data}", "dpo=kto", "splitter=none", "optimizer=none",
         held.format(data=data)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "held-out evaluation needs preference pairs" in errors[0]
    assert not (tmp_path / "run" / "checkpoint").exists()
