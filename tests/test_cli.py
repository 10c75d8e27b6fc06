"""The command line as a user meets it: errors that name the record, and outputs on disk."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from slimtune.cli import app

runner = CliRunner()


def write_pool(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


ROWS = [{"instruction": f"Say {w}", "input": "", "output": w * (i + 1)} for i, w in enumerate("abcdefgh")]


def test_a_bad_line_stops_with_file_line_and_field_and_skip_bad_counts_it(tmp_path):
    pool = tmp_path / "pool.jsonl"
    write_pool(pool, [*ROWS[:2], {"instruction": "no output", "input": ""}, *ROWS[2:]])
    result = runner.invoke(app, ["select", "--method", "length", "--budget", "3", "--data", str(pool),
                                 "--out", str(tmp_path / "sel"), "--param", "unit=chars"])
    assert result.exit_code == 2
    assert f"{pool}:3: field 'output': missing" in " ".join(result.output.split())
    result = runner.invoke(app, ["select", "--method", "length", "--budget", "3", "--data", str(pool),
                                 "--out", str(tmp_path / "sel"), "--param", "unit=chars", "--skip-bad"])
    assert result.exit_code == 0, result.output
    assert "skipped 1 bad record" in result.output


def test_select_writes_the_kept_records_in_the_pools_format_and_a_manifest(tmp_path):
    pool = tmp_path / "pool.jsonl"
    write_pool(pool, ROWS)
    result = runner.invoke(app, ["select", "--method", "length", "--budget", "0.25", "--data", str(pool),
                                 "--out", str(tmp_path / "sel"), "-p", "unit=chars"])
    assert result.exit_code == 0, result.output
    subset = [json.loads(line) for line in (tmp_path / "sel" / "subset.jsonl").read_text().splitlines()]
    assert subset == [ROWS[7], ROWS[6]]  # the two longest responses, longest first
    manifest = json.loads((tmp_path / "sel" / "manifest.json").read_text())
    assert manifest["method"] == "length" and manifest["params"]["unit"] == "chars"
    assert len(manifest["examples"]) == 8 and sum(e["kept"] for e in manifest["examples"]) == 2


def test_unknown_method_parameters_are_refused_with_the_ones_it_takes(tmp_path):
    pool = tmp_path / "pool.jsonl"
    write_pool(pool, ROWS)
    result = runner.invoke(app, ["select", "--method", "random", "--budget", "2", "--data", str(pool),
                                 "--out", str(tmp_path / "sel"), "-p", "bogus=1"])
    assert result.exit_code != 0 and "has no parameter bogus" in " ".join(result.output.split())


def test_data_inspect_reports_shape_counts_and_problems(tmp_path):
    pool = tmp_path / "pool.jsonl"
    write_pool(pool, [*ROWS, {"instruction": "x", "input": "", "output": "  "}])
    result = runner.invoke(app, ["data", "inspect", str(pool), "--skip-bad"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "shape alpaca" in text and "9 records read, 8 usable, 1 bad" in text and ":9:" in text


def test_every_command_has_help_with_an_example():
    for command in (["data", "inspect"], ["select"], ["train"], ["eval"], ["bench"], ["demo"]):
        result = runner.invoke(app, [*command, "--help"])
        assert result.exit_code == 0 and "Example:" in result.output, command


def test_train_online_slap_per_epoch_trains_on_the_kept_share_and_per_step_only_policies_refuse(tmp_path):
    pool = tmp_path / "pool.jsonl"
    write_pool(pool, ROWS)
    common = ["train", "--data", str(pool), "--model", "tiny", "--max-length", "96", "--batch-size", "2",
              "--online"]
    result = runner.invoke(app, [*common, "slap", "--per-epoch", "--keep", "0.5", "-p", "strata=2",
                                 "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    log = [json.loads(line) for line in (tmp_path / "run" / "pruning_log.jsonl").read_text().splitlines()]
    assert [len(r["kept_ids"]) for r in log] == [4] and log[0]["pool"] == 8
    result = runner.invoke(app, [*common, "uds", "--per-epoch", "--out", str(tmp_path / "uds")])
    assert result.exit_code == 2 and "needs slap" in result.output


def test_a_reused_out_holds_only_the_latest_selection(tmp_path):
    csv_pool, jsonl_pool, out = tmp_path / "pool.csv", tmp_path / "pool.jsonl", tmp_path / "sel"
    csv_pool.write_text("instruction,input,output\n" + "".join(f"{r['instruction']},,{r['output']}\n" for r in ROWS))
    write_pool(jsonl_pool, ROWS)
    for pool in (csv_pool, jsonl_pool):
        result = runner.invoke(app, ["select", "--method", "random", "--budget", "2", "--data", str(pool),
                                     "--out", str(out)])
        assert result.exit_code == 0, result.output
    pictures = ["lengths.png", "report.html", "scores.png", "tasks.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json", "subset.jsonl", *pictures])


def test_rows_the_method_cannot_score_fail_the_command_unless_allowed(tmp_path, monkeypatch):
    from slimtune.select.heuristics import RandomSelector

    pool = tmp_path / "pool.jsonl"
    write_pool(pool, ROWS)
    monkeypatch.setattr(RandomSelector, "score", lambda self, pool, **kw: np.array([1.0] * 5 + [np.nan] * 3))
    args = ["select", "--method", "random", "--budget", "6", "--data", str(pool), "--out", str(tmp_path / "sel")]
    result = runner.invoke(app, args)
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "3 of 8 rows could not be scored and 1 of them would be among the 6 kept" \
        in text and f"{pool}:6" in text
    assert not (tmp_path / "sel" / "manifest.json").exists()
    result = runner.invoke(app, [*args, "--allow-unscored"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "sel" / "manifest.json").read_text())
    assert manifest["unscored"] == 3 and [e["id"] for e in manifest["examples"] if "unscored" in e] == \
        [e["id"] for e in manifest["examples"][5:]]


def test_loss_at_a_short_max_length_scores_every_row_of_a_real_pool(tmp_path, shared_data):
    """The issue's repro at test scale: GSM8K rows longer than max_length=48 used to score nothing."""
    pool = tmp_path / "gsm8k.jsonl"
    pool.write_text("".join((shared_data / "gsm8k" / "train.jsonl").read_text().splitlines(True)[:12]))
    result = runner.invoke(app, ["select", "--method", "loss", "--model", "tiny", "--budget", "4", "--data",
                                 str(pool), "--out", str(tmp_path / "sel"), "-p", "max_length=48"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "sel" / "manifest.json").read_text())
    assert manifest["unscored"] == 0 and all(e["score"] is not None for e in manifest["examples"])


@pytest.mark.parametrize("method", ["random", "length", "kcenter"])
def test_every_model_free_method_selects_through_the_cli(tmp_path, method):
    """The CLI hands every selector the same arguments (allow_unscored among them): each must take them."""
    pool, out = tmp_path / "pool.jsonl", tmp_path / "sel"
    write_pool(pool, ROWS)
    result = runner.invoke(app, ["select", "--method", method, "--budget", "3", "--data", str(pool), "--out",
                                 str(out)])
    assert result.exit_code == 0, result.output
    assert sum(r["kept"] for r in json.loads((out / "manifest.json").read_text())["examples"]) == 3
