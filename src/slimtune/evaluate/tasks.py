"""Evaluation tasks (what to measure on a set of examples) and :func:`evaluate`, which runs them.

Every task reports the target loss and perplexity (response tokens only); a task adds the metric its
examples support: ``gsm8k`` exact match on generated answers, ``translation`` chrF and BLEU on generated
translations, ``choice`` option accuracy by log-likelihood, ``loss`` nothing more (dialogues, free text).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from slimtune.data.example import Example
from slimtune.data.tokenize import ensure_chat_template
from slimtune.evaluate.generation import generate
from slimtune.evaluate.metrics import bleu, chrf, exact_match, extract_number, first_line
from slimtune.evaluate.report import EvalReport
from slimtune.evaluate.scoring import option_accuracy, score_options, target_loss

LOSS_METRICS = ("loss", "perplexity")


@dataclass
class TaskContext:
    """What a task's scorer needs besides its examples."""

    model: object
    tokenizer: object
    batch_size: int
    max_new_tokens: int
    max_length: int | None
    progress: bool
    generation_batch_size: int

    def generate(self, examples: Sequence[Example]) -> list[str]:
        return generate(self.model, self.tokenizer, examples, self.max_new_tokens, self.generation_batch_size,
                        progress=self.progress)


#: A scorer fills each example's prediction record and returns the task's metrics and extra counts.
Scorer = Callable[[TaskContext, Sequence[Example], list[dict]], tuple[dict[str, float], dict[str, int]]]


@dataclass(frozen=True)
class Task:
    """A named evaluation: the metrics its scorer adds to loss and perplexity (none for ``loss``), and the
    generation length it needs when the caller gives none."""

    name: str
    metrics: tuple[str, ...] = ()
    score: Scorer | None = None
    max_new_tokens: int = 0


def gsm8k_answer(example: Example) -> str:
    """The reference number: the recipe's ``metadata["answer"]``, else the number after ``####``."""
    return str(example.metadata.get("answer") or extract_number(example.response) or "")


def _score_gsm8k(context: TaskContext, examples: Sequence[Example], records: list[dict]):
    texts = context.generate(examples)
    for record, example, text in zip(records, examples, texts):
        answer = gsm8k_answer(example)
        record.update(prediction=text, extracted=extract_number(text), reference=answer,
                      correct=exact_match(text, answer))
    return {"exact_match": sum(r["correct"] for r in records) / len(records)}, {"generated": len(texts)}


def _score_translation(context: TaskContext, examples: Sequence[Example], records: list[dict]):
    texts = context.generate(examples)
    hypotheses = [first_line(text) for text in texts]
    references = [str(ex.metadata.get("reference") or ex.response) for ex in examples]
    for record, text, hypothesis, reference in zip(records, texts, hypotheses, references):
        record.update(prediction=text, hypothesis=hypothesis, reference=reference)
    metrics = {"chrf": chrf(hypotheses, references), "bleu": bleu(hypotheses, references)}
    return metrics, {"generated": len(texts)}


def _score_choice(context: TaskContext, examples: Sequence[Example], records: list[dict]):
    with_options = [i for i, ex in enumerate(examples) if ex.metadata.get("options")]
    chosen = [examples[i] for i in with_options]
    if not chosen:
        return {}, {"with_options": 0}
    scored = score_options(context.model, context.tokenizer, chosen, batch_size=context.batch_size,
                           max_length=context.max_length)
    references = [ex.response for ex in chosen]
    for i, scores, reference in zip(with_options, scored, references):
        best = scores.best("mean")
        records[i].update(prediction=best, prediction_sum=scores.best("sum"), reference=reference,
                          correct=best.strip() == reference.strip(), option_logprob_mean=scores.logprob_mean)
    missing = sum(ref.strip() not in {o.strip() for o in s.options} for s, ref in zip(scored, references))
    metrics = {"accuracy": option_accuracy(scored, references, "mean"),
               "accuracy_sum": option_accuracy(scored, references, "sum")}
    return metrics, {"with_options": len(chosen), "reference_not_an_option": missing}


