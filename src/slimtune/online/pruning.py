"""Per-epoch pruning inside the Hugging Face Trainer: each epoch trains on the pool rows a policy keeps.

At the start of every epoch (``on_epoch_begin``, which the Trainer calls before it draws the epoch's first
batch):

    features <- a no-grad forward over the whole pool with the current model, batched, computing what
                ``policy.needs()`` names, reduced by ``policy.features`` to a few numbers per row
    kept     <- policy.prune(features, m),  m = ``keep`` x n (or ``keep`` rows), the same every epoch
    the epoch is the Trainer's usual pass over a :class:`PrunedView`, whose position i is pool row kept[i]

The view's length is m from the start, so the Trainer's step count and learning-rate schedule are those of m
rows an epoch, its sampler shuffles as usual, and nothing else about training changes. A pruning policy
implements ``needs``, ``features(CandidateBatch) -> RowFeatures`` and ``prune(RowFeatures, m)``; SLAP does.

Use it three ways: :func:`train_pruned` (slimtune's ``train`` with :class:`PrunedTrainer`); any Trainer
subclass with :class:`PruningMixin` first in its bases, e.g. ``class X(PruningMixin, SelectiveTrainer)`` to
prune per epoch *and* select per step; or a plain ``Trainer(train_dataset=pruning.view,
callbacks=[pruning])`` with ``pruning = EpochPruning(...)``. Under DDP every rank scores the whole pool and
rank 0's choice is broadcast, so all ranks train on the same rows. A run resumed mid-epoch re-scores the pool
with the checkpoint's model, so the rest of that epoch may draw from a slightly different kept set.

Each epoch's choice is a line of ``output_dir/pruning_log.jsonl``: epoch, step, pool size, rows kept and their
ids (``kept_ids``, as the online trainer's ``chosen_ids``), scoring seconds and tokens, and the policy's
``log_record()`` (for SLAP the allocation over strata).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback

from slimtune.data.tokenize import IGNORE_INDEX
from slimtune.online import get_policy
from slimtune.online.base import CandidateBatch
from slimtune.online.policies.slap import RowFeatures, SLAPPolicy
from slimtune.online.trainer import (
    accepts_logits_to_keep,
    forward_signals,
    full_head_weight,
    keep_count,
    logits_are_linear,
)
from slimtune.train import TrainResult, TrainSettings, train

if TYPE_CHECKING:
    from slimtune.data.example import Example

LOG_NAME = "pruning_log.jsonl"
#: score_pool folds its per-batch features into one every this many batches: each batch's Gauss-Newton block is
#: D x D (1 MB at the default 512), so 10k rows at batch 8 would otherwise hold 1.25 GB until the end.
FOLD_BATCHES = 256


class PrunedView(Dataset):
    """``size`` rows of ``dataset``: position i is row ``indices[i]``. Counts the rows and tokens served."""

    def __init__(self, dataset: Dataset, size: int):
        self.dataset = dataset
        self.indices = list(range(size))
        self.rows_served = self.tokens_served = 0

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.dataset[self.indices[i]]
        self.rows_served += 1
        self.tokens_served += len(row["input_ids"])
        return row

    @property
    def examples(self):
        """The pool's Examples, indexed like the pool (rows carry their pool index as ``example_index``)."""
        return self.dataset.examples


@torch.no_grad()
def score_pool(model: torch.nn.Module, dataset: Dataset, collator, policy: SLAPPolicy,
               batch_size: int = 8) -> tuple[RowFeatures, int]:
    """``policy.features`` of every pool row, in pool order, and the tokens the forward read.

    Signals as the online trainer computes them (``logit_factors``: hidden states and the LM head where the
    logits are exactly their product, the full logits otherwise). Rows are batched longest first, so batches
    pad little and an out-of-memory error shows at once.
    """
    device = next(model.parameters()).device
    needs, trim = policy.needs(), accepts_logits_to_keep(model)
    examples = getattr(dataset, "examples", None)
    order = sorted(range(len(dataset)), key=lambda i: -len(dataset[i]["input_ids"]))
    parts, tokens, head = [], 0, None
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collator([dataset[i] for i in rows]).items()
                     if k != "example_index"}
            if start == 0 and "logit_factors" in needs:
                weight = full_head_weight(model)  # gathered, once, where FSDP or ZeRO-3 shards it
                head = weight if logits_are_linear(model, batch, weight) else None
            factored = "logit_factors" in needs
            signals = forward_signals(model, batch, logits="logits" in needs or (factored and head is None),
                                      hidden="hidden" in needs or factored, trim_logits=trim,
                                      log_probs=factored, head=head)
            labels = batch["labels"]
            parts.append(policy.features(CandidateBatch(
                index=torch.tensor(rows), ids=[examples[i].id if examples else str(i) for i in rows],
                tasks=[examples[i].task if examples else "default" for i in rows],
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                token_count=(labels[:, 1:] != IGNORE_INDEX).sum(1),
                extras={} if head is None else {"head": head}, **signals)))
            tokens += int(batch["attention_mask"].sum())
            if len(parts) == FOLD_BATCHES:
                parts = [RowFeatures.cat(parts)]
    finally:
        model.train(was_training)
    return RowFeatures.cat(parts).rows(torch.tensor(order).argsort()), tokens


