"""The lm-evaluation-harness bridge, offline: local task definitions over local files, the tiny model."""

import json

import pytest
from helpers import gsm8k_examples
from typer.testing import CliRunner

from slimtune.cli import app
from slimtune.evaluate import EvalReport
from slimtune.models import LoraSettings
from slimtune.train import TrainSettings, train

pytest.importorskip("lm_eval")

#: A rolling log-likelihood task: lm-eval's word perplexity of each text, so a model change shows in the number.
_PERPLEXITY_TASK = """\
task: my_texts
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
"""


@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory, shared_data):
    """A LoRA run of one optimizer step at a high learning rate: its adapter changes the tiny model's outputs."""
    out = tmp_path_factory.mktemp("run")
    settings = TrainSettings(output_dir=str(out), epochs=1, batch_size=4, learning_rate=5e-2, max_length=128,
                             lora=LoraSettings(r=4, alpha=8, dropout=0.0), progress=False)
    train(gsm8k_examples(shared_data, 4), model="tiny", settings=settings)
    return out


@pytest.fixture(scope="module")
def user_tasks(tmp_path_factory, shared_data):
    folder = tmp_path_factory.mktemp("tasks")
    texts = folder / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": ex.response}) + "\n" for ex in gsm8k_examples(shared_data, 3)))
    (folder / "my_texts.yaml").write_text(_PERPLEXITY_TASK.format(path=json.dumps(str(texts))))
    return folder


def test_slimtune_gsm8k_runs_offline_and_lands_in_the_eval_report(tmp_path):
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(app, ["eval", "--model", "tiny", "--harness", "slimtune_gsm8k", "--limit", "3",
                                      "--max-new-tokens", "8", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = EvalReport.from_json(out)
    metrics = report.metrics["lm-eval:slimtune_gsm8k"]
    assert set(metrics) == {"exact_match[last-number]"} and 0 <= metrics["exact_match[last-number]"] <= 1
    assert report.counts["lm-eval:slimtune_gsm8k"]["examples"] == 3
    assert report.settings["lm-eval"]["versions"]["slimtune_gsm8k"] is not None


def test_a_runs_harness_numbers_are_the_adapted_models(one_step_run, user_tasks):
    """The run's row scores base model + adapter: it differs from the base model's, and --data rows and
    harness rows share one report."""
    from slimtune.evaluate.harness import harness_model_args, run_harness

    assert harness_model_args(run=one_step_run) == {
        "pretrained": harness_model_args(model="tiny")["pretrained"], "peft": str(one_step_run / "adapter")}
    common = dict(include_path=user_tasks, device="cpu", batch_size=2)
    base = run_harness(["my_texts"], model="tiny", **common).metrics["lm-eval:my_texts"]["word_perplexity"]
    tuned = run_harness(["my_texts"], run=one_step_run, **common).metrics["lm-eval:my_texts"]["word_perplexity"]
    assert abs(tuned - base) > 1e-3 * base


def test_unknown_tasks_and_missing_runs_are_named(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["eval", "--model", "tiny", "--harness", "no_such_task", "--device", "cpu"])
    assert result.exit_code == 2 and "no_such_task" in result.output and "--harness-include" in result.output
    result = runner.invoke(app, ["eval", "--run", str(tmp_path), "--harness", "slimtune_gsm8k"])
    assert result.exit_code == 2 and "slimtune_train.json" in result.output
    result = runner.invoke(app, ["eval", "--model", "tiny"])
    assert result.exit_code == 2 and "--harness" in result.output
