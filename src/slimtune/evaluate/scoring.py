"""Model-scored metrics: response loss on a reference set, and multiple-choice accuracy by log-likelihood.

Rows longer than ``max_length`` lose tokens from the left (the start of the prompt), so the response is
always scored; how many rows were cut is reported.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from slimtune.data.example import Example
from slimtune.data.tokenize import IGNORE_INDEX, Collator, EncodeStats, encode_example
from slimtune.data.tokenize import last_turn_only as last_turn_only_labels
from slimtune.evaluate.metrics import perplexity, token_weighted_loss
from slimtune.features.losses import accepts_logits_to_keep, example_losses, score_rows


def _rows(examples: Sequence[Example], tokenizer, max_length: int | None, *,
          last_turn_only: bool) -> tuple[list[dict[str, list[int]]], int]:
    """Tokenised rows with response labels, and how many were cut to ``max_length``."""
    stats = EncodeStats()
    rows = [encode_example(example, tokenizer, max_length, stats) for example in examples]
    if last_turn_only:
        rows = [{"input_ids": row["input_ids"], "labels": last_turn_only_labels(row["labels"])} for row in rows]
    return rows, stats.truncated


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
                  max_length: int | None = 2048, max_batch_tokens: int = 4096) -> list[OptionScores]:
    """:class:`OptionScores` for each example's ``metadata["options"]``; the log-probs cover the option's tokens
    and the end-of-turn token that closes it.

    The options of one example share everything up to the reply, so the prompt runs once and its key/value
    cache is reused by every option, which then costs only its own few tokens: a 500-token passage with four
    options is 500 + ~20 positions instead of 4 x 520. ``max_length`` cuts the shared prompt from the left so
    the longest option still fits; options run in chunks of at most ``batch_size`` whose cached prompt copies
    stay within ``max_batch_tokens`` positions."""
    out = []
    for ex in examples:
        options = [str(option) for option in ex.metadata["options"]]
        variants = [Example(id=f"{ex.id}#{k}", messages=(*ex.prompt_messages, {"role": "assistant", "content": o}))
                    for k, o in enumerate(options)]
        rows, _ = _rows(variants, tokenizer, None, last_turn_only=True)
        logprob_sum, tokens = _score_continuations(model, rows, tokenizer.pad_token_id, batch_size=batch_size,
                                                   max_length=max_length, max_batch_tokens=max_batch_tokens)
        out.append(OptionScores(options=options, logprob_sum=logprob_sum, tokens=tokens))
    return out


@torch.inference_mode()
def _score_continuations(model, rows: Sequence[dict[str, list[int]]], pad_token_id: int, *, batch_size: int,
                         max_length: int | None, max_batch_tokens: int) -> tuple[list[float], list[int]]:
    """Summed log-prob and count of each row's labelled tokens, rows that differ only after a common prefix."""
    first_label = min(next(i for i, label in enumerate(r["labels"]) if label != IGNORE_INDEX) for r in rows)
    shared = 0  # the common prefix, never into a labelled token: the first scored token needs a logit before it
    while shared < first_label and len({r["input_ids"][shared] for r in rows}) == 1:
        shared += 1
    shared = max(shared, 1)
    longest_tail = max(len(r["input_ids"]) - shared for r in rows)
    cut = 0 if max_length is None else max(0, shared + longest_tail - max_length)
    prefix = torch.tensor([rows[0]["input_ids"][cut:shared]], device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        keep = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
        first = model(input_ids=prefix, use_cache=True, **keep)
        cache, prefix_logit = first.past_key_values, first.logits[:, -1:]
        chunk = max(1, min(batch_size, max_batch_tokens // (prefix.shape[1] + longest_tail)))
        collate = Collator(pad_token_id=pad_token_id)
        sums, counts = [], []
        for at in range(0, len(rows), chunk):
            tails = collate([{"input_ids": r["input_ids"][shared:], "labels": r["labels"][shared:]}
                             for r in rows[at:at + chunk]])
            tails = {name: t.to(prefix.device) for name, t in tails.items()}
            n = len(tails["input_ids"])
            mask = torch.cat([torch.ones_like(prefix).expand(n, -1), tails["attention_mask"]], dim=1)
            chunk_cache = copy.deepcopy(cache)
            chunk_cache.batch_repeat_interleave(n)
            logits = model(input_ids=tails["input_ids"], attention_mask=mask, past_key_values=chunk_cache).logits
            # Prepending the prefix's last logit (and an unscored label) aligns the tail as a whole row would be.
            logits = torch.cat([prefix_logit.expand(n, -1, -1), logits], dim=1)
            unscored = torch.full((n, 1), IGNORE_INDEX, device=prefix.device)
            losses, count = example_losses(logits, torch.cat([unscored, tails["labels"]], dim=1))
            sums += (-losses * count).tolist()
            counts += count.tolist()
    finally:
        model.train(was_training)
    return sums, counts


def option_accuracy(scored: Sequence[OptionScores], references: Sequence[str],
                    normalise: str = "mean") -> float:
    """Share of examples whose most likely option equals the reference response (whitespace-stripped)."""
    if not scored:
        return float("nan")
    return sum(s.best(normalise).strip() == ref.strip() for s, ref in zip(scored, references)) / len(scored)
