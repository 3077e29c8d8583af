"""The held-out split (data.eval_path / data.eval_fraction) and its evaluation (eval.heldout.*)."""

from __future__ import annotations

import json
import logging

import pytest
from conftest import mixed_pair_rows, run_compo

from compo.data import DataSpec
from compo.errors import CompoError, DataError
from compo.heldout import prompt_key, split_by_prompt
from compo.settings import SettingError
from compo.types import PreferencePair

# The tiny model splits the mixed pairs into clear and near-identical ones at delta 10 (conftest).
PIPELINE = ["splitter=likelihood_margin", "splitter.delta=10", "dpo.lr=1e-3"]
PIPELINE += ["optimizer=compo_tiny", "optimizer.max_iterations=2", "oracle=likelihood"]


@pytest.fixture
def mixed_pairs(write_jsonl):
    """12 pairs over 6 prompts, two pairs per prompt."""
    return write_jsonl(mixed_pair_rows())


def _pairs(n_prompts: int, per_prompt: int) -> list[PreferencePair]:
    return [
        PreferencePair(f"q{q}-{k}", f"Question {q}?", f"Answer {k}.", f"Wrong {k}.")
        for q in range(n_prompts)
        for k in range(per_prompt)
    ]


def _ids(path) -> set[str]:
    return {json.loads(line)["id"] for line in path.read_text().splitlines()}


def test_fraction_holds_out_whole_prompts_drawn_from_the_seed():
    pairs = _pairs(10, 3)
    train, held = split_by_prompt(pairs, 0.25, seed=0)
    # ceil(0.25 * 10) = 3 prompts, each with all 3 of its pairs; no prompt on both sides.
    assert len({prompt_key(p) for p in held}) == 3 and len(held) == 9 and len(train) == 21
    assert not {prompt_key(p) for p in held} & {prompt_key(p) for p in train}
    assert [p.id for p in train + held] != [p.id for p in pairs]  # not simply the last prompts
    assert sorted(p.id for p in train + held) == sorted(p.id for p in pairs)
    assert [p.id for p in train] == [p.id for p in pairs if p in train]  # file order kept
    # Same seed, same split (a local generator: global RNG state plays no part); another seed
    # draws other prompts.
    import torch

    torch.manual_seed(123)
    assert split_by_prompt(pairs, 0.25, seed=0) == (train, held)
    draws = {tuple(p.id for p in split_by_prompt(pairs, 0.25, seed=s)[1]) for s in range(5)}
    assert len(draws) > 1


def test_chat_prompts_group_by_their_messages():
    turns = [{"role": "user", "content": "Hi"}]
    pairs = [
        PreferencePair("a", turns, "Hello.", "Go away."),
        PreferencePair("b", [dict(m) for m in turns], "Hi there.", "No."),
        PreferencePair("c", "Hi", "Hello.", "Go away."),  # the same words as a plain prompt
    ]
    train, held = split_by_prompt(pairs, 0.5, seed=0)
    groups = [{p.id for p in side} for side in (train, held)]
    assert sorted(groups, key=len) == [{"c"}, {"a", "b"}]


def test_a_fraction_that_leaves_nothing_to_train_on_is_one_line():
    with pytest.raises(DataError, match=r"holding out 2 of 2 distinct prompts leaves none"):
        split_by_prompt(_pairs(2, 4), 0.9, seed=0)


