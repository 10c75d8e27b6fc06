"""Evaluation: target loss / perplexity, GSM8K exact match, chrF / BLEU, option accuracy, per task."""

from slimtune.evaluate.generation import generate
from slimtune.evaluate.metrics import bleu, chrf, exact_match, extract_number, first_line, perplexity
from slimtune.evaluate.report import EvalReport
from slimtune.evaluate.scoring import LossResult, OptionScores, option_accuracy, score_options, target_loss
from slimtune.evaluate.tasks import TASKS, Task, TaskContext, evaluate, infer_task, resolve_task

__all__ = [
    "TASKS", "EvalReport", "LossResult", "OptionScores", "Task", "TaskContext", "bleu", "chrf", "evaluate",
    "exact_match", "extract_number", "first_line", "generate", "infer_task", "option_accuracy", "perplexity",
    "resolve_task", "score_options", "target_loss",
]
