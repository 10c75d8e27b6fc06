"""InfoBatch (Qin et al., "InfoBatch: Lossless Training Speed Up by Unbiased Dynamic Data Pruning",
ICLR 2024).

Algorithm, with H(x) each row's loss from its latest training forward (no extra forward) and r the ratio:

    at the start of epoch e, with H_bar the mean of H over the rows scored so far:
        if e < delta * epochs:   prune each scored row with H(x) < H_bar with probability r;
                                 the kept ones among them weigh 1 / (1 - r) in the loss, the rest weigh 1
        else (annealing):        keep every row, every weight 1
    the epoch is a shuffled pass over the kept rows, in full batches: fewer steps, not emptier batches
    each training forward writes its rows' losses into H

The rescaling keeps the expected gradient of the well-learnt rows unbiased, which is what makes the pruning
"lossless". Rows never trained yet have no score and are kept (the first epoch is whole, as in the paper,
whose table starts equal for every row).

How it runs in slimtune: the policy prunes at the sampler (``sampler``), so the online trainer draws the
kept rows in full batches; ``choose`` keeps every row of a batch with its weight, and ``needs`` nothing, so
no scoring forward runs; the trainer hands the policy each training forward's per-row losses
(``record_training_losses``). The kept count is rounded up to whole optimiser steps by restoring a few pruned
rows at random (weighted as the other kept below-mean rows), so no step of an epoch is partial. Under DDP
the score table is summed over ranks at each epoch start and the plan is drawn from a seed, so every rank
iterates the same rows.

Limits, stated: the Trainer lays out its learning-rate schedule and its epoch bookkeeping for full epochs;
with pruned epochs the schedule ends before its decay does, and a run resumed from a checkpoint past the
first pruned epoch counts its position in the data as if epochs were whole.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from slimtune.online.base import CandidateBatch, Policy


@dataclass
class InfoBatchPolicy(Policy):
    """InfoBatch: each epoch, drop a random share ``prune_ratio`` of the rows whose last training loss is below
    the mean, weight the kept below-mean ones by 1 / (1 - r), keep everything in the last ``anneal`` share
    of epochs. Defaults are the paper's: r = 0.5, annealing over the last 12.5% (delta = 0.875).
    """

    name: ClassVar[str] = "infobatch"
    sets_own_budget: ClassVar[bool] = True
    prune_ratio: float = 0.5
    anneal: float = 0.125
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.prune_ratio < 1:
            raise ValueError(f"prune_ratio must be in [0, 1), got {self.prune_ratio}")
        self._scores = torch.empty(0, dtype=torch.float64)
        self._scored = torch.empty(0, dtype=torch.bool)
        self._fresh = torch.empty(0, dtype=torch.float64)
        self._weights = torch.empty(0)
        self._plan: tuple[int, list[int]] | None = None

    def needs(self) -> set[str]:
        return set()

    def choose(self, batch: CandidateBatch, k: int) -> Tensor:
        self._last_weights = self._weights[batch.index] if len(self._weights) else torch.ones(len(batch))
        self._last_scores = torch.where(self._scored[batch.index], self._scores[batch.index].float(),
                                        math.nan) if len(self._scored) else None
        return torch.arange(len(batch))

    def record_training_losses(self, index: Tensor, losses: Tensor) -> None:
        """Each row's loss from the training forward that just ran on it."""
        index = index.cpu()
        self._fresh[index] = losses.detach().double().cpu()

    def _resize(self, rows: int) -> None:
        if len(self._scores) != rows:
            self._scores = torch.zeros(rows, dtype=torch.float64)
            self._scored = torch.zeros(rows, dtype=torch.bool)
            self._fresh = torch.full((rows,), math.nan, dtype=torch.float64)
            self._weights = torch.ones(rows)

    def _merge_fresh_losses(self, device: torch.device) -> None:
        """Fold the losses recorded since the last epoch into the table, from every rank (a row is trained on
        one rank per epoch)."""
        seen = ~self._fresh.isnan()
        values, counts = torch.where(seen, self._fresh, 0.0), seen.double()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            both = torch.stack([values, counts]).to(device)
            torch.distributed.all_reduce(both)
            values, counts = both.cpu()
        fresh = counts > 0
        self._scores[fresh] = values[fresh] / counts[fresh]
        self._scored |= fresh
        self._fresh.fill_(math.nan)

    def plan_epoch(self, epoch: int, epochs: int, rows: int, multiple: int = 1,
                   device: torch.device | str = "cpu") -> list[int]:
        """The rows of ``epoch`` (of ``epochs``), in training order; sets their weights. The same plan again
        when asked twice for one epoch (a resumed run re-enters its epoch)."""
        if self._plan is not None and self._plan[0] == epoch:
            return self._plan[1]
        self._resize(rows)
        self._merge_fresh_losses(torch.device(device))
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        below = torch.zeros(rows, dtype=torch.bool)
        if epoch < (1 - self.anneal) * epochs and self._scored.any():
            below = self._scored & (self._scores < self._scores[self._scored].mean())
        pruned = below & (torch.rand(rows, generator=generator) < self.prune_ratio)
        shortfall = -int((~pruned).sum()) % multiple
        if shortfall:  # whole optimiser steps: restore a random few of the pruned rows
            restored = pruned.nonzero().squeeze(1)[torch.randperm(int(pruned.sum()), generator=generator)]
            pruned[restored[:shortfall]] = False
        self._weights = torch.where(below & ~pruned, 1 / (1 - self.prune_ratio), 1.0).float()
        kept = (~pruned).nonzero().squeeze(1)
        order = kept[torch.randperm(len(kept), generator=generator)].tolist()
        self._plan = (epoch, order)
        return order

    def sampler(self, rows: int, epochs: int, multiple: int, device: torch.device) -> InfoBatchSampler:
        return InfoBatchSampler(self, rows, epochs, multiple, device)

    def log_record(self) -> dict[str, Any]:
        return {"epoch": None if self._plan is None else self._plan[0],
                "epoch_rows": None if self._plan is None else len(self._plan[1])}

    def state_dict(self) -> dict[str, Any]:
        plan = None if self._plan is None else [self._plan[0], self._plan[1]]
        return {"scores": self._scores.clone(), "scored": self._scored.clone(), "fresh": self._fresh.clone(),
                "weights": self._weights.clone(), "plan": plan}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._scores, self._scored, self._fresh = state["scores"], state["scored"], state["fresh"]
        self._weights = state["weights"]
        self._plan = None if state["plan"] is None else (state["plan"][0], state["plan"][1])


class InfoBatchSampler(torch.utils.data.Sampler):
    """The Trainer's sampler under InfoBatch: each pass (epoch) yields the policy's plan for that epoch."""

    def __init__(self, policy: InfoBatchPolicy, rows: int, epochs: int, multiple: int, device: torch.device):
        self.policy, self.rows, self.epochs, self.multiple, self.device = policy, rows, epochs, multiple, device
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        plan = self.policy._plan
        return self.rows if plan is None or plan[0] != self.epoch else len(plan[1])

    def __iter__(self) -> Iterator[int]:
        order = self.policy.plan_epoch(self.epoch, self.epochs, self.rows, self.multiple, self.device)
        self.epoch += 1  # a Trainer that does not call set_epoch still moves on
        return iter(order)
