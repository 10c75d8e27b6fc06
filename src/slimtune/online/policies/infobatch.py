"""InfoBatch (Qin et al., "InfoBatch: Lossless Training Speed Up by Unbiased Dynamic Data Pruning",
ICLR 2024).

Algorithm, per example x with score H(x) (its loss) and the data set's mean score H_bar:

    if H(x) < H_bar:  prune x with probability r; if kept, weight its loss by 1 / (1 - r)
    else:             keep x (weight 1)
    in the last delta share of training (annealing): keep every example, weight 1

The rescaling keeps the expected gradient of the well-learnt examples unbiased, which is what makes the
pruning "lossless".

How it maps onto K-of-B online selection. InfoBatch decides keep/drop per example, so it sets its own budget:
the number of rows it returns varies around B * (1 - r * share below the mean), and the trainer's K is not
used. The paper scores each example with its loss from the previous epoch's training forward and the mean
over the whole data set; here the score is the fresh loss from the trainer's scoring forward, and H_bar is the
mean over the last ``window`` scored candidates (the current batch included), the data-set mean that an
online learner can see. The fresh forward costs B no-grad forwards per step that the paper's bookkeeping does
not, so this variant is for comparing what InfoBatch selects, not for its speed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from slimtune.online.base import CandidateBatch, Policy


@dataclass
class InfoBatchPolicy(Policy):
    """InfoBatch: drop a random share ``prune_ratio`` of the below-mean-loss candidates, weight the kept
    below-mean ones by 1 / (1 - r), keep everything in the last ``anneal`` share of training.

    Defaults are the paper's: r = 0.5, annealing over the last 12.5% (delta = 0.875).
    """

    name: ClassVar[str] = "infobatch"
    sets_own_budget: ClassVar[bool] = True
    prune_ratio: float = 0.5
    anneal: float = 0.125
    window: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.prune_ratio < 1:
            raise ValueError(f"prune_ratio must be in [0, 1), got {self.prune_ratio}")
        self._generator = torch.Generator().manual_seed(self.seed)
        self._recent = torch.empty(0)

    def choose(self, batch: CandidateBatch, k: int) -> Tensor:
        loss = batch.loss.detach().float().cpu()
        self._recent = torch.cat([self._recent, loss])[-self.window:]
        below = loss < self._recent.mean()
        if batch.progress >= 1 - self.anneal:
            below = torch.zeros_like(below)
        pruned = below & (torch.rand(len(loss), generator=self._generator) < self.prune_ratio)
        if pruned.all():  # every candidate was a well-learnt one and every coin said prune: keep the hardest
            pruned[loss.argmax()] = False
        self._last_scores = loss
        self._last_weights = torch.where(below, 1 / (1 - self.prune_ratio), 1.0)
        kept = (~pruned).nonzero().squeeze(1)
        return kept[loss[kept].argsort(descending=True)]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self._generator.get_state(), "recent": self._recent.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._generator.set_state(state["generator"])
        self._recent = state["recent"]
