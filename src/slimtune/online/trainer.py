"""Online batch selection inside the Hugging Face Trainer: score B candidates, backpropagate K.

Per micro-batch (UDS, Zou et al. 2025, Algorithm 1, and every online baseline):

    candidates <- the next B rows of the Trainer's own data loader (its sampler, plain training's order)
    signals    <- one no-grad forward, model in eval mode: each row's response loss, and the logits or the
                  last hidden state when the policy needs them (no forward when it needs nothing)
    chosen     <- policy.choose(candidates, K);  policy.observe(candidates[chosen])
    the Trainer's usual forward + backward on the chosen rows only

K is ``keep`` x B when ``keep`` < 1 (rounded, at least 1) and ``keep`` rows when ``keep`` >= 1. The loss on
the chosen rows is the Trainer's own loss on a batch of those rows: their response tokens' mean, exactly as
for a plain batch of K, so learning rates tuned for batches of K carry over.

Selection runs where the Trainer draws its micro-batches (``get_batch_samples``), so everything the Trainer
derives from a batch sees exactly the rows that are trained: the token count that normalises the loss under
gradient accumulation, ``num_input_tokens_seen``, FLOPs and the logged loss. With gradient accumulation every
micro-batch selects its own K independently (the weights do not change inside an accumulation window, so
this is the same as selecting just before each micro-batch's backward); under DDP each rank selects from its
own candidates, with no extra communication. The first ``warmup_steps`` optimiser steps train on whole
candidate batches.

Every candidate batch appends one JSON line to ``output_dir/selection_log.jsonl``
(``selection_log.rank{r}.jsonl`` under DDP), flushed as it goes: the step, every candidate's index, id, loss
and score, the chosen rows and their loss weights. The trainer counts ``examples_trained``,
``tokens_trained`` (non-padding tokens of backpropagated rows), ``candidates_scored``, ``scoring_tokens`` and
``scoring_seconds`` (scoring forward + policy), and writes them, summed over ranks, to
``selection_summary.json``. Every training log line (``Trainer.log``, so whatever ``report_to`` names sees it)
carries this rank's ``selection/kept_share``, ``selection/scoring_seconds`` and ``selection/chosen`` so far.
Policy memories are saved with each checkpoint and restored on resume.

With TRL: ``class SelectiveSFTTrainer(SelectionMixin, SFTTrainer): pass`` (the mixin first). Rows are
identified by an ``example_index`` column when the collator keeps one (slimtune's
``Collator(keep_index=True)`` does), otherwise by their position in the stream, which RHO-loss's reference
table cannot use. Packed or padding-free batches cannot be selected from: selection needs a row per example.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import io
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from slimtune.data.tokenize import IGNORE_INDEX
from slimtune.features.losses import score_losses, token_losses
from slimtune.online import get_policy
from slimtune.online.base import CandidateBatch, Policy
from slimtune.train import TrainResult, TrainSettings, train
from slimtune.utils import atomic_write_bytes, write_json

if TYPE_CHECKING:
    from slimtune.data.example import Example

logger = logging.getLogger(__name__)

#: Signals this trainer's scoring forward computes (see :data:`slimtune.online.base.SIGNALS`).
COMPUTED_SIGNALS = frozenset({"loss", "logits", "logit_factors", "hidden", "ref_loss"})
COUNTERS = ("examples_trained", "tokens_trained", "candidates_scored", "scoring_tokens", "scoring_seconds")
LOG_STEM = "selection_log"


def keep_count(keep: float, candidates: int) -> int:
    """K of a candidate batch of B: ``keep`` x B (rounded, at least 1) if ``keep`` < 1, else ``keep`` rows."""
    if keep <= 0:
        raise ValueError(f"keep must be a positive share (< 1) or count (>= 1), got {keep}")
    k = round(keep * candidates) if keep < 1 else int(keep)
    return min(candidates, max(1, k))


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def response_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """Each row's mean cross-entropy over its response tokens, from logits aligned with ``labels``.

    Only response positions go through the softmax, as one contiguous (tokens, V) block: several times faster
    than a cross-entropy over every padded position in the (B, V, T) layout.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    token = F.cross_entropy(logits[:, :-1][mask].float(), targets[mask], reduction="none")
    rows = torch.arange(len(labels), device=mask.device).unsqueeze(1).expand_as(mask)[mask]
    total = torch.zeros(len(labels), device=token.device).index_add_(0, rows, token)
    return total / mask.sum(1).clamp_min(1)