FRACTION = "data.eval_fraction must be a finite number in (0, 1)"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"eval_fraction": 0}, f"{FRACTION} or null, got 0"),
        ({"eval_fraction": 1}, f"{FRACTION} or null, got 1"),
        ({"eval_fraction": float("nan")}, f"{FRACTION} or null, got nan"),
        ({"eval_fraction": "0.2"}, f"{FRACTION} or null, got '0.2'"),
        ({"eval_path": ""}, "data.eval_path is empty"),
        ({"eval_path": 3}, "data.eval_path must be a string or null, got 3"),
        ({"seed": -1}, "data.seed must be an integer in [0, "),
        (
            {"eval_path": "held.jsonl", "eval_fraction": 0.2},
            "data.eval_path and data.eval_fraction are both set; choose one",
        ),
    ],
)
def test_bad_heldout_settings_are_refused_where_built(settings, message):
    with pytest.raises(SettingError) as err:
        DataSpec(**settings)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_an_eval_file_is_read_and_checked_like_the_training_file(write_jsonl):
    train = write_jsonl(mixed_pair_rows(), "train.jsonl")
    tree = {"prompt": "Name a tree.", "chosen": "Oak.", "rejected": "Blue."}
    held = write_jsonl([tree], "h.jsonl")
    loaded = DataSpec(path=str(train), eval_path=str(held)).load()
    assert len(loaded.pairs) == 12 and [p.id for p in loaded.heldout] == ["h-1"]
    bad = write_jsonl([{"prompt": "q", "chosen": "a"}, tree], "bad.jsonl")
    with pytest.raises(DataError, match=rf"{bad}: row 1: field 'rejected': is missing"):
        DataSpec(path=str(train), eval_path=str(bad)).load()
    with pytest.raises(DataError, match="no such file"):
        DataSpec(path=str(train), eval_path=str(bad.with_name("none.jsonl"))).load()
    mixed = write_jsonl([{"prompt": "q", "chosen": "a"}, tree], "m.jsonl")
    loaded = DataSpec(path=str(train), eval_path=str(mixed), on_error="skip").load()
    assert len(loaded.heldout) == 1 and [r.source for r in loaded.rejected] == [str(mixed)]


def test_heldout_pairs_never_reach_the_stages_and_are_measured_before_and_after(
    tmp_path, mixed_pairs
):
    metrics = run_compo(tmp_path, f"data.path={mixed_pairs}", "data.eval_fraction=0.3", *PIPELINE)
    held = _ids(tmp_path / "split" / "heldout.jsonl")
    clean, ambiguous = (_ids(tmp_path / "split" / f"{s}.jsonl") for s in ("clean", "ambiguous"))
    # ceil(0.3 * 6) = 2 prompts, 2 pairs each; the splitter saw the other 8 pairs only.
    assert len(held) == 4 and metrics["data.heldout.n_prompts"] == 2
    assert (
        metrics["data.n_pairs"] == 8
        and clean | ambiguous == {r["id"] for r in mixed_pair_rows()} - held
    )
    assert metrics["compo.n_iterations"] > 0 and metrics["dpo.steps_run"] > 0
    compo_rows = (tmp_path / "trace" / "compo.jsonl").read_text().splitlines()
    assert not {i for row in compo_rows for i in json.loads(row)["pair_ids"]} & held
    before, after = "eval.heldout.before.", "eval.heldout.after."
    assert metrics[before + "n_pairs"] == metrics[after + "n_pairs"] == 4
    # Displacement compares against the starting scores: those were taken before training.
    moved = metrics["eval.displacement.heldout.delta_logp_chosen"]
    drift = metrics[after + "logp_chosen_mean"] - metrics[before + "logp_chosen_mean"]
    assert moved != 0 and moved == pytest.approx(drift, rel=1e-4)
    assert 0 <= metrics["eval.displacement.heldout.frac_both_down"] <= 1
    # The headline keys are the final model's; the objective (auto) is the held-out accuracy.
    assert metrics["eval.heldout.accuracy"] == metrics[after + "accuracy"]
    assert metrics["eval.heldout.margin_mean"] == metrics[after + "margin_mean"]
    assert metrics["run.objective"] == "eval.heldout.accuracy"
    assert metrics["run.objective_value"] == metrics["eval.heldout.accuracy"]
    assert metrics == json.loads((tmp_path / "metrics.json").read_text())


def test_an_unchanged_model_reports_its_heldout_accuracy_and_no_stale_split(tmp_path, mixed_pairs):
    args = [f"data.path={mixed_pairs}", "dpo=none", "optimizer=none"]
    first = run_compo(tmp_path, *args, "data.eval_fraction=0.5")
    assert not first["run.model_changed"] and "eval.heldout.after.accuracy" not in first
    assert first["eval.heldout.accuracy"] == first["eval.heldout.before.accuracy"]
    assert first["run.objective_value"] == first["eval.heldout.accuracy"]
    assert (tmp_path / "split" / "heldout.jsonl").is_file()
    again = run_compo(tmp_path, *args)  # no held-out set now: no held-out file may stay behind
    assert not (tmp_path / "split" / "heldout.jsonl").exists()
    assert not any(k.startswith(("data.heldout", "eval.heldout")) for k in again)
    assert again["run.objective"] is None and "run.objective_value" not in again


