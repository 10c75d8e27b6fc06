"""The command line as a user meets it: errors that name the record, and outputs on disk."""

import json

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