@torch.no_grad()
def forward_signals(model: torch.nn.Module, batch: dict[str, Tensor], *, logits: bool, hidden: bool,
                    trim_logits: bool) -> dict[str, Tensor]:
    """One no-grad forward: each row's mean response loss, plus the logits (B, T, V) and the last hidden
    state (B, T, H) when asked for.

    Without ``logits``, and when the model takes ``logits_to_keep`` (``trim_logits``), the LM head runs only
    from the batch's first response position on: the prompt's logits would be thrown away, and the head is a
    large share of a small model's forward.
    """
    labels = batch["labels"]
    kwargs: dict[str, Any] = {"output_hidden_states": hidden}
    if not logits and trim_logits:
        response = (labels != IGNORE_INDEX).any(0).nonzero()
        kwargs["logits_to_keep"] = labels.shape[1] - (max(int(response[0]) - 1, 0) if len(response) else 0)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
    signals = {"loss": response_losses(out.logits, labels[:, labels.shape[1] - out.logits.shape[1]:])}
    if logits:
        signals["logits"] = out.logits
    if hidden:
        signals["hidden"] = out.hidden_states[-1]
    return signals


def logits_are_linear(model: torch.nn.Module, batch: dict[str, Tensor]) -> bool:
    """Whether the model's logits are exactly last hidden state @ W.T for its output layer's weight W (no
    bias, scaling or soft-capping), checked on one row of ``batch``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return False
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"][:1], attention_mask=batch["attention_mask"][:1],
                    output_hidden_states=True)
        product = out.hidden_states[-1].float() @ head.weight.float().T
        logits = out.logits.float()
    tolerance = 1e-2 * float(logits.abs().max()) + 1e-3  # bf16 autocast logits stay within this
    return float((product - logits).abs().max()) <= tolerance


def load_reference(spec: str, device: torch.device) -> torch.nn.Module:
    """A reference model: an id or path that ``load_model`` reads, or a PEFT adapter folder (or a slimtune run
    folder holding one in ``adapter/``)."""
    from slimtune.models import load_model

    path = Path(spec)
    if (path / "adapter" / "adapter_config.json").exists():
        path = path / "adapter"
    if (path / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        return AutoPeftModelForCausalLM.from_pretrained(path).to(device).eval()
    return load_model(spec, device=str(device))[0]


def read_selection_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every candidate batch's record in a run's selection log (rank files one after another under DDP)."""
    paths = sorted(Path(run_dir).glob(f"{LOG_STEM}*.jsonl"))
    return [json.loads(line) for path in paths for line in path.read_text().splitlines() if line]


def _floats(values: Tensor) -> list[float | None]:
    return [None if math.isnan(v) else round(v, 6) for v in values.detach().float().cpu().tolist()]


