"""Click logs -> pairs: Joachims' rule, position-bias weights, aggregation, confidence, errors."""

from __future__ import annotations

import csv
import json

import pytest

from compo.beta_posterior import beta_confidence, regularized_beta
from compo.clicks import clicks_to_pairs, clicks_to_unpaired, examination_propensities
from compo.clicks_cli import main
from compo.data import load_pairs
from compo.errors import DataError
from compo.impressions import Impression, impression_preferences


def imp(clicks, n=4, prompt="Q?", dwell=None, **extra):
    return {
        "prompt": prompt,
        "responses": [f"r{i}" for i in range(n)],
        "clicks": clicks,
        **({"dwell": dwell} if dwell is not None else {}),
        **extra,
    }


def rows(*records):
    return list(enumerate(records, start=1))


def test_joachims_clicked_over_skipped_above():
    shown = Impression("Q", ["a", "b", "c", "d"], clicks=[2])
    assert impression_preferences(shown) == [(2, 0, 2), (2, 1, 2)]
    # A clicked response above another click is not a loser; the top click yields nothing.
    shown = Impression("Q", ["a", "b", "c", "d"], clicks=[0, 3])
    assert impression_preferences(shown) == [(3, 1, 3), (3, 2, 3)]
    assert impression_preferences(Impression("Q", ["a", "b"], clicks=[0])) == []
    # skip_next: also the first unclicked response below.
    shown = Impression("Q", ["a", "b", "c", "d"], clicks=[1])
    assert impression_preferences(shown, "skip_next") == [(1, 0, 1), (1, 2, 1)]


def test_short_dwell_counts_as_no_click():
    shown = Impression("Q", ["a", "b", "c"], clicks=[0, 2], dwell=[1.0, 30.0])
    assert impression_preferences(shown, min_dwell=5.0) == [(2, 0, 2), (2, 1, 2)]
    assert impression_preferences(shown) == [(2, 1, 2)]


def test_propensities_and_ipw_weights():
    assert examination_propensities(3, eta=1.0) == pytest.approx([1.0, 0.5, 1 / 3])
    assert examination_propensities(3, eta=2.0) == pytest.approx([1.0, 0.25, 1 / 9])
    assert examination_propensities(3, eta=0.0) == [1.0, 1.0, 1.0]
    # Click at position 1 (weight 1/p_1 = 2) and at position 2 on other responses (1/p_2 = 3,
    # two preferences): raw weights 2, 3, 3 -> mean 8/3 -> normalised 0.75, 1.125, 1.125.
    result = clicks_to_pairs(
        rows(imp([1], n=2, prompt="A"), imp([2], n=3, prompt="B")), correction="ipw"
    )
    by_prompt = {}
    for p in result.rows:
        by_prompt.setdefault(p["prompt"], []).append(p["weighted_wins"])
    assert by_prompt["A"] == [pytest.approx(0.75)]
    assert by_prompt["B"] == [pytest.approx(1.125), pytest.approx(1.125)]
    explicit = clicks_to_pairs(
        rows(imp([1], n=2, prompt="A"), imp([2], n=3, prompt="B")),
        correction="ipw",
        propensities=[1.0, 0.5, 1 / 3],
    )
    assert explicit.rows == result.rows


def test_duplicates_aggregate_across_impressions_with_beta_confidence():
    records = rows(
        imp([1], n=2),  # r1 > r0
        imp([1], n=2),
        imp([1], n=2),
        {"prompt": "Q?", "responses": ["r1", "r0"], "clicks": [1]},  # r0 > r1, shown swapped
        imp([], n=2),
    )
    result = clicks_to_pairs(records, source="log.jsonl")
    assert len(result.rows) == 1
    pair = result.rows[0]
    assert (pair["chosen"], pair["rejected"]) == ("r1", "r0")
    assert pair["n_impressions"] == 4
    assert (pair["n_wins"], pair["n_losses"]) == (3, 1)
    # P(theta > 1/2) for Beta(4, 2) = 1 - I_{1/2}(4, 2) = 13/16.
    assert pair["confidence"] == pytest.approx(13 / 16)
    assert result.stats["n_without_preference"] == 1
    assert result.stats["n_impressions"] == 5
    assert beta_confidence(1, 0) == pytest.approx(0.75)
    assert beta_confidence(3, 0) == pytest.approx(0.9375)
    assert beta_confidence(2.5, 2.5) == pytest.approx(0.5)


