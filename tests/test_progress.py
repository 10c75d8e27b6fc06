"""The progress vocabulary: one summary line per stage with its rate, nothing when quiet or on other ranks,
compact Trainer log lines, and no loading noise."""

import pytest

from slimtune import progress


@pytest.fixture(autouse=True)
def normal_verbosity():
    before = progress.verbosity()
    progress.set_verbosity("normal")
    yield
    progress.set_verbosity(before)


def test_a_stage_ends_with_one_line_of_work_done_time_and_rate(capsys):
    seen = list(progress.track(range(5), "LESS extraction", unit="rows"))
    assert seen == [0, 1, 2, 3, 4]
    err = capsys.readouterr().err
    assert "LESS extraction: 5 rows in" in err and "rows/s" in err


def test_quiet_and_other_ranks_print_nothing(capsys, monkeypatch):
    progress.set_verbosity("quiet")
    assert list(progress.track(range(3), "scoring")) == [0, 1, 2]
    progress.note("cache hit")
    progress.set_verbosity("normal")
    monkeypatch.setenv("RANK", "1")
    with progress.stage("kernel blocks", total=2, unit="blocks") as stage:
        stage.advance(2)
    assert stage.done == 2
    assert capsys.readouterr().err == ""


def test_trainer_logs_become_one_compact_line():
    line = progress.compact_log_line({"loss": 1.23456, "learning_rate": 2e-4, "grad_norm": 0.8123, "epoch": 0.3,
                                      "total_flos": 1e12, "train_runtime": 12.5}, step=12, max_steps=40)
    assert line == "step 12/40  loss 1.235  lr 2.00e-04  grad 0.812  epoch 0.30  runtime 12.5"


def test_loading_noise_is_off_unless_verbose():
    import transformers

    progress.set_verbosity("normal")
    assert transformers.utils.logging.get_verbosity() == transformers.utils.logging.ERROR
    assert not transformers.utils.logging.is_progress_bar_enabled()
    with pytest.raises(ValueError, match="verbosity"):
        progress.set_verbosity("loud")


def _pool(tmp_path, n=16):
    import json

    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"instruction": f"What is {i} plus {i}?", "output": str(2 * i)}) + "\n"
                            for i in range(n)))
    return pool


def test_the_cli_shows_a_line_per_stage_and_compact_training_logs_and_quiet_shows_none(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from slimtune.cli import app

    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "cache"))
    pool, runner = _pool(tmp_path), CliRunner()
    shown = runner.invoke(app, ["select", "--method", "loss", "--model", "tiny", "--budget", "4", "--data", str(pool),
                                "--out", str(tmp_path / "sel"), "-p", "max_length=48"])
    assert shown.exit_code == 0, shown.output
    assert "response-losses (conditioned): 16 rows in" in shown.output
    trained = runner.invoke(app, ["train", "--data", str(pool), "--model", "tiny", "--max-steps", "2", "--batch-size",
                                  "4", "--max-length", "48", "--device", "cpu", "--training-arg", "logging_steps=1",
                                  "--out", str(tmp_path / "run")])
    assert trained.exit_code == 0, trained.output
    assert "step 1/2  loss" in trained.output and "{'loss'" not in trained.output
    assert "training tiny on 16 rows: 2 steps in" in trained.output
    quiet = runner.invoke(app, ["--quiet", "select", "--method", "loss", "--model", "tiny", "--budget", "4", "--data",
                                str(pool), "--out", str(tmp_path / "sel2"), "-p", "max_length=40"])
    assert quiet.exit_code == 0, quiet.output
    assert "rows in" not in quiet.output and "kept 4 of 16" in quiet.output
