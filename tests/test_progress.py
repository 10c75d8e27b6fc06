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
