"""Per-example response-token losses: the signal behind loss baselines, IFD, evaluation and online scoring."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from slimtune.data.tokenize import IGNORE_INDEX, Collator


def token_losses(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy of every next-token prediction, (B, T-1), and the mask of response positions."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    losses = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels.clamp_min(0), reduction="none")
    return losses * mask, mask


def example_losses(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's mean loss over its response tokens, and how many response tokens it has."""
    losses, mask = token_losses(logits, labels)
    count = mask.sum(dim=1)
    return losses.sum(dim=1) / count.clamp_min(1), count


def accepts_logits_to_keep(model) -> bool:
    """Whether the (PEFT-unwrapped) model's forward can skip the LM head on leading positions."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def response_logits(model, input_ids: Tensor, attention_mask: Tensor,
                    labels: Tensor) -> tuple[Tensor, Tensor]:
    """Logits from the position before the batch's first response token onwards, and the labels cut to match.

    The LM head over a large vocabulary dominates a small model's forward, and prompt positions predict
    nothing that is scored, so their logits are skipped with ``logits_to_keep`` where the model supports it.
    """
    labelled = labels != IGNORE_INDEX
    start = 0
    if accepts_logits_to_keep(model) and labelled.any():
        first = labelled.int().argmax(dim=1)[labelled.any(dim=1)]
        start = max(int(first.min()) - 1, 0)
    keep = {"logits_to_keep": labels.shape[1] - start} if start > 0 else {}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **keep).logits
    # Align on what came back rather than on what was asked, in case a wrapper ignored the request.
    return logits, labels[:, labels.shape[1] - logits.shape[1]:]


@torch.no_grad()
def score_losses(model, batches: Iterable[dict[str, Tensor]]) -> tuple[Tensor, Tensor]:
    """Mean response loss and response-token count of every row of ``batches``, in order (on the CPU)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    losses, counts = [], []
    try:
        for batch in batches:
            logits, labels = response_logits(model, batch["input_ids"].to(device),
                                              batch["attention_mask"].to(device), batch["labels"].to(device))
            loss, count = example_losses(logits, labels)
            losses.append(loss.cpu())
            counts.append(count.cpu())
    finally:
        model.train(was_training)
    return torch.cat(losses), torch.cat(counts)


def score_rows(model, rows: Sequence[dict[str, list[int]]], *, pad_token_id: int, batch_size: int = 8,
               max_batch_tokens: int = 4096) -> tuple[Tensor, Tensor]:
    """:func:`score_losses` over tokenised rows (``input_ids``, ``labels``), returned in the rows' order.

    Rows are batched longest first, at most ``batch_size`` rows and ``max_batch_tokens`` padded positions per
    batch (a row longer than that is a batch of its own): one 1,500-token P3 passage among short rows would
    otherwise make seven short neighbours pay for its length, and an out-of-memory error shows at once.
    """
    if not rows:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    groups = length_batches([len(r["input_ids"]) for r in rows], max_batch_tokens, max_rows=batch_size)
    order = [i for group in groups for i in group]
    collate = Collator(pad_token_id=pad_token_id)
    batches = (collate([rows[i] for i in group]) for group in groups)
    sorted_losses, sorted_counts = score_losses(model, batches)
    losses, counts = torch.empty_like(sorted_losses), torch.empty_like(sorted_counts)
    losses[order], counts[order] = sorted_losses, sorted_counts
    return losses, counts


def length_batches(lengths: Sequence[int], max_tokens: int, *, max_rows: int | None = None) -> list[list[int]]:
    """Indices grouped longest first (an out-of-memory error shows at the first batch, and rows of a batch have
    similar lengths), at most ``max_rows`` rows a batch and rows x the longest row's length <= ``max_tokens``;
    a row longer than that is a batch of its own. Every index lands in exactly one batch."""
    batches: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        batch = batches[-1] if batches else None
        if batch and (max_rows is None or len(batch) < max_rows) and \
                (len(batch) + 1) * lengths[batch[0]] <= max_tokens:
            batch.append(index)
        else:
            batches.append([index])
    return batches
