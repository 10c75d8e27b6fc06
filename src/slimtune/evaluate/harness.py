"""The lm-evaluation-harness bridge: run lm-eval tasks on a base model or a slimtune run, report them with ours.

Users compare models with lm-eval; this runs it on exactly what slimtune trained (the run's base model plus its
LoRA adapter, loaded by lm-eval's own ``HFLM`` through its ``peft=`` argument, so its request batching, caching
and metrics stay lm-eval's) and folds every task's metrics into the same :class:`EvalReport` as slimtune's own,
under the key ``lm-eval:<task>``. lm-eval is an optional extra: ``pip install 'slimtune[harness]'``.

Offline by default: lm-eval's registered tasks download their data sets from the Hub, so slimtune ships one
local task definition, ``slimtune_gsm8k`` (GSM8K test, zero-shot, exact match on the last number of a greedy
answer, as lm-eval's ``gsm8k`` scores it), written at run time over the shared GSM8K file or the bundled sample.
Task definitions of the user's own go in a folder passed as ``include_path`` (``--harness-include``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slimtune.evaluate.report import EvalReport
from slimtune.utils import atomic_write_text

#: The task lm-eval reports a metric under is ``"<metric>,<filter>"``; these keys of a task's results are not
#: metrics.
_NOT_METRICS = {"alias", "name", "sample_len", "samples"}

_GSM8K_TASK = """\
task: slimtune_gsm8k
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer.split('####')[-1].strip()}}}}"
generation_kwargs:
  until: ["\\n\\n", "Question:"]
  do_sample: false
  max_gen_toks: {max_new_tokens}
filter_list:
  - name: last-number
    filter:
      - function: regex
        regex_pattern: "(-?[$0-9.,]{{2,}})|(-?[0-9]+)"
        group_select: -1
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: false
    regexes_to_ignore: [",", "\\\\$", "\\\\.$"]
"""


def builtin_task_dir(max_new_tokens: int = 256) -> Path:
    """A folder holding slimtune's local lm-eval task definitions, pointing at the GSM8K test file that
    slimtune's ``gsm8k`` recipe reads (the shared data, else the bundled sample)."""
    from slimtune.data.recipes import data_root
    from slimtune.models import cache_dir

    root, _ = data_root()
    folder = cache_dir() / "harness_tasks"
    folder.mkdir(parents=True, exist_ok=True)
    text = _GSM8K_TASK.format(path=json.dumps(str(root / "gsm8k" / "test.jsonl")), max_new_tokens=max_new_tokens)
    target = folder / "slimtune_gsm8k.yaml"
    if not target.exists() or target.read_text() != text:
        atomic_write_text(target, text)
    return folder


def harness_model_args(*, model: str | None = None, run: str | os.PathLike | None = None) -> dict[str, str]:
    """``pretrained`` (and ``peft``) for lm-eval's HFLM: a model name slimtune resolves (``smollm2``, ``tiny``,
    an id or a path), or a slimtune run folder's base model plus adapter (a full fine-tune's saved model)."""
    from slimtune.models import resolve_model

    if (model is None) == (run is None):
        raise ValueError("give exactly one of model or run")
    if model is not None:
        return {"pretrained": resolve_model(model)}
    run = Path(run)
    config_file = run / "slimtune_train.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{run} is not a slimtune run folder: {config_file.name} is missing")
    adapter = run / "adapter"
    if not (adapter / "adapter_config.json").exists():
        return {"pretrained": str(adapter)}
    base = json.loads(config_file.read_text())["model"]
    return {"pretrained": resolve_model(base), "peft": str(adapter)}


def run_harness(tasks: Sequence[str], *, model: str | None = None, run: str | os.PathLike | None = None,
                include_path: str | os.PathLike | None = None, limit: int | None = None,
                num_fewshot: int | None = None, batch_size: int = 8, device: str | None = None,
                max_new_tokens: int = 256, report: EvalReport | None = None) -> EvalReport:
    """Evaluate ``tasks`` with lm-eval and add one row per task to ``report`` (a new one if None).

    Metrics keep lm-eval's names, with the filter in brackets when it is not ``none`` (``exact_match[last-number]``);
    standard errors go to ``report.settings["lm-eval"]`` with lm-eval's raw results and versions.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ImportError("the lm-evaluation-harness bridge needs lm-eval: pip install 'slimtune[harness]'") \
            from None
    from slimtune.models import choose_device

    report = report if report is not None else EvalReport()
    includes = [str(builtin_task_dir(max_new_tokens))] + ([str(include_path)] if include_path else [])
    manager = TaskManager(include_path=includes)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"lm-eval knows no task {', '.join(unknown)}; slimtune's offline task is "
                         f"slimtune_gsm8k, and --harness-include DIR adds task definitions of your own")
    model_args = harness_model_args(model=model, run=run)
    lm = HFLM(**model_args, device=str(choose_device(device)), batch_size=batch_size, dtype="auto")
    start = time.perf_counter()
    results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot, log_samples=False)
    seconds = time.perf_counter() - start
    raw: dict[str, Any] = {"versions": results.get("versions", {}), "model_args": model_args, "results": {}}
    for task, values in results["results"].items():
        metrics = {_metric_name(key): float(value) for key, value in values.items()
                   if key not in _NOT_METRICS and "_stderr" not in key and isinstance(value, (int, float))}
        examples = int(results.get("n-samples", {}).get(task, {}).get("effective", values.get("sample_len", 0)))
        # lm-eval times the whole call, not each task: every row carries the call's seconds
        report.add(f"lm-eval:{task}", "lm-eval", metrics, {"examples": examples}, seconds)
        raw["results"][task] = {key: value for key, value in values.items() if key not in ("samples",)}
    report.settings.setdefault("lm-eval", {}).update(raw)
    return report


def _metric_name(key: str) -> str:
    metric, _, filter_name = key.partition(",")
    return metric if filter_name in ("", "none") else f"{metric}[{filter_name}]"