TASKS: dict[str, Task] = {task.name: task for task in (
    Task("gsm8k", ("exact_match",), _score_gsm8k, max_new_tokens=256),
    Task("translation", ("chrf", "bleu"), _score_translation, max_new_tokens=64),
    Task("choice", ("accuracy", "accuracy_sum"), _score_choice),
    Task("loss"),
)}


def infer_task(examples: Sequence[Example]) -> str:
    """The task name the examples' metadata supports (the keys the data recipes set)."""
    if examples and all("answer" in ex.metadata for ex in examples):
        return "gsm8k"
    if examples and all("reference" in ex.metadata for ex in examples):
        return "translation"
    if any(ex.metadata.get("options") for ex in examples):
        return "choice"
    return "loss"


def resolve_task(key: str, examples: Sequence[Example]) -> Task:
    """The task named ``key``, or, for a data set name such as ``"tatoeba"``, the one its examples support."""
    return TASKS[key] if key in TASKS else TASKS[infer_task(examples)]


def _check_metrics(metrics: Collection[str] | None) -> None:
    known = {*LOSS_METRICS, *(m for task in TASKS.values() for m in task.metrics)}
    unknown = set(metrics or ()) - known
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; known: {sorted(known)}")


def evaluate(model, tokenizer, examples_by_task: Mapping[str, Sequence[Example]], *,
             metrics: Collection[str] | None = None, max_new_tokens: int | None = None, batch_size: int = 8,
             generation_batch_size: int | None = None, max_length: int | None = 2048,
             keep_predictions: bool = True, progress: bool = True) -> EvalReport:
    """Score each named set of examples with its task's metrics (all of them, or only those in ``metrics``).

    A key that names a task (``gsm8k``, ``translation``, ``choice``, ``loss``) uses it; any other key (a data
    set name) gets the task its examples' metadata supports. ``max_new_tokens`` defaults per task (256 for
    GSM8K, 64 for translation). Rows over ``max_length`` tokens are cut from the left for scoring.

    ``batch_size`` rows are scored at a time; generation takes ``generation_batch_size`` prompts at a time
    (default: ``batch_size``, at least 32). Decoding reads every weight once per new token whatever the batch,
    so a wider batch costs little more per step: 100 Tatoeba prompts, 32 new tokens, the embedded model on
    2 CPU cores took 48.5 s in batches of 8 and 28.8 s in batches of 32, with the same texts. Scoring gains
    nothing from it (14.3 s against 11.6 s for their losses: wider batches only pad more).
    """
    _check_metrics(metrics)
    ensure_chat_template(tokenizer)
    generation_batch_size = generation_batch_size or max(batch_size, 32)
    report = EvalReport(settings={
        "model": str(getattr(getattr(model, "config", None), "_name_or_path", "")),
        "metrics": sorted(metrics) if metrics else None, "max_new_tokens": max_new_tokens,
        "batch_size": batch_size, "generation_batch_size": generation_batch_size, "max_length": max_length})
    for key, examples in examples_by_task.items():
        examples = list(examples)
        task = resolve_task(key, examples)
        start = time.perf_counter()
        records = [{"id": ex.id, "task": ex.task} for ex in examples]
        values: dict[str, float] = {}
        counts = {"examples": len(examples)}
        if examples and (metrics is None or set(LOSS_METRICS) & set(metrics)):
            result = target_loss(model, tokenizer, examples, batch_size=batch_size, max_length=max_length)
            values.update(loss=result.loss, perplexity=result.perplexity)
            counts.update(response_tokens=sum(result.tokens), truncated=result.truncated)
            report.breakdown[key] = result.by_task(examples)
            for record, loss, tokens in zip(records, result.losses, result.tokens):
                record.update(loss=loss, tokens=tokens)
        if examples and task.score and (metrics is None or set(task.metrics) & set(metrics)):
            context = TaskContext(model, tokenizer, batch_size, max_new_tokens or task.max_new_tokens,
                                  max_length, progress, generation_batch_size)
            task_values, task_counts = task.score(context, examples, records)
            values.update({k: v for k, v in task_values.items() if metrics is None or k in metrics})
            counts.update(task_counts)
        report.add(key, task.name, values, counts, time.perf_counter() - start,
                   records if keep_predictions else None)
    return report