class EpochPruning(TrainerCallback):
    """Re-chooses the rows of :attr:`view` at every epoch start; pass ``view`` to the Trainer as its data set.

    ``keep``: a share of the pool (< 1) or a number of rows (>= 1); ``batch_size``: rows per scoring forward.
    """

    def __init__(self, policy: SLAPPolicy, dataset: Dataset, collator, keep: float = 0.7,
                 batch_size: int = 8):
        self.policy, self.collator, self.keep, self.batch_size = policy, collator, keep, batch_size
        self.view = PrunedView(dataset, keep_count(keep, len(dataset)))
        self.history: list[dict[str, Any]] = []
        self.scoring_seconds, self.scoring_tokens = 0.0, 0

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        started = time.perf_counter()
        feats, tokens = score_pool(model, self.view.dataset, self.collator, self.policy, self.batch_size)
        kept = _same_on_every_rank(self.policy.prune(feats, len(self.view)).tolist())
        self.view.indices = kept
        seconds = time.perf_counter() - started
        self.scoring_seconds += seconds
        self.scoring_tokens += tokens
        examples = getattr(self.view.dataset, "examples", None)
        record = {"epoch": len(self.history), "step": state.global_step, "pool": len(self.view.dataset),
                  "kept": len(kept), "kept_ids": [examples[i].id if examples else str(i) for i in kept],
                  "seconds": round(seconds, 3), "scoring_tokens": tokens,
                  **self.policy.log_record()}
        self.history.append(record)
        if args.should_save:
            path = Path(args.output_dir) / LOG_NAME
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w" if record["epoch"] == 0 else "a") as fh:
                fh.write(json.dumps(record) + "\n")


def _same_on_every_rank(kept: list[int]) -> list[int]:
    """Rank 0's rows: scores can differ in the last bits between ranks, the rows trained on must not."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [kept]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return kept


class PruningMixin:
    """Per-epoch pruning for any ``transformers.Trainer`` subclass (put it first in the bases).

    ``prune_policy``: a SLAP policy or a registered name; ``prune_keep``: the share (< 1) or number of pool
    rows each epoch trains on. Without a per-step selection mixin the trainer counts ``examples_trained``
    and ``tokens_trained`` from the rows the view served.
    """

    def __init__(self, *args: Any, prune_policy: SLAPPolicy | str = "slap", prune_keep: float = 0.7,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        policy = get_policy(prune_policy) if isinstance(prune_policy, str) else prune_policy
        self.pruning = EpochPruning(policy, self.train_dataset, self.data_collator, prune_keep,
                                    batch_size=self.args.per_device_eval_batch_size)
        self.train_dataset = self.pruning.view
        self.add_callback(self.pruning)
        self._counts_served_rows = not hasattr(self, "examples_trained")

    def train(self, *args: Any, **kwargs: Any):
        result = super().train(*args, **kwargs)
        if self._counts_served_rows:
            self.examples_trained = self.pruning.view.rows_served
            self.tokens_trained = self.pruning.view.tokens_served
        return result

    def _prepare_inputs(self, inputs):
        # slimtune's collator keeps each row's pool index for non-plain trainers; the model must not see it.
        return super()._prepare_inputs({k: v for k, v in inputs.items() if k != "example_index"})


class PrunedTrainer(PruningMixin, Trainer):
    """``transformers.Trainer`` with per-epoch pruning; see :class:`PruningMixin` for the arguments."""


def train_pruned(examples: Sequence[Example], policy: SLAPPolicy | str = "slap", keep: float = 0.7, *,
                 model: str | None = None, settings: TrainSettings | None = None,
                 trainer_class: type[PruningMixin] = PrunedTrainer,
                 trainer_kwargs: dict[str, Any] | None = None, training_args: Any = None,
                 callbacks: Sequence[Any] | None = None) -> TrainResult:
    """Fine-tune as :func:`slimtune.train.train` does, every epoch on the ``keep`` share of ``examples`` that
    ``policy`` keeps when it scores the pool with the model as it is at that epoch's start.

    ``trainer_class``/``trainer_kwargs``: e.g. ``class X(PruningMixin, SelectiveTrainer)`` with
    ``{"policy": "slap", "keep": 0.5}`` to select per step from the pruned epoch as well;
    ``training_args``, ``callbacks``: the user's, as :func:`slimtune.train.train` takes them.
    """
    return train(examples, model=model, settings=settings, training_args=training_args, callbacks=callbacks,
                 trainer_class=trainer_class,
                 trainer_kwargs={"prune_policy": policy, "prune_keep": keep, **(trainer_kwargs or {})})