def test_an_eval_file_sharing_prompts_with_the_training_data_is_warned_about(
    tmp_path, mixed_pairs, write_jsonl, caplog
):
    rows = [*mixed_pair_rows()[:3], {"prompt": "Name a tree.", "chosen": "Oak.", "rejected": "7"}]
    held = write_jsonl(rows, "held.jsonl")
    args = [f"data.path={mixed_pairs}", f"data.eval_path={held}", "dpo=none", "optimizer=none"]
    with caplog.at_level(logging.WARNING, logger="compo"):
        metrics = run_compo(tmp_path, *args)
    assert metrics["data.heldout.n_pairs"] == 4 and metrics["data.n_pairs"] == 12
    assert metrics["data.heldout.n_prompts_shared"] == 2  # two questions of the training file
    assert any("2 of 3 held-out prompts also occur" in r.message for r in caplog.records)


def test_rejected_rows_are_counted_per_file(tmp_path, write_jsonl):
    bad = {"prompt": "q", "chosen": "a"}
    train = write_jsonl([*mixed_pair_rows(), bad, {**bad, "prompt": "q2"}], "train.jsonl")
    held = write_jsonl(
        [{"prompt": "Name a tree.", "chosen": "Oak.", "rejected": "7"}, bad], "h.jsonl"
    )
    args = [f"data.path={train}", f"data.eval_path={held}", "data.on_error=skip"]
    metrics = run_compo(tmp_path, *args, "dpo=none", "optimizer=none")
    assert metrics["data.n_rows_rejected"] == 2 and metrics["data.heldout.n_rows_rejected"] == 1
    assert len((tmp_path / "rejected_rows.jsonl").read_text().splitlines()) == 3


def test_resume_state_is_not_reused_across_another_heldout_split(
    tmp_path, mixed_pairs, write_jsonl
):
    args = [f"data.path={mixed_pairs}", "splitter=none", "dpo.lr=1e-3", "optimizer=none"]
    run_compo(tmp_path, *args, "data.eval_fraction=0.2")
    assert (tmp_path / "dpo_state" / "progress.json").is_file()
    with pytest.raises(CompoError, match="dpo_state: written by another setup: the training data"):
        run_compo(tmp_path, *args, "data.eval_fraction=0.5")  # other pairs to train on
    again = run_compo(tmp_path, *args, "data.eval_fraction=0.2")  # the same split: resumed
    assert again["dpo.steps_run"] == 0
    # Another held-out file leaves the training pairs as they were: the state is theirs.
    tree = {"prompt": "Name a tree.", "chosen": "Oak.", "rejected": "Seven."}
    for name in ("a", "b"):
        held = write_jsonl([{**tree, "chosen": f"Oak {name}."}], f"{name}.jsonl")
        other = run_compo(tmp_path / "f", *args, f"data.eval_path={held}")
    assert other["dpo.steps_run"] == 0 and other["dpo.resumed_from_step"] > 0
    # ComPO alone: its fingerprint covers its pairs the same way.
    compo = [f"data.path={mixed_pairs}", "dpo=none", *PIPELINE[:2], *PIPELINE[3:]]
    run_compo(tmp_path / "z", *compo, "data.eval_fraction=0.2")
    with pytest.raises(CompoError, match="compo_state: written by another setup"):
        run_compo(tmp_path / "z", *compo, "data.eval_fraction=0.5")


def test_compo_on_its_own_pairs_file_warns_when_it_holds_heldout_prompts(
    tmp_path, mixed_pairs, caplog
):
    """optimizer.pairs_path bypasses the split: training on held-out prompts is said, not silent."""
    args = [f"data.path={mixed_pairs}", "data.eval_fraction=0.3", *PIPELINE]
    with caplog.at_level(logging.WARNING, logger="compo"):
        metrics = run_compo(tmp_path, *args, f"optimizer.pairs_path={mixed_pairs}")
    assert metrics["data.heldout.n_prompts"] == 2
    assert metrics["compo.n_prompts_heldout_shared"] == 2
    assert any(
        "2 of 2 held-out prompts also occur in optimizer.pairs_path" in r.message
        for r in caplog.records
    )
    clean = run_compo(tmp_path / "b", *args)  # the split's own ambiguous pairs: nothing to say
    assert "compo.n_prompts_heldout_shared" not in clean