def test_ties_are_counted_not_written():
    records = rows(imp([1], n=2), {"prompt": "Q?", "responses": ["r1", "r0"], "clicks": [1]})
    result = clicks_to_pairs(records)
    assert result.rows == [] and result.stats["n_ties"] == 1


def _by_text(result):
    return {r["completion"]: r for r in result.rows}


def test_unpaired_clicked_is_desirable_examined_and_skipped_undesirable():
    result = clicks_to_unpaired(rows(imp([2]), imp([0], prompt="Top?"), imp([])))
    ex = {r["completion"]: r for r in result.rows if r["prompt"] == "Q?"}
    # r2 clicked; r0 and r1 shown above it and skipped; r3 below: never known to be examined
    assert {(r["prompt"], r["completion"], r["label"]) for r in result.rows} == {
        ("Q?", "r2", True), ("Q?", "r0", False), ("Q?", "r1", False), ("Top?", "r0", True),
    }  # fmt: skip
    assert all(r["confidence"] == pytest.approx(0.75) for r in result.rows)  # one observation
    assert (ex["r2"]["n_clicks"], ex["r2"]["n_skips"]) == (1, 0)
    assert (ex["r0"]["n_clicks"], ex["r0"]["n_skips"]) == (0, 1)
    stats = result.stats
    assert (stats["n_examples"], stats["n_desirable"], stats["n_undesirable"]) == (4, 2, 2)
    assert stats["n_without_evidence"] == 1 and stats["n_observations"] == 4
    # skip_next also marks the first unclicked response below a click
    below = _by_text(clicks_to_unpaired(rows(imp([1])), rule="skip_next"))
    assert below["r2"]["label"] is False and "r3" not in below


def test_unpaired_evidence_pools_across_impressions_with_the_pairs_confidence():
    records = rows(imp([1], n=2), imp([1], n=2), imp([1], n=2), imp([2], n=3), imp([1], n=2))
    # r1: clicked 4 times, skipped once (above the click on r2); r0: skipped 5 times
    ex = _by_text(clicks_to_unpaired(records))
    assert (ex["r1"]["label"], ex["r1"]["n_clicks"], ex["r1"]["n_skips"]) == (True, 4, 1)
    assert ex["r1"]["confidence"] == pytest.approx(beta_confidence(4, 1))
    assert ex["r1"]["n_impressions"] == 5
    assert (ex["r0"]["label"], ex["r0"]["confidence"]) == (
        False,
        pytest.approx(beta_confidence(5, 0)),
    )
    tied = clicks_to_unpaired(rows(imp([1], n=2), imp([2], n=3)))
    assert "r1" not in _by_text(tied) and tied.stats["n_ties"] == 1  # one click, one skip


def test_unpaired_ipw_weights_and_dwell_follow_the_paired_rules():
    # A click at position 1 weighs 1/p_1 = 2 and so does the skip of r0 it reveals; the click
    # at 0 weighs 1: raw 2, 2, 1 -> mean 5/3 -> 1.2, 1.2, 0.6.
    result = clicks_to_unpaired(rows(imp([1], n=2), imp([0], n=2, prompt="B")), correction="ipw")
    weights = {(r["prompt"], r["completion"]): r for r in result.rows}
    assert weights["Q?", "r1"]["weighted_clicks"] == pytest.approx(1.2)
    assert weights["Q?", "r0"]["weighted_skips"] == pytest.approx(1.2)
    assert weights["B", "r0"]["weighted_clicks"] == pytest.approx(0.6)
    short = _by_text(clicks_to_unpaired(rows(imp([0, 2], n=3, dwell=[1.0, 30.0])), min_dwell=5.0))
    assert short["r0"]["label"] is False and short["r2"]["label"] is True  # a short click: a skip


