"""Model-scored metrics: response loss on a reference set, and multiple-choice accuracy by log-likelihood.

Rows longer than ``max_length`` lose tokens from the left (the start of the prompt), so the response is
always scored; how many rows were cut is reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from slimtune.data.example import Example
from slimtune.data.tokenize import encode_example
from slimtune.data.tokenize import last_turn_only as last_turn_only_labels
from slimtune.evaluate.metrics import perplexity, token_weighted_loss
from slimtune.features.losses import score_rows


def _rows(examples: Sequence[Example], tokenizer, max_length: int | None, *,
          last_turn_only: bool) -> tuple[list[dict[str, list[int]]], int]:
    """Tokenised rows with response labels, and how many were cut to ``max_length``."""
    rows, truncated = [], 0
    for example in examples:
        row = encode_example(example, tokenizer)
        ids, labels = row["input_ids"], row["labels"]
        if last_turn_only:
            labels = last_turn_only_labels(labels)
        if max_length is not None and len(ids) > max_length:
            ids, labels = ids[-max_length:], labels[-max_length:]
            truncated += 1
        rows.append({"input_ids": ids, "labels": labels})
    return rows, truncated


@dataclass
class LossResult:
    """Each example's mean response loss and response-token count, and the set's token-weighted loss."""

    losses: list[float]
    tokens: list[int]
    truncated: int = 0

    @property
    def loss(self) -> float:
        return token_weighted_loss(self.losses, self.tokens)

    @property
    def perplexity(self) -> float:
        return perplexity(self.loss)

    def by_task(self, examples: Sequence[Example]) -> dict[str, dict[str, float]]:
        """Loss, perplexity and tokens per ``example.task`` (e.g. each language pair of a translation set)."""
        groups: dict[str, list[int]] = {}
        for i, example in enumerate(examples):
            groups.setdefault(example.task, []).append(i)
        out = {}
        for task, rows in sorted(groups.items()):
            loss = token_weighted_loss([self.losses[i] for i in rows], [self.tokens[i] for i in rows])
            tokens = sum(self.tokens[i] for i in rows)
            out[task] = {"loss": loss, "perplexity": perplexity(loss), "tokens": tokens}
        return out


def target_loss(model, tokenizer, examples: Sequence[Example], *, batch_size: int = 8,
                max_length: int | None = 2048) -> LossResult:
    """Loss on every assistant turn of each example, as training sees it (a dialogue's turns all count)."""
    rows, truncated = _rows(examples, tokenizer, max_length, last_turn_only=False)
    losses, counts = score_rows(model, rows, pad_token_id=tokenizer.pad_token_id, batch_size=batch_size)
    return LossResult(losses=losses.tolist(), tokens=counts.tolist(), truncated=truncated)


@dataclass
class OptionScores:
    """Log-likelihood of each answer option as the assistant's reply to one example's prompt."""

    options: list[str]
    logprob_sum: list[float]
    tokens: list[int]

    @property
    def logprob_mean(self) -> list[float]:
        return [s / max(n, 1) for s, n in zip(self.logprob_sum, self.tokens)]

    def best(self, normalise: str = "mean") -> str:
        """The most likely option: by mean log-prob per token (``"mean"``, fair to long options) or by the
        sum (``"sum"``, the option's probability as a whole, which favours short options)."""
        if normalise not in ("mean", "sum"):
            raise ValueError(f"normalise must be 'mean' or 'sum'; got {normalise!r}")
        scores = self.logprob_mean if normalise == "mean" else self.logprob_sum
        return self.options[max(range(len(scores)), key=scores.__getitem__)]


def score_options(model, tokenizer, examples: Sequence[Example], *, batch_size: int = 8,
                  max_length: int | None = 2048) -> list[OptionScores]:
    """:class:`OptionScores` for each example's ``metadata["options"]``, all options of all examples batched
    together; the log-probs cover the option's tokens and the end-of-turn token that closes it."""
    variants = [Example(id=f"{ex.id}#{k}",
                        messages=(*ex.prompt_messages, {"role": "assistant", "content": str(option)}))
                for ex in examples for k, option in enumerate(ex.metadata["options"])]
    rows, _ = _rows(variants, tokenizer, max_length, last_turn_only=True)
    losses, counts = score_rows(model, rows, pad_token_id=tokenizer.pad_token_id, batch_size=batch_size)
    out, at = [], 0
    for ex in examples:
        n = len(ex.metadata["options"])
        tokens = counts[at:at + n]
        out.append(OptionScores(options=[str(o) for o in ex.metadata["options"]],
                                logprob_sum=(-losses[at:at + n] * tokens).tolist(), tokens=tokens.tolist()))
        at += n
    return out


def option_accuracy(scored: Sequence[OptionScores], references: Sequence[str],
                    normalise: str = "mean") -> float:
    """Share of examples whose most likely option equals the reference response (whitespace-stripped)."""
    if not scored:
        return float("nan")
    return sum(s.best(normalise).strip() == ref.strip() for s, ref in zip(scored, references)) / len(scored)
