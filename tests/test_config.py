"""The doors into the CLI: --config files, methods that live outside slimtune, --version and env."""

import json
import textwrap

import pytest
from typer.testing import CliRunner

from slimtune import __version__
from slimtune.cli import app

runner = CliRunner(env={"COLUMNS": "2000"})  # error panels on one line, so messages read whole

ROWS = [{"instruction": f"Say {w}", "input": "", "output": w * (i + 1)} for i, w in enumerate("abcdefgh")]


@pytest.fixture
def pool(tmp_path):
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def flat(result) -> str:
    return " ".join(result.output.split())


def kept_outputs(folder):
    return [json.loads(line)["output"] for line in (folder / "subset.jsonl").read_text().splitlines()]


def test_a_config_file_gives_the_options_and_flags_on_the_command_line_override_it(tmp_path, pool):
    config = tmp_path / "run.yaml"
    config.write_text(f"method: length\nbudget: 3\ndata: {pool}\nout: {tmp_path / 'sel'}\n"
                      "skip-bad: true\nparam:\n  unit: chars\n")
    result = runner.invoke(app, ["select", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert kept_outputs(tmp_path / "sel") == ["hhhhhhhh", "ggggggg", "ffffff"]
    result = runner.invoke(app, ["select", "--budget", "1", "--out", str(tmp_path / "one"), "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert kept_outputs(tmp_path / "one") == ["hhhhhhhh"]


@pytest.mark.parametrize(("text", "named"), [
    ("method: length\nbudgett: 3\n", "unknown key 'budgett' for `"),
    ("method: length\nseed: many\n", "key 'seed': Input should be a valid integer"),
    ("- method\n- length\n", "expected a mapping of option names to values, found a list"),
])
def test_a_bad_config_file_stops_naming_the_file_and_the_key(tmp_path, text, named):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    result = runner.invoke(app, ["select", "--config", str(config)])
    assert result.exit_code == 2
    assert str(config) in result.output and named in flat(result)


def test_a_nested_mapping_of_params_sets_keys_of_a_nested_settings_field(tmp_path, pool, monkeypatch):
    """``param: {training: {lora: {r: 4}}}`` sets LESS's warm-up LoRA rank and keeps the rest of its settings;
    a misspelt nested key stops the command naming it in dotted form."""
    import numpy as np

    from slimtune.select.less import LessSelector

    monkeypatch.setattr(LessSelector, "score", lambda self, pool, **kw: np.zeros(len(pool)))  # no model run
    config = tmp_path / "run.yaml"
    config.write_text(f"method: less\nmodel: tiny\nbudget: 2\ndata: {pool}\ntarget: {pool}\n"
                      f"out: {tmp_path / 'sel'}\nparam:\n  training: {{epochs: 1, lora: {{r: 4}}}}\n")
    result = runner.invoke(app, ["select", "--config", str(config)])
    assert result.exit_code == 0, result.output
    training = json.loads((tmp_path / "sel" / "manifest.json").read_text())["params"]["training"]
    assert (training["epochs"], training["learning_rate"], training["lora"]["r"], training["lora"]["alpha"]) == \
        (1, 2e-5, 4, 512)
    config.write_text(config.read_text().replace("{r: 4}", "{rr: 4}"))
    result = runner.invoke(app, ["select", "--config", str(config)])
    assert result.exit_code == 2 and "has no parameter training.lora.rr" in flat(result)


def test_train_and_eval_read_config_files_too(tmp_path, pool):
    config = tmp_path / "train.yaml"
    config.write_text(f"data: {pool}\nout: {tmp_path / 'run'}\nmodel: tiny\ntraining-arg:\n  warmup_ratios: 0.1\n")
    result = runner.invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 2 and "'warmup_ratios' is not a TrainingArguments field" in flat(result)
    config = tmp_path / "eval.yaml"
    config.write_text("task: loss\nlimits: 4\n")
    result = runner.invoke(app, ["eval", "--config", str(config)])
    assert result.exit_code == 2 and "unknown key 'limits'" in flat(result)
    assert "known: batch-size, data, data-subset, device," in flat(result) and " limit," in flat(result)


def test_train_hands_the_trainer_the_users_loggers_and_arguments_from_a_config_file(tmp_path, pool):
    config = tmp_path / "train.yaml"
    config.write_text(f"data: {pool}\nout: {tmp_path / 'run'}\nmodel: tiny\nmax_length: 96\nbatch-size: 4\n"
                      "max-steps: 5\nreport-to: tensorboard\ntraining-arg:\n  logging_steps: 1\n  max_grad_norm: 0.5\n")
    result = runner.invoke(app, ["train", "--config", str(config), "--max-steps", "1"])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "run" / "slimtune_train.json").read_text())
    assert saved["global_steps"] == 1  # the flag, not the file's 5
    assert saved["training_args"] == {"report_to": ["tensorboard"], "logging_steps": 1, "max_grad_norm": 0.5}
    assert list((tmp_path / "run").rglob("events.out.tfevents.*"))


def test_the_trainer_flags_become_training_arguments_and_win_over_training_arg():
    from slimtune.cli import _training_args

    assert _training_args(["report_to=mlflow", "logging_steps=2"], report_to="tensorboard, wandb",
                          deepspeed="ds_zero2.json", fsdp="full_shard auto_wrap") == {
        "report_to": ["tensorboard", "wandb"], "logging_steps": 2.0, "deepspeed": "ds_zero2.json",
        "fsdp": "full_shard auto_wrap"}
    assert _training_args(None, report_to=None, deepspeed=None, fsdp=None) == {}


def test_training_args_on_the_command_line_are_checked_by_name_and_type(tmp_path, pool):
    common = ["train", "--data", str(pool), "--model", "tiny", "--out", str(tmp_path / "run")]
    result = runner.invoke(app, [*common, "--training-arg", "max_grad_norms=1"])
    assert result.exit_code == 2 and "'max_grad_norms' is not a TrainingArguments field" in flat(result)
    result = runner.invoke(app, [*common, "--training-arg", "max_grad_norm=high"])
    assert result.exit_code == 2 and "invalid float value: 'high'" in flat(result)


PLUGINS = '''
    from dataclasses import dataclass

    import numpy as np
    import torch

    from slimtune.online.base import Policy
    from slimtune.select.base import Selector


    @dataclass
    class FirstRows(Selector):
        """Keeps the pool's first rows."""

        name = "first-rows"

        def score(self, pool, *, target=None, existing=None, cost):
            return -np.arange(len(pool), dtype=float)


    @dataclass
    class FirstCandidates(Policy):
        """Backpropagates the first K candidates of every batch."""

        name = "first-candidates"

        def needs(self):
            return set()

        def choose(self, batch, k):
            return torch.arange(k)


    class NotAMethod:
        pass
'''


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    (tmp_path / "my_methods.py").write_text(textwrap.dedent(PLUGINS))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_methods"


def test_select_runs_a_selector_that_lives_outside_slimtune(tmp_path, pool, plugins):
    result = runner.invoke(app, ["select", "--method", f"{plugins}:FirstRows", "--budget", "2", "--data", str(pool),
                                 "--out", str(tmp_path / "sel")])
    assert result.exit_code == 0, result.output
    assert kept_outputs(tmp_path / "sel") == ["a", "bb"]
    assert json.loads((tmp_path / "sel" / "manifest.json").read_text())["method"] == "first-rows"


@pytest.mark.parametrize(("spec", "named"), [
    ("my_methods:NotAMethod", "is not a dataclass subclass of slimtune.select.base.Selector"),
    ("my_methods:FirstCandidates", "is not a dataclass subclass of slimtune.select.base.Selector"),
    ("my_methods:Missing", "cannot load 'Missing' from module 'my_methods'"),
    ("no_such_module:X", "cannot load 'X' from module 'no_such_module'"),
])
def test_a_method_that_is_not_a_selector_is_refused(tmp_path, pool, plugins, spec, named):
    result = runner.invoke(app, ["select", "--method", spec, "--budget", "2", "--data", str(pool),
                                 "--out", str(tmp_path / "sel")])
    assert result.exit_code == 2 and named in flat(result)


def test_train_online_runs_a_policy_that_lives_outside_slimtune(tmp_path, pool, plugins):
    from slimtune.online.trainer import read_selection_log

    result = runner.invoke(app, ["train", "--data", str(pool), "--model", "tiny", "--max-length", "96",
                                 "--batch-size", "4", "--max-steps", "1", "--online", f"{plugins}:FirstCandidates",
                                 "--keep", "2", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    [record] = read_selection_log(tmp_path / "run")
    assert record["chosen"] == record["index"][:2]  # the first two candidates, in the loader's order
    result = runner.invoke(app, ["train", "--data", str(pool), "--model", "tiny", "--online",
                                 f"{plugins}:FirstRows", "--out", str(tmp_path / "bad")])
    assert result.exit_code == 2 and "is not a dataclass subclass of slimtune.online.base.Policy" in flat(result)


def test_version_and_env_say_what_is_installed():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"slimtune {__version__}"
    result = runner.invoke(app, ["env"])
    assert result.exit_code == 0, result.output
    import torch

    for label in ("slimtune", "python", "transformers", "peft", "accelerate", "datasets", "trl", "devices",
                  "threads", "slimtune cache", "hub cache", "datasets cache"):
        assert label in result.output
    assert torch.__version__ in result.output and __version__ in result.output
