"""Per-example response-token losses: the signal behind loss baselines, IFD, evaluation and online scoring."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from slimtune.data.tokenize import IGNORE_INDEX


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


@torch.no_grad()
def score_losses(model, batches: Iterable[dict[str, Tensor]]) -> tuple[Tensor, Tensor]:
    """Mean response loss and response-token count of every row of ``batches``, in order (on the CPU)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    losses, counts = [], []
    for batch in batches:
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits
        loss, count = example_losses(logits, batch["labels"].to(device))
        losses.append(loss.cpu())
        counts.append(count.cpu())
    model.train(was_training)
    return torch.cat(losses), torch.cat(counts)