def test_cli_unpaired_rows_load_and_train_with_kto(write_jsonl, tmp_path):
    from conftest import run_compo

    log = [imp([2], prompt=f"Question {i}?") for i in range(3)] + [imp([0, 3], prompt="Other?")]
    path = write_jsonl(log, name="clicks.jsonl")
    out = tmp_path / "thumbs.jsonl"
    assert main([str(path), "--out", str(out), "--unpaired"]) == 0
    loaded = load_pairs(out, unpaired=True)
    assert loaded.unpaired and not loaded.rejected
    assert {e.label for e in loaded.pairs} == {True, False}
    assert loaded.pairs[0].metadata["n_clicks"] == 1 and 0.5 < loaded.pairs[0].confidence < 1
    metrics = run_compo(
        tmp_path / "run", f"data.path={out}", "dpo=kto", "splitter=none", "optimizer=none",
        "dpo.weight_by_confidence=true", "dpo.lr=1e-3", "dpo.scope=all", "dpo.epochs=2",
    )  # fmt: skip
    n = len(loaded.pairs)
    assert metrics["dpo.n_desirable"] + metrics["dpo.n_undesirable"] == n
    assert metrics["dpo.loss_last"] < metrics["dpo.loss_first"]


def test_regularized_beta_matches_scipy():
    special = pytest.importorskip("scipy.special")
    for a, b, x in [(1, 1, 0.5), (4.5, 2.25, 0.5), (120.0, 80.0, 0.5), (0.7, 3.0, 0.2)]:
        assert regularized_beta(a, b, x) == pytest.approx(special.betainc(a, b, x), abs=1e-10)


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"responses": ["a", "b"], "clicks": [0]}, "prompt"),
        ({"prompt": "Q", "responses": ["a"], "clicks": [0]}, "responses"),
        ({"prompt": "Q", "responses": ["a", "a"], "clicks": [0]}, "responses"),
        ({"prompt": "Q", "responses": ["a", "b"], "clicks": [2]}, "clicks"),
        ({"prompt": "Q", "responses": ["a", "b"]}, "clicks"),
        ({"prompt": "Q", "responses": ["a", "b"], "clicks": [1], "dwell": [1, 2]}, "dwell"),
    ],
)
def test_malformed_row_names_file_row_field(write_jsonl, record, field):
    path = write_jsonl([imp([1]), record])
    with pytest.raises(DataError) as err:
        clicks_to_pairs(load_records(path), source=str(path))
    message = str(err.value)
    assert "\n" not in message
    assert f"{path}: row 2: field '{field}'" in message


def load_records(path):
    from compo.readers import iter_records

    return iter_records(path)


