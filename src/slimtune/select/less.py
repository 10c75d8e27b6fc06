"""LESS: targeted selection by gradient similarity to a few target examples (Xia et al., ICML 2024).

Algorithm (the paper's box, in slimtune's terms)::

    input: pool D, target examples D_val grouped by subtask (Example.task), budget k
    1. warm-up: train LoRA on a random 5% of D for N = 4 epochs with Adam; keep checkpoints theta_1..theta_N,
       each with its optimizer moments (m_c, v_c)
    2. for every checkpoint c and pool example z:
           g = grad_theta L(z; theta_c)                      (response-token mean loss, LoRA weights only)
           Gamma_c(z) = m'/sqrt(v' + eps),  m' = b1 m_c + (1 - b1) g,  v' = b2 v_c + (1 - b2) g^2
           f_c(z) = P Gamma_c(z) / ||P Gamma_c(z)||          (P: seeded random projection to d = 8192)
    3. for every checkpoint c and target example z':  f_c(z') = P g / ||P g||   (plain SGD gradient)
    4. Inf(z, D_val^(j)) = mean_{z' in D_val^(j)} sum_c w_c cos(f_c(z), f_c(z')),
                                                          w_c = mean lr of epoch c / sum of them
       score(z) = max_j Inf(z, D_val^(j))
    5. keep the k highest scores (the paper keeps 5%; here whatever budget is asked)

Normalising the features (cosine, not inner product) is what removes the bias toward short examples, whose
per-token mean loss has larger gradients. Cost is dominated by step 2: one forward and one backward per pool
example and checkpoint, here taken a batch at a time (:mod:`slimtune.features.gradients`).

Where the paper and the authors' code (princeton-nlp/LESS) differ, and what this module does:

- subtask similarity. The code (``matching.py``, which produced the published numbers) takes, at every
  checkpoint, the inner products of the normalised train features with each normalised target feature,
  sums them over checkpoints weighted by w_c, averages over a subtask's target rows and takes the max over
  subtasks: the mean of per-example cosines. The paper writes the cosine with the subtask's gradient, the
  gradient of the subtask's mean loss: P of the mean of the unnormalised target gradients.
  ``aggregate="mean-cosine"`` (default) is the code's; ``"mean-gradient"`` the paper's formula, kept as an
  option. We default to the code because the mean gradient weights each target row by its gradient norm, so
  one target example with a large per-token loss gradient (short, or badly predicted) sets the subtask's
  direction alone, which is the length bias that normalising the features removes everywhere else; mean
  cosine gives each target example one vote.
- Adam moments. The code reads FSDP's name-keyed ``optimizer.bin`` and hard-codes betas (0.9, 0.999) and
  eps 1e-8; here a Trainer's integer-keyed ``optimizer.pt`` is mapped to names and betas/eps come from the
  checkpoint (the same numbers for the Trainer's default AdamW).
- checkpoint weights. The code passes the four epochs' average learning rates as constants; here they are
  read from the warm-up's log (``trainer_state.json``, one entry per step).
- projection. The paper's dense Rademacher matrix needs TRAK's CUDA kernel; ``projector="sparse"`` (default)
  is a sparse JL transform with the same mean and variance of every inner product at O(D) instead of
  O(D d) per example, which makes CPU runs possible. ``projector="rademacher"`` is the paper's (use a GPU).
- beyond the paper, ``diverse=True`` (TSDS's argument, Liu et al. 2024: a targeted subset should also be
  diverse, since top-k by relevance takes every near-duplicate of the best row): instead of step 5, greedy
  facility-location mutual information (:mod:`slimtune.select.submodular`),

       I(A; Q) = sum_{z in D} min( max_{z' in A} K(z, z'),  r(z) ),
       K(z, z') = max(0, sum_c w_c cos(f_c(z), f_c(z')))     (the LESS cosine between two pool rows),
       r(z)     = the subtask similarities of step 4, min-max scaled over the pool to [0, 1],

  so a pick covers the pool rows its gradient resembles, each only up to that row's own relevance: once a
  cluster of near-duplicates is represented, its other members add nothing and the next pick goes where
  relevant rows are still uncovered. K keeps each pool row's ``diverse_k`` most similar rows (0 elsewhere,
  read chunk by chunk from the feature stores: memory n * diverse_k, never n x n; time O(n^2 d) for the
  similarities). r is scaled because the train-target cosines are small next to train-train ones, and a cap
  far below K would let any pick cover any row. Scores in the manifest are then the greedy's marginal gains.
- ``layers=N`` (beyond the paper; default all) takes the LoRA gradients of the top N transformer layers only,
  with the backward pass stopped below them: cheaper extraction, measured against all layers for time and
  selection agreement in benchmarks/README.md ("LESS gradient features").
- without warm-up (``warmup=False``, the paper's "pre-trained model" ablation) there are no Adam moments:
  training features are plain gradients too, taken w.r.t. a freshly initialised LoRA (whose zero B factor
  makes the A gradients zero, so the B gradients, a random sketch of the base weights' gradients, decide).

Defaults follow the paper (LoRA r=128, alpha=512, dropout 0.1 on q/k/v/o; AdamW lr 2e-5, linear schedule,
warm-up ratio 0.03, no weight decay, 4 epochs on 5% of the pool, effective batch 32 = the authors'
1 x 32 accumulation, d = 8192) except ``max_length`` 512 (authors: 2048), chosen for CPU cost; raise it
for long examples. Features are stored in float16, as the authors did.

Warm-up runs and feature stores are cached under ``cache_dir`` (default ``slimtune.models.cache_dir()``) by
a key of everything that determines them, so a repeated selection reuses both and a killed one resumes at
the first missing shard. Under ``torchrun`` the warm-up runs as the Trainer's distributed training and each
rank extracts and scores its share of the feature shards; the per-row similarities are merged for the top-k.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from slimtune.data.example import Example, pool_hash
from slimtune.data.tokenize import TokenizedDataset
from slimtune.features.gradients import (
    FEATURES,
    NORMS,
    AdamMoments,
    extract_gradient_features,
    load_adam_moments,
)
from slimtune.features.projection import make_projector
from slimtune.features.store import (
    FeatureStore,
    chunked_matmul,
    chunked_matmul_topk,
    key_digest,
)
from slimtune.models import LoraSettings, apply_lora, cache_dir, load_model, load_tokenizer
from slimtune.select.base import Cost, Selector
from slimtune.select.submodular import FLMutualInformation, GreedyToBudget, greedy_scores
from slimtune.train import TrainSettings, train
from slimtune.utils import folder_damage, write_folder_checksums

log = logging.getLogger("slimtune.less")

AGGREGATES = ("mean-gradient", "mean-cosine")
#: Feature values one side of a LESS-kernel block holds (64 MB of float32): rows = this / (checkpoints x d).
_KERNEL_CHUNK_ELEMENTS = 1 << 24


@dataclass
class Checkpoint:
    """One model state features are taken at: a Trainer checkpoint directory, or ``None`` for the base model
    with a fresh LoRA; ``weight`` is its w_c."""

    path: Path | None
    weight: float


@dataclass
class LessSelector(GreedyToBudget, Selector):
    """LESS (see the module docstring for the algorithm and every choice made). ``diverse``: pick by
    facility-location mutual information over the LESS kernel (each row's ``diverse_k`` nearest rows)
    instead of the top scores. ``training``: the warm-up's settings, nested as :class:`TrainSettings` (the
    paper's by default; ``training={"epochs": 1, "lora": {"r": 16}}`` through :func:`get_selector` or
    ``-p training.epochs=1`` changes those numbers and keeps the rest)."""

    name: ClassVar[str] = "less"
    needs_target: ClassVar[bool] = True

    model: str = "smollm2"
    warmup: bool = True
    checkpoints: str | None = None
    warmup_fraction: float = 0.05
    training: TrainSettings = field(default_factory=lambda: TrainSettings(
        epochs=4.0, learning_rate=2e-5, lr_scheduler="linear", warmup_ratio=0.03, batch_size=8, grad_accum=4,
        weight_decay=0.0, lora=LoraSettings(r=128, alpha=512, dropout=0.1)))
    max_length: int = 512
    projector: str = "sparse"
    proj_dim: int = 8192
    layers: int | None = None
    aggregate: str = "mean-cosine"
    diverse: bool = False
    diverse_k: int = 32
    grad_batch_size: int = 8
    shard_rows: int = 256
    chunk_rows: int = 8192
    feature_dtype: str = "float16"
    cache_dir: str | None = None
    device: str | None = None
    device_map: str | None = None
    seed: int = 0

    #: Warm-up settings the selector sets itself: its own ``max_length``, ``seed`` and ``device``, and what the
    #: features need (a checkpoint per epoch, the learning rate of every step) or must not show (its folder).
    OWN_TRAINING: ClassVar[tuple[str, ...]] = ("output_dir", "max_length", "seed", "device", "save_checkpoints",
                                               "logging_steps", "progress")

    def __post_init__(self):
        if self.training.lora is None:
            raise ValueError("training.lora must be LoRA settings: LESS's features are the LoRA weights' gradients")
        unset = TrainSettings()
        owned = [name for name in self.OWN_TRAINING if getattr(self.training, name) != getattr(unset, name)]
        if owned:
            raise ValueError(f"training.{', training.'.join(owned)}: the selector sets this for the warm-up "
                             "(its cache folder, a checkpoint every epoch, a log line every step); give max_length, "
                             "seed and device to the selector itself")
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}; got {self.aggregate!r}")
        if self.layers is not None and self.layers < 1:
            raise ValueError(f"layers must be None (all) or >= 1 top layers, got {self.layers}")
        if self.diverse_k < 1:
            raise ValueError(f"diverse_k must be >= 1, got {self.diverse_k}")
        if not 0 < self.warmup_fraction <= 1:
            raise ValueError(f"warmup_fraction must be in (0, 1], got {self.warmup_fraction}")
        make_projector(self.projector, self.proj_dim, self.seed)  # fail early on an unknown projector

    # -- the algorithm -------------------------------------------------------------------------------------
    def score(self, pool: Sequence[Example], *, target: Sequence[Example] | None = None,
              existing: Sequence[Example] | None = None, cost: Cost) -> np.ndarray | tuple[np.ndarray, list[int]]:
        tokenizer = load_tokenizer(self.model)
        pool_data = TokenizedDataset(pool, tokenizer, self.max_length)
        target_data = TokenizedDataset(target, tokenizer, self.max_length)
        if len(pool_data) == 0 or len(target_data) == 0:
            raise ValueError(f"nothing to score: pool {pool_data.stats.summary()}; "
                             f"target {target_data.stats.summary()}")
        details = {"pool_encode": pool_data.stats.summary(), "target_encode": target_data.stats.summary()}
        checkpoints = self._checkpoints(pool, cost, details)                          # step 1
        subtasks = _subtask_rows(target_data.examples)
        per_subtask = torch.zeros(len(pool_data), len(subtasks))
        pool_stores = []
        for checkpoint in checkpoints:
            stores = self._features(checkpoint, pool_data, target_data, cost, details)  # steps 2-3
            per_subtask += checkpoint.weight * self._similarity(*stores, subtasks, len(pool_data),
                                                                len(target_data))  # step 4
            pool_stores.append(stores[0])
        cost.details["less"] = {**details, "subtasks": list(subtasks), "checkpoints": [
            {"path": str(c.path), "weight": c.weight} for c in checkpoints]}
        positions = pool_data.positions
        scores = np.full(len(pool), np.nan)
        if not self.diverse:
            scores[positions] = per_subtask.max(dim=1).values.numpy()
            return scores                                                                   # step 5
        weights = [c.weight for c in checkpoints]
        kept_scores, order = self._diverse(pool_stores, weights, per_subtask, len(pool_data))
        scores[positions] = kept_scores
        return scores, positions[order].tolist()

    def _diverse(self, pool_stores: list[FeatureStore], weights: list[float], per_subtask: torch.Tensor,
                 n_pool: int) -> tuple[np.ndarray, list[int]]:
        """Greedy FLMI over the pool's LESS kernel, capped by each row's scaled relevance (module docstring)."""
        features = _WeightedFeatures([s.open(FEATURES, n_pool) for s in pool_stores], weights)
        rows = max(1, _KERNEL_CHUNK_ELEMENTS // features.width)  # both sides of a block are read in float32
        neighbours = [chunked_matmul_topk(features, features[lo:lo + rows], self.diverse_k, chunk_rows=rows)
                      for lo in range(0, n_pool, rows)]
        similarity = torch.cat([values for values, _ in neighbours]).clamp_(min=0)
        kernel = (torch.cat([indices for _, indices in neighbours]), similarity)
        lo, hi = per_subtask.min(), per_subtask.max()
        relevance = (per_subtask - lo) / (hi - lo) if hi > lo else torch.ones_like(per_subtask)
        objective = FLMutualInformation(kernel, relevance)
        return greedy_scores(objective, self.greedy_picks(n_pool))

    def _similarity(self, pool_store: FeatureStore, target_store: FeatureStore,
                    subtasks: dict[str, list[int]], n_pool: int, n_target: int) -> torch.Tensor:
        """cos(f_c(z), f_c(D_val^(j))) for every pool row and subtask j, reading the pool chunk by chunk."""
        targets = torch.from_numpy(np.asarray(target_store.open(FEATURES, n_target), dtype=np.float32))
        if self.aggregate == "mean-gradient":
            # f = P g / ||P g|| and ||P g|| are stored, so P(mean g) = mean(||P g|| f): P is linear
            norms = torch.from_numpy(np.asarray(target_store.open(NORMS, n_target), dtype=np.float32))
            grads = targets * norms.unsqueeze(1)
            queries = F.normalize(torch.stack([grads[rows].mean(0) for rows in subtasks.values()]), dim=1)
            return self._pool_products(pool_store, n_pool, queries)
        means = torch.zeros(n_target, len(subtasks))  # column j averages the cosines with subtask j's rows
        for j, rows in enumerate(subtasks.values()):
            means[rows, j] = 1 / len(rows)
        return self._pool_products(pool_store, n_pool, targets, means)

    def _pool_products(self, pool_store: FeatureStore, n_pool: int, queries: torch.Tensor,
                       mix: torch.Tensor | None = None) -> torch.Tensor:
        """(pool features @ queries.T) @ mix for every pool row. Each process multiplies its own shards of the
        pool (those it extracted) and stores the few columns per row beside the features; every process
        then reads those n small rows, never every feature shard."""
        digest = hashlib.sha256(queries.numpy().tobytes())
        if mix is not None:
            digest.update(mix.numpy().tobytes())
        name = f"products-{digest.hexdigest()[:20]}"
        features = pool_store.open(FEATURES, n_pool)
        reduce = None if mix is None else (lambda block: block @ mix)
        pool_store.fill([name], n_pool, self.shard_rows, lambda lo, hi: {name: chunked_matmul(
            features.rows(lo, hi), queries, reduce=reduce, chunk_rows=self.chunk_rows)})
        return torch.from_numpy(np.asarray(pool_store.open(name, n_pool)))

    # -- step 1: warm-up -----------------------------------------------------------------------------------
    def _root(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else cache_dir()

    def _checkpoints(self, pool: Sequence[Example], cost: Cost, details: dict[str, Any]) -> list[Checkpoint]:
        if not self.warmup:
            return [Checkpoint(None, 1.0)]
        run = Path(self.checkpoints) if self.checkpoints else self._warmup_run(pool, cost, details)
        return run_checkpoints(run)

    def _warmup_run(self, pool: Sequence[Example], cost: Cost, details: dict[str, Any]) -> Path:
        rng = np.random.default_rng(self.seed)
        size = max(1, round(self.warmup_fraction * len(pool)))
        subset = [pool[i] for i in sorted(rng.choice(len(pool), size=size, replace=False))]
        settings = replace(self.training, max_length=self.max_length, seed=self.seed, device=self.device,
                           save_checkpoints=True, logging_steps=1, progress=False)
        key = {"kind": "less-warmup", "model": self.model, "subset": pool_hash(subset),
               "settings": {k: v for k, v in asdict(settings).items() if k not in ("output_dir", "progress")}}
        run = self._root() / "less-warmup" / f"{pool_hash(subset)}-{key_digest(key)}"
        damage = folder_damage(run) if (run / "slimtune_train.json").exists() else "unfinished"
        if damage is not None:
            if damage != "unfinished":  # its checkpoints' weights and Adam moments are what the features read
                log.warning("%s: the LESS warm-up run is discarded and trained again", damage)
                shutil.rmtree(run, ignore_errors=True)
            settings.output_dir = str(run)
            result = train(subset, model=self.model, settings=settings)
            write_folder_checksums(run)
            cost.forward_tokens += result.tokens_seen
            cost.backward_tokens += result.tokens_seen
            details["warmup_seconds"] = result.seconds
        details.update(warmup_run=str(run), warmup_rows=len(subset))
        return run

    # -- steps 2-3: features -------------------------------------------------------------------------------
    def _load(self, checkpoint: Checkpoint):
        model, tokenizer = load_model(self.model, device=self.device, device_map=self.device_map)
        if checkpoint.path is None:
            torch.manual_seed(self.seed)  # the fresh LoRA's A factors are random: seed them
            return apply_lora(model, self.training.lora), tokenizer
        from peft import PeftModel

        return PeftModel.from_pretrained(model, checkpoint.path, is_trainable=True), tokenizer

    def _features(self, checkpoint: Checkpoint, pool_data: TokenizedDataset, target_data: TokenizedDataset,
                  cost: Cost, details: dict[str, Any]) -> tuple[FeatureStore, FeatureStore]:
        model, tokenizer = self._load(checkpoint)
        device = next(model.parameters()).device
        projector = make_projector(self.projector, self.proj_dim, self.seed)
        state = (_fingerprint(checkpoint.path) if checkpoint.path is not None
                 else {"fresh_lora": asdict(self.training.lora), "seed": self.seed})
        common = {"model": self.model, "state": state, "projector": projector.identity(device),
                  "max_length": self.max_length, "batch_size": self.grad_batch_size,
                  "shard_rows": self.shard_rows, "dtype": self.feature_dtype,
                  **({"layers": self.layers} if self.layers is not None else {})}
        stores = []
        roles = (("pool", pool_data, checkpoint.path is not None), ("target", target_data, False))
        for role, data, adam in roles:
            key = {"kind": f"less-{'adam' if adam else 'sgd'}", "rows": pool_hash(data.examples), **common}
            store = FeatureStore.keyed(key, self._root() / "features")
            moments: AdamMoments | None = load_adam_moments(checkpoint.path, model) if adam else None
            stats = extract_gradient_features(
                model, data, store, projector=projector, moments=moments, batch_size=self.grad_batch_size,
                shard_rows=self.shard_rows, dtype=self.feature_dtype, pad_token_id=tokenizer.pad_token_id,
                layers=self.layers)
            cost.forward_tokens += stats.tokens
            cost.backward_tokens += stats.tokens
            done = details.setdefault(f"{role}_features", {"seconds": 0.0, "rows": 0, "tokens": 0,
                                                                 "shards": {"computed": 0, "reused": 0}})
            done["seconds"] += stats.seconds
            done["rows"] += stats.rows
            done["tokens"] += stats.tokens
            for k, v in stats.shards.items():
                done["shards"][k] += v
            stores.append(store)
        return stores[0], stores[1]


class _WeightedFeatures:
    """The checkpoints' feature arrays side by side, each scaled by sqrt(w_c), read a slice of rows at a time:
    the inner product of two rows is sum_c w_c cos(f_c(z), f_c(z'))."""

    def __init__(self, arrays: list, weights: list[float]):
        self.arrays, self.scales = arrays, [float(np.sqrt(w)) for w in weights]

    def __len__(self) -> int:
        return len(self.arrays[0])

    @property
    def width(self) -> int:
        return sum(a.shape[1] for a in self.arrays)

    def __getitem__(self, rows: slice) -> np.ndarray:
        return np.concatenate([scale * np.asarray(a[rows], dtype=np.float32)
                               for a, scale in zip(self.arrays, self.scales)], axis=1)


def run_checkpoints(run: str | os.PathLike) -> list[Checkpoint]:
    """The ``checkpoint-<step>`` directories of a Trainer run, weighted by their epochs' mean learning rate
    (w_c, normalised to sum 1) as logged in the last checkpoint's ``trainer_state.json``; equal weights when
    the log holds no learning rate for some epoch."""
    run = Path(run)
    paths = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    if not paths:
        raise FileNotFoundError(f"{run} holds no checkpoint-* directories: the warm-up must save a "
                                "checkpoint per epoch with its optimizer state")
    history = json.loads((paths[-1] / "trainer_state.json").read_text()).get("log_history", [])
    lrs = {row["step"]: row["learning_rate"] for row in history if "learning_rate" in row}
    steps = [0] + [int(p.name.rsplit("-", 1)[1]) for p in paths]
    means = []
    for lo, hi in itertools.pairwise(steps):
        epoch = [lr for step, lr in lrs.items() if lo < step <= hi]
        means.append(float(np.mean(epoch)) if epoch else float("nan"))
    if not all(np.isfinite(means)) or sum(means) <= 0:
        means = [1.0] * len(paths)
    return [Checkpoint(p, m / sum(means)) for p, m in zip(paths, means)]


def _subtask_rows(examples: Sequence[Example]) -> dict[str, list[int]]:
    rows: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        rows.setdefault(ex.task, []).append(i)
    return rows


def _fingerprint(checkpoint: Path) -> dict[str, str]:
    """Content hashes of the files features depend on: a checkpoint rewritten in place gets new features."""
    out = {}
    for name in ("adapter_model.safetensors", "adapter_model.bin", "optimizer.pt", "optimizer.bin"):
        path = checkpoint / name
        if path.exists():
            digest = hashlib.sha256()
            with open(path, "rb") as fh:
                while block := fh.read(1 << 22):
                    digest.update(block)
            out[name] = digest.hexdigest()[:16]
    return out
