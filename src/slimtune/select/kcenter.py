"""Embedding diversity: greedy k-center (farthest-point traversal) over example embeddings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from slimtune.data.example import Example
from slimtune.features.embeddings import knn, stored_minilm_embeddings, stored_model_embeddings
from slimtune.models import choose_device
from slimtune.select.base import Cost, Selector, StoredFeatures
from slimtune.select.submodular import GreedyToBudget


def farthest_point_order(embeddings: Tensor, k: int, *, start: int = 0,
                         covered: Tensor | None = None) -> tuple[list[int], Tensor]:
    """Greedy k-center on unit-norm rows: repeatedly pick the row farthest from every row picked so far.

    Distances are Euclidean, which on unit vectors orders like 1 - cosine, so the loop keeps each row's
    highest cosine to the picked set and takes the lowest. ``covered`` holds, per row, its highest cosine to
    an already-chosen set (then the first pick is the farthest from it, not ``start``). Returns the ``k``
    picks in order and every row's final highest cosine (+inf for picked rows).
    """
    nearest = torch.full((len(embeddings),), -torch.inf, device=embeddings.device) if covered is None \
        else covered.to(embeddings.device, torch.float32).clone()
    order: list[int] = []
    pick = start if covered is None else int(nearest.argmin())
    for _ in range(min(k, len(embeddings))):
        order.append(pick)
        nearest = torch.maximum(nearest, embeddings @ embeddings[pick])
        # a picked row must never be picked again, even when duplicates leave every distance at zero
        nearest[pick] = torch.inf
        pick = int(nearest.argmin())
    return order, nearest


@dataclass
class KCenterSelector(GreedyToBudget, StoredFeatures, Selector):
    """Greedy k-center: choose k examples so that every example is close to a chosen one, by minimising
    max_i min_{j in S} ||e_i - e_j|| greedily (Gonzalez, 1985, a 2-approximation), the core-set selection of
    Sener & Savarese (ICLR 2018, "Active Learning for Convolutional Neural Networks: A Core-Set Approach").

    ``embedding`` is ``"minilm"`` (the all-MiniLM-L6-v2 sentence encoder; ``model`` unused) or ``"model"``
    (``model``'s mean-pooled last hidden states); both are unit-norm, see :mod:`slimtune.features.embeddings`.
    The first pick is seeded; with ``existing`` examples, they are the initial centres instead (the core-set
    setting), so the picks fill what they leave uncovered. Scores are the pick order (higher = earlier); rows
    left out follow in order of their distance to the chosen set, farthest first, so the manifest ranks every
    row by how much it would add next. Embeddings are stored and, under a launcher, computed a share per process
    (:func:`~slimtune.features.embeddings.stored_embeddings`, :class:`StoredFeatures`); every process then runs
    the same greedy.
    """

    name: ClassVar[str] = "kcenter"
    embedding: str = "minilm"
    model: str = "smollm2"
    prompt_only: bool = False
    seed: int = 0
    batch_size: int = 8
    max_length: int = 512
    shard_rows: int = 4096
    device: str | None = None
    device_map: str | None = None

    def __post_init__(self):
        if self.embedding not in ("minilm", "model"):
            raise ValueError(f"embedding must be 'minilm' or 'model'; got {self.embedding!r}")

    def score(self, pool, *, target=None, existing=None, cost: Cost) -> tuple[np.ndarray, list[int]]:
        device = choose_device(self.device)
        points = self._embed(pool, cost).to(device)  # apart: a pool's stored vectors serve any existing set
        centres = self._embed(existing, cost).to(device) if existing else points[:0]
        covered = knn(points, centres, 1, device=str(device))[0][:, 0] if len(centres) else None
        start = int(np.random.default_rng(self.seed).integers(len(pool)))
        picks = self.greedy_picks(len(pool))  # one pass over the pool per pick: stop at the budget
        order, nearest = farthest_point_order(points, picks, start=start, covered=covered)
        # picked rows hold +inf, so the unpicked ones are the head of the ascending sort
        full = order + torch.argsort(nearest.cpu(), stable=True)[:len(pool) - len(order)].tolist()
        scores = np.empty(len(pool))
        scores[full] = np.arange(len(pool), 0, -1, dtype=np.float64)
        return scores, full

    def _embed(self, examples: Sequence[Example], cost: Cost) -> Tensor:
        if self.embedding == "minilm":
            return stored_minilm_embeddings(examples, prompt_only=self.prompt_only, device=self.device,
                                            shard_rows=self.shard_rows, cache=self._store_root())
        from slimtune.models import load_model

        model, tokenizer = load_model(self.model, device=self.device, device_map=self.device_map)
        embeddings, tokens = stored_model_embeddings(model, tokenizer, examples, prompt_only=self.prompt_only,
                                                     batch_size=self.batch_size, max_length=self.max_length,
                                                     shard_rows=self.shard_rows, cache=self._store_root())
        cost.forward_tokens += tokens
        return embeddings