def test_cli_raise_exits_2_with_one_line(write_jsonl, tmp_path, capsys):
    path = write_jsonl([imp([1]), "{not json"])
    assert main([str(path), "--out", str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("compo-clicks: error: ") and "row 2" in err and "\n" not in err
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("convert", [clicks_to_pairs, clicks_to_unpaired])
def test_an_impression_id_seen_twice_is_a_bad_row_not_double_evidence(convert):
    # A log that holds one impression twice used to count its clicks twice (confidence 0.9375
    # for one click instead of 0.75).
    log = rows(imp([1], id="imp-1"), imp([2], id="imp-2"), imp([1], id="imp-1"), imp([1]), imp([1]))
    with pytest.raises(DataError, match=r"row 3: field 'id': repeats the id of row 1"):
        convert(log)
    result = convert(log, on_error="skip")
    assert [(r.row, r.field) for r in result.rejected] == [(3, "id")]
    assert result.stats["n_impressions"] == 4  # rows without an id are never compared


def test_cli_skip_writes_rejected_and_loadable_pairs(write_jsonl, tmp_path):
    # Not the fixture's default name pairs.jsonl: that is --out, which would overwrite the input.
    path = write_jsonl([imp([2]), imp([5]), imp([1], prompt="Other?")], name="clicks.jsonl")
    out = tmp_path / "pairs.jsonl"
    assert main([str(path), "--out", str(out), "--on-error", "skip", "--correction", "ipw"]) == 0
    rejected = [json.loads(line) for line in out.with_suffix(".rejected.jsonl").open()]
    assert [(r["row"], r["field"]) for r in rejected] == [(2, "clicks")]
    loaded = load_pairs(out)
    assert len(loaded.pairs) == 3
    assert all(0.5 < p.confidence < 1 for p in loaded.pairs)
    assert loaded.pairs[0].metadata["n_impressions"] == 1


def test_cli_no_valid_row_names_the_first_and_writes_the_rejected_rows(
    write_jsonl, tmp_path, capsys
):
    path = write_jsonl([imp([9]), "{not json"], name="clicks.jsonl")
    out = tmp_path / "pairs.jsonl"
    code, err = _cli([path, "--out", out, "--on-error", "skip"], capsys)
    assert code == 2 and "\n" not in err, err
    assert "the first rejected: row 1: field 'clicks'" in err and "pairs.rejected.jsonl" in err, err
    rejected = [json.loads(line) for line in out.with_suffix(".rejected.jsonl").open()]
    assert [r["row"] for r in rejected] == [1, 2]
    assert not out.exists()


def _cli(argv, capsys) -> tuple[int, str]:
    """Runs compo-clicks in-process: (exit status, stderr); argparse errors exit via SystemExit."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--prior", "nan"),  # was written as "confidence": null, which compo reads as 1.0
        ("--prior", "inf"),
        ("--prior", "-inf"),
        ("--prior", "0"),  # was a ValueError traceback
        ("--prior", "-1"),
        ("--prior", "1e308"),  # was an OverflowError traceback
        ("--prior", "abc"),
        ("--eta", "nan"),
        ("--eta", "inf"),
        ("--eta", "-1"),  # was accepted: propensities above 1
        ("--min-dwell", "nan"),  # was accepted: every click silently dropped
        ("--min-dwell", "inf"),
        ("--min-dwell", "-1"),
        ("--propensities", "1,nan"),
        ("--propensities", "1,inf"),
        ("--propensities", "1,0"),
        ("--propensities", "1,-0.5"),
        ("--propensities", "1,1.5"),
        ("--propensities", "1,,0.5"),
        ("--propensities", ""),  # was silently ignored
    ],
)
def test_cli_rejects_numbers_outside_their_domain_at_parse_time(
    write_jsonl, tmp_path, capsys, flag, value
):
    path = write_jsonl([imp([2], n=3)], name="clicks.jsonl")
    out = tmp_path / "out.jsonl"
    argv = [path, "--out", out, "--correction", "ipw", f"{flag}={value}"]  # = lets "-inf" through
    code, err = _cli(argv, capsys)
    assert code == 2, err
    # argparse's own format: the usage, then one line naming flag, value and valid range.
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("compo-clicks: error: ") and flag in last and repr(value) in last, err
    assert not out.exists()


def test_cli_accepts_the_edges_of_each_domain(write_jsonl, tmp_path, capsys):
    path = write_jsonl([imp([2], n=3, dwell=[0.0])], name="clicks.jsonl")
    edges = [["--eta", "0"], ["--min-dwell", "0"], ["--prior", "1e-6"], ["--prior", "1e6"]]
    for extra in [*edges, ["--propensities", "1,0.5,1e-3"]]:
        argv = [path, "--out", tmp_path / "o.jsonl", "--correction", "ipw", *extra]
        code, err = _cli(argv, capsys)
        assert code == 0, (extra, err)


@pytest.mark.parametrize(
    "extra",
    [
        ["--eta", "1000"],  # p_2 = 3 ** -1000 underflows to 0: was a ZeroDivisionError traceback
        ["--propensities", "1,1,1e-320"],  # 1 / p_2 overflows: was "confidence": null
        # Two weights of 1e308 sum to inf: every weight became 0, every pair a tie.
        ["--propensities", "1,1,1e-308"],
    ],
)
def test_cli_position_weights_out_of_float_range_end_in_one_line(
    write_jsonl, tmp_path, capsys, extra
):
    path = write_jsonl([imp([2], n=3)], name="clicks.jsonl")
    out = tmp_path / "out.jsonl"
    code, err = _cli([path, "--out", out, "--correction", "ipw", *extra], capsys)
    assert code == 2, err
    assert err.startswith("compo-clicks: error: ") and "\n" not in err, err
    assert extra[0] in err
    assert not out.exists()


def test_cli_refuses_to_overwrite_its_input(write_jsonl, tmp_path, capsys, monkeypatch):
    path = write_jsonl([imp([2], n=3)], name="log.jsonl")
    original = path.read_bytes()
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.jsonl").symlink_to(path)
    monkeypatch.chdir(tmp_path)
    for out in (path, "log.jsonl", "sub/../log.jsonl", "./log.jsonl", "link.jsonl"):
        code, err = _cli([path, "--out", out], capsys)
        assert code == 2, (out, err)
        assert "--out" in err and "input" in err and "\n" not in err, err
        assert path.read_bytes() == original, out
    assert (tmp_path / "link.jsonl").is_symlink()


def test_cli_refuses_a_rejected_file_that_would_overwrite_input_or_out(
    write_jsonl, tmp_path, capsys
):
    # The default rejected file of --out x.jsonl is x.rejected.jsonl: here, the input itself.
    path = write_jsonl([imp([2], n=3), imp([7])], name="log.rejected.jsonl")
    original = path.read_bytes()
    out = tmp_path / "log.jsonl"
    code, err = _cli([path, "--out", out, "--on-error", "skip"], capsys)
    assert code == 2 and "rejected" in err and "input" in err and "\n" not in err, err
    assert path.read_bytes() == original and not out.exists()
    code, err = _cli([path, "--out", out, "--on-error", "skip", "--rejected", out], capsys)
    assert code == 2 and "--rejected" in err and "--out" in err, err
    assert path.read_bytes() == original and not out.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--eta", "2"], "--eta only applies with --correction ipw"),
        (["--propensities", "1,0.5"], "--propensities only applies with --correction ipw"),
        (["--correction", "none", "--eta", "1"], "--eta only applies with --correction ipw"),
        (
            ["--correction", "ipw", "--eta", "2", "--propensities", "1,0.5,0.3,0.2"],
            "--eta and --propensities are both given",
        ),
        (["--out", "o/z.csv"], "--out: o/z.csv: compo-clicks writes JSON Lines; name it *.jsonl"),
        (
            ["--on-error", "skip", "--rejected", "bad.csv"],
            "--rejected: bad.csv: compo-clicks writes JSON Lines; name it *.jsonl",
        ),
    ],
)
def test_cli_refuses_flags_that_would_do_nothing_or_mislabel_a_file(
    write_jsonl, tmp_path, capsys, monkeypatch, extra, message
):
    # Before: --eta/--propensities without ipw were ignored (propensities still checked against
    # the rows), and --out z.csv held JSON Lines.
    monkeypatch.chdir(tmp_path)
    path = write_jsonl([imp([2])], name="clicks.jsonl")
    code, err = _cli([path, "--out", "pairs.jsonl", *extra], capsys)
    assert code == 2 and "\n" not in err, err
    assert err.startswith("compo-clicks: error: ") and message in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["clicks.jsonl"]


def _leftovers(directory):
    return sorted(p.name for p in directory.rglob(".*"))  # atomic writes' temporary files


@pytest.mark.parametrize("where", ["directory", "under_a_file", "rejected_under_a_file"])
def test_cli_unwritable_out_ends_in_one_line(write_jsonl, tmp_path, capsys, where):
    path = write_jsonl([imp([2], n=3), imp([7])], name="clicks.jsonl")
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("not a directory\n")
    argv = [path, "--on-error", "skip", "--out"]
    if where == "directory":
        argv += [tmp_path / "adir"]
    elif where == "under_a_file":
        argv += [tmp_path / "afile" / "pairs.jsonl"]
    else:
        argv += [tmp_path / "pairs.jsonl", "--rejected", tmp_path / "afile" / "bad.jsonl"]
    code, err = _cli(argv, capsys)
    assert code == 2, err
    assert err.startswith("compo-clicks: error: ") and "\n" not in err, err
    flag = "--rejected" if where.startswith("rejected") else "--out"
    assert flag in err
    # Nothing written: not the pairs without their rejected rows, no temporary file.
    assert not (tmp_path / "pairs.jsonl").exists()
    assert list((tmp_path / "adir").iterdir()) == [] and _leftovers(tmp_path) == []


def test_cli_write_failure_ends_in_one_line(write_jsonl, tmp_path, capsys, monkeypatch):
    import errno

    import compo.clicks_cli

    def full_disk(path, rows):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(compo.clicks_cli, "write_jsonl", full_disk)
    path = write_jsonl([imp([2], n=3)], name="clicks.jsonl")
    code, err = _cli([path, "--out", tmp_path / "pairs.jsonl"], capsys)
    assert code == 2, err
    assert err.startswith("compo-clicks: error: ") and "\n" not in err, err
    assert "No space left" in err and "pairs.jsonl" in err


def test_console_script_prints_one_line_for_a_bad_number(write_jsonl, tmp_path):
    import subprocess
    import sys

    path = write_jsonl([imp([2], n=3)], name="clicks.jsonl")
    proc = subprocess.run(
        [sys.executable, "-m", "compo.clicks_cli", str(path), "--out", str(tmp_path / "o.jsonl"),
         "--prior", "nan"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("compo-clicks: error: ") and "--prior" in lines[0]
    )
    assert not (tmp_path / "o.jsonl").exists()


def _csv_log(tmp_path, text, name="clicks.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_an_empty_optional_csv_cell_means_absent(tmp_path, capsys):
    # A CSV row cannot leave out a column: an empty dwell cell was "field 'dwell': expected a
    # list (CSV: a JSON list in the cell)", and two empty id cells "repeats the id of row 2".
    path = _csv_log(
        tmp_path,
        "id,prompt,responses,clicks,dwell\n"
        'b1,Q1,"[""x"",""y""]","[1]","[7]"\n'
        ',Q2,"[""x"",""y""]","[]",\n'
        ',Q3,"[""x"",""y""]","[1]", \n',
    )
    out = tmp_path / "pairs.jsonl"
    code, err = _cli([path, "--out", out, "--min-dwell", "1"], capsys)
    assert code == 0, err
    assert [r["prompt"] for r in map(json.loads, out.open())] == ["Q1", "Q3"]
    # An empty required cell is a missing field, with the advice how to write it.
    bad = _csv_log(tmp_path, 'prompt,responses,clicks\nQ1,"[""x"",""y""]",\n', "bad.csv")
    # One row, its clicks cell empty: said of the file, with the reason's advice.
    with pytest.raises(DataError, match=r"'clicks' is empty in every row \(use \[\]"):
        clicks_to_pairs(load_records(bad), source=str(bad))


def test_cli_refuses_min_dwell_on_a_log_without_dwell(write_jsonl, tmp_path, capsys):
    # Before: exit 0 with the same pairs as without the flag.
    path = write_jsonl([imp([2]), imp([1])], name="clicks.jsonl")
    out = tmp_path / "pairs.jsonl"
    code, err = _cli([path, "--out", out, "--min-dwell", "5"], capsys)
    assert code == 2 and "\n" not in err, err
    assert err == (
        f"compo-clicks: error: --min-dwell: no row of {path} has a 'dwell' field, so it would "
        "change nothing (drop the flag, or log dwell seconds per click)"
    ), err
    assert not out.exists()
    # One row with dwell is enough: the flag applies to it.
    path = write_jsonl([imp([2], dwell=[9.0]), imp([1])], name="clicks.jsonl")
    assert _cli([path, "--out", out, "--min-dwell", "5"], capsys)[0] == 0


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_column_no_row_has_is_said_of_the_file_not_of_row_1(tmp_path, capsys, fmt):
    # Before: "row 1: field 'clicks': is missing ... (--on-error skip sets such rows aside)",
    # although skipping would set every row aside.
    rows = [imp([1], id="a"), imp([2], id="b")]
    for row in rows:
        del row["clicks"]
    path = tmp_path / f"nocol.{fmt}"
    if fmt == "csv":
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({**r, "responses": json.dumps(r["responses"])} for r in rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, err = _cli([path, "--out", tmp_path / "n.jsonl"], capsys)
    assert code == 2, err
    assert err == (
        f"compo-clicks: error: {path}: no row has a 'clicks' field "
        "(row 1 has: id, prompt, responses)"
    ), err