class SelectionMixin:
    """Online batch selection for any ``transformers.Trainer`` subclass (put it first in the bases).

    ``policy``: a :class:`~slimtune.online.base.Policy` or a registered name (``get_policy``);
    ``keep``: a share of each candidate batch (< 1) or a count of rows (>= 1); the candidate batch is the
    Trainer's ``per_device_train_batch_size``; ``warmup_steps``: optimiser steps of plain training first.
    """

    def __init__(self, *args: Any, policy: Policy | str, keep: float = 0.25, warmup_steps: int = 0,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.policy = get_policy(policy) if isinstance(policy, str) else policy
        unsupported = self.policy.needs() - COMPUTED_SIGNALS
        if unsupported:
            raise ValueError(f"policy '{self.policy.name}' needs {sorted(unsupported)}, which the scoring "
                             f"forward does not compute; it computes {sorted(COMPUTED_SIGNALS)}")
        keep_count(keep, 1)
        self.keep = keep
        self.warmup_steps = warmup_steps
        self.examples_trained = self.tokens_trained = self.candidates_scored = self.scoring_tokens = 0
        self.scoring_seconds = 0.0
        self._rows_streamed = 0
        self._ref_losses: Tensor | None = None
        self._log_file = None
        self._trim_logits = accepts_logits_to_keep(self.model)
        self._head_checked = self._head_is_linear = False

    # ---- the selection step -------------------------------------------------------------------------------
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        return super().get_batch_samples(map(self._select, epoch_iterator), num_batches, device)

    def _select(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The chosen rows of one candidate batch, as a batch the Trainer trains on; logs and counts."""
        batch = dict(batch)
        from_dataset = "example_index" in batch
        size = batch["input_ids"].shape[0]
        index = batch.pop("example_index").cpu() if from_dataset else \
            torch.arange(self._rows_streamed, self._rows_streamed + size)
        self._rows_streamed += size
        batch.setdefault("attention_mask", torch.ones_like(batch["input_ids"]))
        ids, tasks = self._describe(index, from_dataset)
        record: dict[str, Any] = {"step": self.state.global_step, "index": index.tolist(), "ids": ids}
        weights = None
        if self.state.global_step < self.warmup_steps:
            chosen = torch.arange(size)
            record["phase"] = "warmup"
        else:
            started = time.perf_counter()
            candidates = self._candidates(batch, index, ids, tasks, from_dataset)
            chosen = self.policy.choose(candidates, keep_count(self.keep, size)).cpu()
            if len(chosen) == 0 or len(set(chosen.tolist())) != len(chosen):
                raise ValueError(f"policy '{self.policy.name}' chose {chosen.tolist()}: "
                                 "it must choose at least one row, each at most once")
            weights = self.policy.weights(candidates)
            scores = self.policy.scores(candidates)
            self.policy.observe(candidates.subset(chosen))
            self.scoring_seconds += time.perf_counter() - started
            record.update(phase="select", loss=_floats(candidates.loss),
                          scores=None if scores is None else _floats(scores))
            if hasattr(self.policy, "log_record"):  # whatever else a policy reports (SLAP: its allocation)
                record["policy"] = self.policy.log_record()
        rows = chosen.sort().values
        record.update(chosen=index[rows].tolist(), chosen_ids=[ids[i] for i in rows.tolist()])
        if weights is not None:
            weights = weights.detach().float().cpu()[rows]
            record["weights"] = _floats(weights)
        self._write(record)
        self.examples_trained += len(rows)
        self.tokens_trained += int(batch["attention_mask"][rows.to(batch["attention_mask"].device)].sum())
        return self._rows(batch, rows, weights)

    def _describe(self, index: Tensor, from_dataset: bool) -> tuple[list[str], list[str]]:
        """Ids and tasks of the rows: from the dataset's Examples (TokenizedDataset), else the indices."""
        examples = getattr(self.train_dataset, "examples", None)
        if from_dataset and examples is not None:
            rows = [examples[i] for i in index.tolist()]
            return [ex.id for ex in rows], [ex.task for ex in rows]
        return [str(i) for i in index.tolist()], ["default"] * len(index)

    def _candidates(self, batch: dict[str, Tensor], index: Tensor, ids: list[str], tasks: list[str],
                    from_dataset: bool) -> CandidateBatch:
        needs = self.policy.needs()
        if "ref_loss" in needs and not from_dataset:
            raise ValueError("reference losses are looked up by dataset index: use a collator that keeps "
                             "`example_index` (slimtune's Collator(keep_index=True))")
        size = len(index)
        labels = batch["labels"]
        signals: dict[str, Tensor] = {"loss": torch.full((size,), math.nan, device=labels.device)}
        extras: dict[str, Any] = {}
        if needs:
            model = self.model_wrapped
            was_training = model.training
            model.eval()  # deterministic scores; dropout would also draw from the training RNG
            try:
                head = self._factor_head(batch) if "logit_factors" in needs else None
                signals = forward_signals(
                    model, batch, logits="logits" in needs or ("logit_factors" in needs and head is None),
                    hidden="hidden" in needs or head is not None, trim_logits=self._trim_logits)
            finally:
                model.train(was_training)
            if head is not None:
                extras["head"] = head
            self.candidates_scored += size
            self.scoring_tokens += int(batch["attention_mask"].sum())
        if "ref_loss" in needs:
            signals["ref_loss"] = self._ref_losses[index].to(signals["loss"].device)
        return CandidateBatch(
            index=index, ids=ids, tasks=tasks, input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"], labels=labels,
            token_count=(labels[:, 1:] != IGNORE_INDEX).sum(1), step=self.state.global_step,
            progress=self.state.global_step / max(1, self.state.max_steps), extras=extras, **signals)

    def _factor_head(self, batch: dict[str, Tensor]) -> Tensor | None:
        """The LM head's weight for ``logit_factors``, or None where the logits are not linear in it (checked
        once, on the first batch)."""
        model = self.accelerator.unwrap_model(self.model)
        if not self._head_checked:
            self._head_checked = True
            self._head_is_linear = logits_are_linear(model, batch)
            if not self._head_is_linear:
                logger.warning("the model's logits are not last hidden state @ head weight; policies asking "
                               "for logit factors get the full logits")
        # Fetched each time rather than kept: a full fine-tune replaces and updates it.
        return model.get_output_embeddings().weight if self._head_is_linear else None

    @staticmethod
    def _rows(batch: dict[str, Any], rows: Tensor, weights: Tensor | None) -> dict[str, Any]:
        """The batch cut to ``rows`` (kept in data-loader order) and to the columns where they have tokens."""
        size, width = batch["input_ids"].shape
        mask = batch["attention_mask"]
        picked = rows.to(mask.device)
        columns = mask[picked].any(0).nonzero().squeeze(1)
        span = slice(int(columns[0]), int(columns[-1]) + 1)
        out = {}
        for key, value in batch.items():
            if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == size:
                value = value[picked.to(value.device)]
                if value.dim() >= 2 and value.shape[1] == width:
                    value = value[:, span]
            out[key] = value
        if weights is not None and not torch.all(weights == 1):
            out["loss_weight"] = weights.to(mask.device)
        return out

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        weight = inputs.pop("loss_weight", None)
        if weight is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        # Per-row weights (InfoBatch's rescaling) on the Trainer's token-sum loss, normalised as it does.
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        losses, mask = token_losses(outputs.logits, labels)
        total = (losses.sum(1) * weight.to(losses.dtype)).sum()
        if num_items_in_batch is not None and self.model_accepts_loss_kwargs:
            loss = total / num_items_in_batch
            if self.args.average_tokens_across_devices:  # the token count was summed over ranks
                loss = loss * self.accelerator.num_processes
        else:
            loss = total / mask.sum()
        return (loss, outputs) if return_outputs else loss

    def _prepare_inputs(self, inputs):
        # Evaluation batches from an index-keeping collator reach the model directly.
        return super()._prepare_inputs({k: v for k, v in inputs.items() if k != "example_index"})

    # ---- the run around it --------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        if resume_from_checkpoint is True:
            # True again when there is none: the Trainer then says why it cannot resume.
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir) or True
        resumed_step = self._load_selection_state(resume_from_checkpoint) \
            if isinstance(resume_from_checkpoint, str) else None
        if "ref_loss" in self.policy.needs() and self._ref_losses is None:
            self._ref_losses = self._reference_losses()
        self._open_log(resumed_step)
        try:
            result = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        finally:
            self._log_file.close()
        self._sum_counters_over_ranks()
        if self.args.should_save:
            write_json(Path(self.args.output_dir) / "selection_summary.json",
                       self.selection_summary(result.metrics.get("train_runtime")))
        return result

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        # Training log lines carry selection so far, so the user's loggers (TensorBoard, W&B, ...) plot it too.
        if not any(key.startswith("eval_") for key in logs):
            logs.update(self.selection_stats())
        super().log(logs, *args, **kwargs)

    def selection_stats(self) -> dict[str, float]:
        """This rank's selection so far: the share of streamed rows kept, scoring seconds, rows chosen."""
        return {"selection/kept_share": self.examples_trained / max(1, self._rows_streamed),
                "selection/scoring_seconds": self.scoring_seconds, "selection/chosen": self.examples_trained}

    def selection_summary(self, train_seconds: float | None = None) -> dict[str, Any]:
        """The policy, its parameters and what the run cost: rows and tokens trained and scored."""
        params = dataclasses.asdict(self.policy) if dataclasses.is_dataclass(self.policy) else {}
        summary = {"policy": self.policy.name, "params": params, "keep": self.keep,
                   "candidates": self.args.per_device_train_batch_size, "warmup_steps": self.warmup_steps,
                   **{name: getattr(self, name) for name in COUNTERS}, "train_seconds": train_seconds}
        if train_seconds:
            summary["scoring_share"] = self.scoring_seconds / self.args.world_size / train_seconds
        return summary

    def _rank_name(self, stem: str, suffix: str) -> str:
        rank = f".rank{self.args.process_index}" if self.args.world_size > 1 else ""
        return f"{stem}{rank}.{suffix}"

    def _open_log(self, resumed_step: int | None) -> None:
        """A fresh log, or on resume the old one without the steps that will run again."""
        path = Path(self.args.output_dir) / self._rank_name(LOG_STEM, "jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resumed_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines(keepends=True)
                    if line.strip() and json.loads(line)["step"] < resumed_step]
        self._log_file = open(path, "w")  # noqa: SIM115 (open for the whole run, closed in train)
        self._log_file.writelines(kept)
        self._log_file.flush()

    def _write(self, record: dict[str, Any]) -> None:
        if self._log_file is not None:
            self._log_file.write(json.dumps(record) + "\n")
            self._log_file.flush()

    def _save_checkpoint(self, model, trial):
        # Written before the Trainer's files, so a checkpoint the Trainer considers complete has it.
        folder = Path(self.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        state = {"policy": self.policy.state_dict(), "rows_streamed": self._rows_streamed,
                 **{name: getattr(self, name) for name in COUNTERS}}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(folder / self._rank_name("selection_state", "pt"), buffer.getvalue())
        super()._save_checkpoint(model, trial)

    def _load_selection_state(self, checkpoint: str) -> int:
        """Restore the policy's memories and the counters; returns the checkpoint's step."""
        path = Path(checkpoint) / self._rank_name("selection_state", "pt")
        if path.exists():
            state = torch.load(path)
            self.policy.load_state_dict(state.pop("policy"))
            self._rows_streamed = state.pop("rows_streamed")
            for name, value in state.items():
                setattr(self, name, value)
        else:
            logger.warning("%s has no selection state: the policy starts with empty memories", checkpoint)
        return json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"]

    def _sum_counters_over_ranks(self) -> None:
        if self.args.world_size <= 1:
            return
        counts = torch.tensor([float(getattr(self, name)) for name in COUNTERS], dtype=torch.float64,
                              device=self.args.device)
        for name, value in zip(COUNTERS, self.accelerator.reduce(counts, reduction="sum").tolist()):
            setattr(self, name, value if name == "scoring_seconds" else int(value))

    def _reference_losses(self) -> Tensor:
        """Every training row's loss under the policy's reference model: computed once (by the main process
        under DDP) and cached in the run folder, keyed by the reference and the rows' tokens."""
        dataset = self.train_dataset
        reference = getattr(self.policy, "reference_model", None)
        digest = hashlib.sha256(json.dumps(reference).encode())
        for i in range(len(dataset)):
            row = dataset[i]
            for name in ("input_ids", "labels"):
                digest.update(np.asarray(row[name], dtype=np.int64).tobytes())
        key = digest.hexdigest()
        path = Path(self.args.output_dir) / "ref_losses.pt"
        with self.args.main_process_first(desc="reference losses"):
            if path.exists():
                cached = torch.load(path)
                if cached["key"] == key:
                    return cached["loss"]
            # None: the model being trained, before training (train() calls this before any checkpoint loads)
            model = self.model if reference is None else load_reference(reference, self.args.device)
            size = self.args.per_device_train_batch_size
            batches = (self.data_collator([dataset[j] for j in range(start, min(start + size, len(dataset)))])
                       for start in range(0, len(dataset), size))
            losses = score_losses(model, batches)[0]
            if self.args.should_save:
                path.parent.mkdir(parents=True, exist_ok=True)
                buffer = io.BytesIO()
                torch.save({"key": key, "loss": losses}, buffer)
                atomic_write_bytes(path, buffer.getvalue())
        return losses


class SelectiveTrainer(SelectionMixin, Trainer):
    """``transformers.Trainer`` with online batch selection; see :class:`SelectionMixin` for the arguments."""


def train_online(examples: Sequence[Example], policy: Policy | str, keep: float = 0.25, *,
                 model: str | None = None, settings: TrainSettings | None = None, warmup_steps: int = 0,
                 trainer_class: type[SelectionMixin] = SelectiveTrainer, training_args: Any = None,
                 callbacks: Sequence[Any] | None = None) -> TrainResult:
    """Fine-tune as :func:`slimtune.train.train` does, backpropagating the K = ``keep`` rows of every
    candidate batch of B = ``settings.batch_size`` that ``policy`` (a Policy or a registered name) chooses.

    ``trainer_class``: another :class:`SelectionMixin` trainer, e.g. one built on TRL's SFTTrainer;
    ``training_args``, ``callbacks``: the user's, as :func:`slimtune.train.train` takes them.
    """
    return train(examples, model=model, settings=settings, training_args=training_args, callbacks=callbacks,
                 trainer_class=trainer_class,
                 trainer_kwargs={"policy": policy, "keep": keep, "warmup_steps": warmup_steps})
