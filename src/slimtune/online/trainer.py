"""Online batch selection inside the Hugging Face Trainer: score B candidates, backpropagate K.

Per micro-batch (UDS, Zou et al. 2025, Algorithm 1, and every online baseline):

    candidates <- the next B rows of the Trainer's own data loader (its sampler, plain training's order)
    signals    <- one no-grad forward, model in eval mode: each row's response loss, and the logits or the
                  last hidden state when the policy needs them (no forward when it needs nothing)
    chosen     <- policy.choose(candidates, K);  policy.observe(candidates[chosen])
    the Trainer's usual forward + backward on the chosen rows only

K is ``keep`` x B when ``keep`` < 1 (rounded half up, at least 1) and ``keep`` rows when ``keep`` >= 1. The loss on
the chosen rows is the Trainer's own loss on a batch of those rows: their response tokens' mean, exactly as
for a plain batch of K, so learning rates tuned for batches of K carry over.

Selection runs where the Trainer draws its micro-batches (``get_batch_samples``), so everything the Trainer
derives from a batch sees exactly the rows that are trained: the token count that normalises the loss under
gradient accumulation, ``num_input_tokens_seen``, FLOPs and the logged loss. With gradient accumulation every
micro-batch selects its own K independently (the weights do not change inside an accumulation window, so
this is the same as selecting just before each micro-batch's backward); under DDP each rank selects from its
own candidates, with no extra communication. With ``global_selection=True`` the K of an optimiser step are
chosen once among the candidates of all its micro-batches on all ranks (from per-row features every rank
gathers, so the choice and the policy's memory are the same everywhere) and re-collated from the training
set into full micro-batches; one process with 16 candidates and two with 8 each choose the same rows. A
failure in one rank's scoring step raises on every rank. The first ``warmup_steps`` optimiser steps train
on whole candidate batches.

With ``stale_scores=True`` no scoring forward runs at all: a step costs exactly what plain training of its K
rows costs (one forward and backward per micro-batch). "Stale" means: a candidate's ``loss`` is the mean
response loss the Trainer's own training forward computed for that row the last time it trained it (taken
from that forward's loss, as InfoBatch's are: :func:`training_row_losses`), so it is the loss under the
parameters of that earlier step, not the current ones; a row the run has not trained yet has loss NaN, and
top-K policies take NaN rows first (in candidate order), so unscored rows are trained, and thereby scored,
before any scored one is preferred. Warm-up steps train whole batches and so score every row they see. Only
policies that read nothing but ``loss`` (and the cached ``ref_loss``) accept it: big-loss, rho-loss,
loss-minus-init, uniform. Under DDP the ranks exchange the losses they recorded at each selection, so every
rank reads the same stale losses.

Every candidate batch (every step, written by rank 0, under global selection) appends one JSON line to
``output_dir/selection_log.jsonl`` (``selection_log.rank{r}.jsonl`` under DDP), flushed as it goes: the
step, every candidate's index, id, loss and score, the chosen rows and their loss weights. The trainer
counts ``examples_trained``, ``tokens_trained`` (non-padding tokens of backpropagated rows),
``candidates_scored``, ``scoring_tokens`` and ``scoring_seconds`` (scoring forward + policy), and writes
them, summed over ranks, to ``selection_summary.json``. Every training log line (``Trainer.log``, so whatever
``report_to`` names sees it) carries this rank's ``selection/kept_share``, ``selection/scoring_seconds`` and
``selection/chosen`` so far. Policy memories are saved with each checkpoint and restored on resume: one file
per rank, or under global selection one file for the run (the memories are the same on every rank), so such a
run resumes at another world size (e.g. 2 ranks x 8 candidates as 1 rank x 2 micro-batches of 8) and goes on
choosing what the uninterrupted run chose.

With TRL: ``class SelectiveSFTTrainer(SelectionMixin, SFTTrainer): pass`` (the mixin first). The mixin
overrides no loss: the chosen rows reach the parent's ``training_step`` and ``compute_loss`` (TRL's metrics,
``use_cache=False``, ``compute_loss_func`` and collectives included) as an ordinary, smaller batch (where a
policy learns from the training losses, a model's transformers cross-entropy is taken token by token, with the
same value and gradient, to read each row's share of it). Per-row loss weights (InfoBatch's rescaling) ride
on the batch and are applied by :func:`row_weighted_gradients` to each row's gradient at the model's last
hidden state, which is the gradient of the weighted loss for every parameter below the output layer, whatever
loss the parent computes (the logged loss stays unweighted). Rows
are identified by their index in the training set: the mixin adds an ``example_index`` column where the data
set lacks one and puts it back into batches whose collator drops unknown keys (TRL's); logged ids are the
data set's ``id`` column (or its Examples' ids), else the index.

Packed and padding-free batches are refused, not handled: selection scores and keeps whole rows, and a row
that holds several examples (position ids restarting inside it, ``cu_seq_lens``) cannot be chosen alone. The
trainer raises before the first step (TRL's ``packing``/``padding_free`` already at construction). A batch
without an attention mask trains without one: the trainer never adds a mask, which would make the model
attend across whatever the row holds; the scoring forward treats every token of such a row as real.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from transformers import Trainer
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from slimtune.data import as_examples
from slimtune.data.tokenize import IGNORE_INDEX
from slimtune.features.losses import accepts_logits_to_keep, score_losses
from slimtune.online import get_policy
from slimtune.online.base import CandidateBatch, Policy
from slimtune.train import TrainResult, TrainSettings, train
from slimtune.utils import atomic_write_text, checked_problem, write_checked, write_json

if TYPE_CHECKING:
    from slimtune.data.example import Example

logger = logging.getLogger(__name__)

#: Signals this trainer's scoring forward computes (see :data:`slimtune.online.base.SIGNALS`).
COMPUTED_SIGNALS = frozenset({"loss", "logits", "logit_factors", "hidden", "ref_loss"})
#: What stale mode can hand a policy without a forward: the training forward's losses and cached references.
STALE_SIGNALS = frozenset({"loss", "ref_loss"})
COUNTERS = ("examples_trained", "tokens_trained", "candidates_scored", "scoring_tokens", "scoring_seconds")
LOG_STEM = "selection_log"


def keep_count(keep: float, candidates: int) -> int:
    """K of a candidate batch of B: ``keep`` x B (rounded half up, at least 1) if ``keep`` < 1, else ``keep``
    rows. Half up, not Python's half-to-even: keep 0.25 of 10 keeps 3, as a user reading "a quarter" expects."""
    if keep <= 0:
        raise ValueError(f"keep must be a positive share (< 1) or count (>= 1), got {keep}")
    k = math.floor(keep * candidates + 0.5) if keep < 1 else int(keep)
    return min(candidates, max(1, k))


PACKING_FLAGS = ("packing", "padding_free")


def packing_refusal(batch: dict[str, Any]) -> str | None:
    """Why ``batch`` is packed (several examples in one row), or None for one example per row."""
    lengths = sorted(key for key in batch if key.startswith("cu_seq"))
    if lengths:
        return f"it carries {lengths}"
    positions = batch.get("position_ids")
    if positions is not None and positions.shape[1] > 1:
        mask = batch.get("attention_mask")
        restarts = positions[:, 1:] <= positions[:, :-1]
        if mask is not None:
            restarts &= mask[:, 1:].bool().to(restarts.device)
        if restarts.any():
            return "its position_ids restart inside a row"
    return None


def refuse_packing(reason: str) -> None:
    raise ValueError(f"online selection chooses whole rows, one example each, but the training batch is packed "
                     f"({reason}): a row holding several examples cannot be scored or chosen alone. Turn packing "
                     "and padding-free batching off (TRL: SFTConfig(packing=False, padding_free=False)); "
                     "slimtune's Collator pads one example per row.")


ROW_WEIGHTS = "loss_weight"


@contextmanager
def row_weighted_gradients(model: torch.nn.Module, weights: Tensor | None) -> Iterator[None]:
    """Within the block, each forward's row i passes back w_i times its gradient at the model's last hidden
    state: the gradient of sum_i w_i loss_i for every parameter below the output layer, composed with any loss
    the caller computes (rows do not interact in a causal LM's forward). An output layer that trains itself
    would keep its unweighted gradient, so it is refused."""
    if weights is None:
        yield
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if head is not None and head.weight.requires_grad:
        raise ValueError("per-row loss weights (InfoBatch's rescaling) are applied at the last hidden state, "
                         "which leaves a trainable output layer's own gradient unweighted: freeze the LM head "
                         "(LoRA does) or use a policy without row weights")

    def weigh(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        if hidden.requires_grad:
            hidden.register_hook(lambda grad: grad * weights.to(grad).view(-1, *[1] * (grad.dim() - 1)))

    handle = base.get_decoder().register_forward_hook(weigh)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def training_row_losses(model: torch.nn.Module, receive: Any | None) -> Iterator[None]:
    """Within the block, each grad-enabled forward of ``model`` hands ``receive`` its rows' mean response
    losses, read off the forward's own loss computation: the signal InfoBatch keeps, at no extra forward.

    Where the model's loss is transformers' causal-LM cross-entropy (every ``...ForCausalLM`` model's unless
    replaced), the block swaps in the same loss taken token by token (:func:`row_reporting_causal_lm_loss`),
    whose rows' means then cost a sum over each row. Elsewhere they are read off the forward's output (the
    logits, or the per-token log-probabilities of TRL's fused head), which costs a second log-softmax over the
    vocabulary at every response position: 0.37 CPU s a step of 8 GSM8K rows with a 49k vocabulary, which put
    an unpruned InfoBatch step at 1.16x a plain one on the 2-layer test model and 1.04x on a 4-layer SmolLM2
    (benchmarks/infobatch_profile.py)."""
    if receive is None:
        yield
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, "loss_function", None) is ForCausalLMLoss:
        own = base.__dict__.get("_loss_function")  # set on the instance (by the user), else the class's default
        base.loss_function = row_reporting_causal_lm_loss(receive)
        try:
            yield
        finally:
            if own is None:
                del base._loss_function
            else:
                base.loss_function = own
        return

    def read(module, args, kwargs, output):
        labels = kwargs.get("labels")
        if not torch.is_grad_enabled() or labels is None:
            return
        logits = getattr(output, "logits", None)
        if logits is not None:
            receive(response_losses(logits.detach(), labels[:, labels.shape[1] - logits.shape[1]:]))
        elif getattr(output, "log_probs", None) is not None:
            mask = output.label_mask
            receive(-(output.log_probs.detach() * mask).sum(1) / mask.sum(1).clamp_min(1))
        else:
            raise ValueError("the policy learns from the training forward's per-row losses, but the model's "
                             "output has neither logits nor per-token log-probabilities")

    handle = model.register_forward_hook(read, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def row_reporting_causal_lm_loss(receive: Any):
    """transformers' ``ForCausalLMLoss`` (the same value, and the same gradient: the cross-entropy is one
    ``cross_entropy`` over every position either way) that, in a grad-enabled forward, also hands ``receive``
    each row's mean loss over its labelled tokens. Its per-token losses are summed rather than reduced inside
    ``cross_entropy``, so the loss may differ from the original in its last float bits."""

    def loss(logits: Tensor, labels: Tensor, vocab_size: int, num_items_in_batch: Tensor | int | None = None,
             ignore_index: int = IGNORE_INDEX, shift_labels: Tensor | None = None, **kwargs: Any) -> Tensor:
        if shift_labels is None:
            shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        shift_labels = shift_labels.to(logits.device)
        token = torch.nn.functional.cross_entropy(logits.float().reshape(-1, vocab_size), shift_labels.reshape(-1),
                                                  ignore_index=ignore_index, reduction="none")
        token = token.view(shift_labels.shape)
        counted = shift_labels != ignore_index
        if torch.is_grad_enabled():
            receive(token.detach().sum(-1) / counted.sum(-1).clamp_min(1))
        if num_items_in_batch is None:  # the original's reduction="mean"
            return token.sum() / counted.sum()
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(token.device)
        return token.sum() / num_items_in_batch

    return loss


class IndexKeepingCollator:
    """A collator that puts each row's ``example_index`` back into the batch where the wrapped one drops
    columns it does not know (TRL's ``DataCollatorForLanguageModeling`` does)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(rows)
        if "example_index" not in batch and rows and "example_index" in rows[0]:
            batch["example_index"] = torch.tensor([int(row["example_index"]) for row in rows])
        return batch


class IndexedRows(torch.utils.data.Dataset):
    """A map-style data set whose rows also carry their position as ``example_index``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.dataset[i], "example_index": i}


def with_example_index(dataset):
    """``dataset`` with an ``example_index`` column (a Hugging Face Dataset) or field (a map-style one)."""
    import datasets

    if isinstance(dataset, datasets.Dataset):
        if "example_index" in dataset.column_names:
            return dataset
        return dataset.add_column("example_index", list(range(len(dataset))))
    if dataset is None or not hasattr(dataset, "__len__") or len(dataset) == 0 \
            or "example_index" in dataset[0]:
        return dataset
    return IndexedRows(dataset)


def response_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """Each row's mean cross-entropy over its response tokens, from logits aligned with ``labels``."""
    return row_losses(response_log_probs(logits, labels), labels)


def response_log_probs(logits: Tensor, labels: Tensor) -> Tensor:
    """The log-softmax at the response positions, (N, V), row by row, from logits aligned with ``labels``.

    Only response positions go through the softmax, as one contiguous (tokens, V) block: several times faster
    than a cross-entropy over every padded position in the (B, V, T) layout.
    """
    return torch.log_softmax(at_response_positions(logits, labels).float(), dim=-1)


def at_response_positions(values: Tensor, labels: Tensor) -> Tensor:
    """(N, ...): ``values`` (B, T, ...) at the positions whose next label is a response token, row by row."""
    return values[:, :-1][labels[:, 1:] != IGNORE_INDEX]


def row_losses(log_probs: Tensor, labels: Tensor) -> Tensor:
    """Each row's mean cross-entropy over its response tokens, from their :func:`response_log_probs`."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    token = -log_probs.gather(1, targets[mask].unsqueeze(1)).squeeze(1)
    rows = torch.arange(len(labels), device=mask.device).unsqueeze(1).expand_as(mask)[mask]
    total = torch.zeros(len(labels), device=token.device).index_add_(0, rows, token)
    return total / mask.sum(1).clamp_min(1)


@torch.no_grad()
def forward_signals(model: torch.nn.Module, batch: dict[str, Tensor], *, logits: bool, hidden: bool,
                    trim_logits: bool, log_probs: bool = False, head: Tensor | None = None) -> dict[str, Tensor]:
    """One no-grad forward: each row's mean response loss, plus the logits (B, T, V), the last hidden state
    (B, T, H) and the loss's own log-softmax at the response positions (``response_log_probs``, N x V) when
    asked for.

    Without ``logits``, and when the model takes ``logits_to_keep`` (``trim_logits``), the LM head runs only
    from the batch's first response position on: the prompt's logits would be thrown away, and the head is a
    large share of a small model's forward. Given ``head``, the output layer's weight where the logits are
    exactly last hidden state @ head.T, it runs on the response positions alone, as that product: no
    (B, T, V) logits exist, and the prompts and padding of rows with shorter ones cost no head product.
    """
    labels = batch["labels"]
    factored = head is not None and not logits and trim_logits
    kwargs: dict[str, Any] = {"output_hidden_states": hidden or factored}
    if factored:
        kwargs["logits_to_keep"] = 1  # the model's own head on one position; the response's are taken below
    elif not logits and trim_logits:
        response = (labels != IGNORE_INDEX).any(0).nonzero()
        kwargs["logits_to_keep"] = labels.shape[1] - (max(int(response[0]) - 1, 0) if len(response) else 0)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
    if factored:
        last = out.hidden_states[-1]
        aligned = labels
        response = torch.log_softmax((at_response_positions(last, labels) @ head.to(last.dtype).T).float(), dim=-1)
    else:
        aligned = labels[:, labels.shape[1] - out.logits.shape[1]:]
        response = response_log_probs(out.logits, aligned)
    signals = {"loss": row_losses(response, aligned)}
    if log_probs:
        signals["response_log_probs"] = response
    if logits:
        signals["logits"] = out.logits
    if hidden:
        signals["hidden"] = out.hidden_states[-1]
    return signals


def output_layer(model: torch.nn.Module) -> torch.nn.Module | None:
    """The model's LM head, through DDP, FSDP, DeepSpeed and PEFT wrappers."""
    from accelerate.utils import extract_model_from_parallel

    base = extract_model_from_parallel(model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    return base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None


def full_head_weight(model: torch.nn.Module) -> Tensor:
    """The LM head's whole (V, H) weight on every rank: the parameter itself where it is whole; gathered, as a
    detached copy, where FSDP2 (a DTensor), FSDP1 (a flat shard) or ZeRO-3 (an empty placeholder outside the
    forward) shards it. Sharded, it is a collective: every rank must call it at the same point."""
    head = output_layer(model)
    weight = head.weight
    if hasattr(weight, "full_tensor"):  # FSDP2 (fully_shard)
        return weight.full_tensor().detach()
    if hasattr(weight, "ds_id"):  # DeepSpeed ZeRO-3
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
            return weight.detach().clone()
    from torch.distributed.fsdp import FullyShardedDataParallel

    owners = [unit for unit in model.modules() if isinstance(unit, FullyShardedDataParallel)
              and any(inner is head for inner in unit.modules())]
    if owners:  # FSDP1: the innermost unit that holds the head (modules() lists outer units first)
        with FullyShardedDataParallel.summon_full_params(owners[-1], writeback=False, recurse=False):
            return head.weight.detach().clone()
    return weight


def logits_are_linear(model: torch.nn.Module, batch: dict[str, Tensor], weight: Tensor | None = None) -> bool:
    """Whether the model's logits are exactly last hidden state @ W.T for its output layer's weight W (no
    bias, scaling or soft-capping), checked on one row of ``batch``. ``model`` may be the wrapped (sharded)
    model, which runs the forward; ``weight``: W as :func:`full_head_weight` gives it (gathered if None)."""
    head = output_layer(model)
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return False
    weight = full_head_weight(model) if weight is None else weight
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"][:1], attention_mask=batch["attention_mask"][:1],
                    output_hidden_states=True)
        product = out.hidden_states[-1].float() @ weight.float().T
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
    """Every candidate batch's record in a run's selection log, step by step (under DDP a step's records rank
    by rank; a run resumed at another world size continues in other rank files)."""
    paths = sorted(Path(run_dir).glob(f"{LOG_STEM}*.jsonl"))
    records = [json.loads(line) for path in paths for line in path.read_text().splitlines() if line]
    return sorted(records, key=lambda record: record["step"])


def _log_lines_before(path: Path, step: int | None) -> list[str]:
    """The lines of the selection log ``path`` for steps before ``step`` (none when ``step`` is None)."""
    if step is None or not path.exists():
        return []
    return [line for line in path.read_text().splitlines(keepends=True)
            if line.strip() and json.loads(line)["step"] < step]


def _join(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Row features of several batches, name by name: tensors concatenated, lists chained."""
    return {name: torch.cat([part[name] for part in parts]) if torch.is_tensor(parts[0][name])
            else [item for part in parts for item in part[name]] for name in parts[0]}


def _floats(values: Tensor) -> list[float | None]:
    return [None if math.isnan(v) else round(v, 6) for v in values.detach().float().cpu().tolist()]


class SelectionMixin:
    """Online batch selection for any ``transformers.Trainer`` subclass (put it first in the bases).

    ``policy``: a :class:`~slimtune.online.base.Policy` or a registered name (``get_policy``);
    ``keep``: a share of each candidate batch (< 1) or a count of rows (>= 1); the candidate batch is the
    Trainer's ``per_device_train_batch_size``; ``warmup_steps``: optimiser steps of plain training first;
    ``max_length``: training's token limit, for policies whose ``max_length`` is left unset (UDS's sketch); by
    default TRL's ``args.max_length``, else the longest training row.
    """

    def __init__(self, *args: Any, policy: Policy | str, keep: float = 0.25, warmup_steps: int = 0,
                 max_length: int | None = None, global_selection: bool = False, stale_scores: bool = False,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.policy = get_policy(policy) if isinstance(policy, str) else policy
        self.train_dataset = with_example_index(self.train_dataset)
        self.data_collator = IndexKeepingCollator(self.data_collator)
        column_names = getattr(self.train_dataset, "column_names", None) or ()
        self._row_ids = list(self.train_dataset["id"]) if "id" in column_names else None
        if getattr(self.policy, "requires_reference", False) and self.policy.reference_model is None:
            raise ValueError(f"policy '{self.policy.name}' needs an irreducible-loss model trained on held-out "
                             "rows the run never trains on: pass reference_model=..., or let train_online carve "
                             "the held-out split and train it. The score against the model before training is "
                             "policy 'loss-minus-init'.")
        packing = [flag for flag in PACKING_FLAGS if getattr(self.args, flag, False)]
        if packing:
            refuse_packing(f"the arguments set {packing}")
        if getattr(self.policy, "max_length", 0) is None:
            self.policy.max_length = max_length or getattr(self.args, "max_length", None) or max(
                len(self.train_dataset[i]["input_ids"]) for i in range(len(self.train_dataset)))
        unsupported = self.policy.needs() - COMPUTED_SIGNALS
        if unsupported:
            raise ValueError(f"policy '{self.policy.name}' needs {sorted(unsupported)}, which the scoring "
                             f"forward does not compute; it computes {sorted(COMPUTED_SIGNALS)}")
        keep_count(keep, 1)
        self.keep = keep
        self.warmup_steps = warmup_steps
        self.global_selection = global_selection
        self.stale_scores = stale_scores
        if stale_scores and not self.policy.needs() <= STALE_SIGNALS:
            raise ValueError(f"policy '{self.policy.name}' needs {sorted(self.policy.needs() - STALE_SIGNALS)}, "
                             "which the training forward does not leave behind: stale_scores=True serves only "
                             f"{sorted(STALE_SIGNALS)} (big-loss, rho-loss, loss-minus-init, uniform)")
        # Each training row's loss at its last training forward (NaN: not trained yet); the (index, loss)
        # pairs this rank recorded since the ranks last exchanged theirs.
        self._stale_loss = torch.full((len(self.train_dataset),), math.nan) if stale_scores else None
        self._stale_news: list[tuple[Tensor, Tensor]] = []
        if global_selection and (type(self.policy).row_features is Policy.row_features
                                 or self.policy.sets_own_budget):
            raise ValueError(f"policy '{self.policy.name}' chooses per candidate batch; global selection needs a "
                             "policy with row_features and choose_pooled (uniform, big-loss, grad-norm, rho-loss, "
                             "loss-minus-init, uds, slap)")
        self.examples_trained = self.tokens_trained = self.candidates_scored = self.scoring_tokens = 0
        self.scoring_seconds = 0.0
        self._rows_streamed = 0
        self._ref_losses: Tensor | None = None
        self._log_file = None
        self._trim_logits = accepts_logits_to_keep(self.model)
        self._head_checked = self._head_is_linear = False
        self._gathered_head: Tensor | None = None

    # ---- the selection step -------------------------------------------------------------------------------
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if self.global_selection and self.state.global_step >= self.warmup_steps:
            batches = list(itertools.islice(epoch_iterator, num_batches))
            return super().get_batch_samples(iter(self._select_globally(batches) if batches else []),
                                             num_batches, device)
        return super().get_batch_samples(map(self._select, epoch_iterator), num_batches, device)

    def _select_globally(self, batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Global selection: the K rows of one optimiser step chosen among the candidates of all its
        micro-batches on all ranks, the same on every rank, re-collated from the training set into full
        micro-batches (K / (ranks x micro-batches) rows each, chosen rows in pooled order)."""
        started = time.perf_counter()
        self._share_stale_losses()
        local: list[tuple[Tensor, dict[str, Tensor], Tensor]] = []
        failure = None
        try:
            for batch in batches:
                batch = dict(batch)
                if "example_index" not in batch:
                    raise ValueError("global selection re-collates the chosen rows from the training set: the "
                                     "batches must carry `example_index` (a map-style training set)")
                index = batch.pop("example_index").cpu()
                reason = packing_refusal(batch)
                if reason:
                    refuse_packing(reason)
                mask = batch.get("attention_mask")
                mask = torch.ones_like(batch["input_ids"]) if mask is None else mask
                ids, tasks = self._describe(index, True)
                candidates = self._candidates({**batch, "attention_mask": mask}, index, ids, tasks, True)
                features = self.policy.row_features(candidates)
                local.append((index, {name: value.detach().cpu() if torch.is_tensor(value) else list(value)
                                      for name, value in features.items()},
                              candidates.loss.detach().float().cpu()))
        except Exception as error:  # re-raised below, on every rank
            failure = error
        self._raise_on_every_rank(failure)
        mine = (torch.cat([part[0] for part in local]), _join([part[1] for part in local]),
                torch.cat([part[2] for part in local]))
        self._rows_streamed += len(mine[0])
        pooled = [mine]
        if self.args.world_size > 1:
            pooled = [None] * self.args.world_size
            torch.distributed.all_gather_object(pooled, mine)
        index = torch.cat([part[0] for part in pooled])
        features = _join([part[1] for part in pooled])
        parts = self.args.world_size * len(batches)
        k = min(len(index), keep_count(self.keep, len(index)) if self.keep < 1 else int(self.keep) * parts)
        if k < parts:
            raise ValueError(f"global selection trains K={k} rows as {parts} micro-batches (ranks x gradient "
                             "accumulation) of at least one row: raise keep")
        chosen = self.policy.choose_pooled(features, k).cpu()
        if len(set(chosen.tolist())) != len(chosen):
            raise ValueError(f"policy '{self.policy.name}' chose a row twice: {chosen.tolist()}")
        rows = index[chosen.sort().values]
        self.scoring_seconds += time.perf_counter() - started
        if self.args.process_index == 0:
            ids = self._describe(index, True)[0]
            scores = getattr(self.policy, "_last_scores", None)
            self._write({"step": self.state.global_step, "index": index.tolist(), "ids": ids,
                         "phase": "select-global", "loss": _floats(torch.cat([part[2] for part in pooled])),
                         "scores": None if scores is None else _floats(scores), "chosen": rows.tolist(),
                         "chosen_ids": self._describe(rows, True)[0],
                         **({"policy": self.policy.log_record()} if hasattr(self.policy, "log_record") else {})})
        shares = torch.tensor_split(rows, parts)[self.args.process_index * len(batches):][:len(batches)]
        # Rows by example_index, an index into the pool: a view over the pool (a pruned epoch's PrunedView, a
        # torch Subset) holds pool rows at other positions, so read the pool under it.
        pool = getattr(self.train_dataset, "dataset", self.train_dataset)
        out = [self.data_collator([pool[i] for i in share.tolist()]) for share in shares]
        for batch in out:
            self.examples_trained += len(batch["input_ids"])
            mask = batch.get("attention_mask")
            self.tokens_trained += int(batch["input_ids"].numel() if mask is None else mask.sum())
        return out

    def _select(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The chosen rows of one candidate batch, as a batch the Trainer trains on; logs and counts."""
        self._share_stale_losses()
        batch = dict(batch)
        from_dataset = "example_index" in batch
        size = batch["input_ids"].shape[0]
        index = batch.pop("example_index").cpu() if from_dataset else \
            torch.arange(self._rows_streamed, self._rows_streamed + size)
        self._rows_streamed += size
        reason = packing_refusal(batch)
        if reason:
            refuse_packing(reason)
        mask = batch.get("attention_mask")
        if mask is None:  # every token is real; the batch itself stays without a mask (see the module's doc)
            mask = torch.ones_like(batch["input_ids"])
        ids, tasks = self._describe(index, from_dataset)
        record: dict[str, Any] = {"step": self.state.global_step, "index": index.tolist(), "ids": ids}
        weights = None
        if self.state.global_step < self.warmup_steps:
            chosen = torch.arange(size)
            record["phase"] = "warmup"
        else:
            started = time.perf_counter()
            failure = None
            try:
                candidates = self._candidates({**batch, "attention_mask": mask}, index, ids, tasks, from_dataset)
                chosen = self.policy.choose(candidates, keep_count(self.keep, size)).cpu()
                if len(chosen) == 0 or len(set(chosen.tolist())) != len(chosen):
                    raise ValueError(f"policy '{self.policy.name}' chose {chosen.tolist()}: "
                                     "it must choose at least one row, each at most once")
                weights = self.policy.weights(candidates)
                scores = self.policy.scores(candidates)
                self.policy.observe(candidates.subset(chosen))
            except Exception as error:  # re-raised below, on every rank
                failure = error
            self._raise_on_every_rank(failure)
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
        self.tokens_trained += int(mask[rows.to(mask.device)].sum())
        out = self._rows(batch, mask, rows, weights)
        if from_dataset:  # for a policy fed the training forward's losses (InfoBatch); the model never sees it
            out["example_index"] = index[rows]
        return out

    def _raise_on_every_rank(self, failure: Exception | None) -> None:
        """Raise ``failure`` here and an error naming it on every other rank: a rank left alone would wait
        for the failed one in the backward's collective until the process group times out. One all-reduce of
        a flag per step; the messages travel only when something failed."""
        if self.args.world_size > 1:
            flag = torch.tensor([float(failure is not None)], device=self.args.device)
            if self.accelerator.reduce(flag, reduction="sum").item() > 0:
                messages: list[str | None] = [None] * self.args.world_size
                torch.distributed.all_gather_object(
                    messages, None if failure is None else f"{type(failure).__name__}: {failure}")
                if failure is None:
                    failed = "; ".join(f"rank {rank}: {message}" for rank, message in enumerate(messages)
                                       if message is not None)
                    raise RuntimeError(f"online selection failed on another rank, so this one stops too "
                                       f"({failed})")
        if failure is not None:
            raise failure

    def _describe(self, index: Tensor, from_dataset: bool) -> tuple[list[str], list[str]]:
        """Ids and tasks of the rows: from the dataset's Examples (TokenizedDataset), else the indices."""
        examples = getattr(self.train_dataset, "examples", None)
        if from_dataset and examples is not None:
            rows = [examples[i] for i in index.tolist()]
            return [ex.id for ex in rows], [ex.task for ex in rows]
        if from_dataset and self._row_ids is not None:
            return [str(self._row_ids[i]) for i in index.tolist()], ["default"] * len(index)
        return [str(i) for i in index.tolist()], ["default"] * len(index)

    def _candidates(self, batch: dict[str, Tensor], index: Tensor, ids: list[str], tasks: list[str],
                    from_dataset: bool) -> CandidateBatch:
        needs = self.policy.needs()
        if ("ref_loss" in needs or self.stale_scores) and not from_dataset:
            raise ValueError("reference and stale losses are looked up by dataset index: use a collator that "
                             "keeps `example_index` (slimtune's Collator(keep_index=True))")
        size = len(index)
        labels = batch["labels"]
        signals: dict[str, Tensor] = {"loss": torch.full((size,), math.nan, device=labels.device)}
        extras: dict[str, Any] = {}
        if needs and self.stale_scores:
            signals["loss"] = self._stale_loss[index].to(labels.device)
            self.candidates_scored += size
        elif needs:
            model = self.model_wrapped
            was_training = model.training
            model.eval()  # deterministic scores; dropout would also draw from the training RNG
            try:
                head = self._factor_head(batch) if "logit_factors" in needs else None
                signals = forward_signals(
                    model, batch, logits="logits" in needs or ("logit_factors" in needs and head is None),
                    hidden="hidden" in needs or head is not None, trim_logits=self._trim_logits,
                    log_probs="logit_factors" in needs, head=head)
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
        """The LM head's whole weight for ``logit_factors`` (gathered where FSDP or ZeRO-3 shards it), or None
        where the logits are not linear in it (checked once, on the first batch)."""
        model = self.model_wrapped  # the forward and the gather run through whatever wraps the model
        if not self._head_checked:
            self._head_checked = True
            self._head_is_linear = logits_are_linear(model, batch)
            if not self._head_is_linear:
                logger.warning("the model's logits are not last hidden state @ head weight; policies asking "
                               "for logit factors get the full logits")
        if not self._head_is_linear:
            return None
        if self._gathered_head is not None:
            return self._gathered_head
        # Fetched each time rather than kept: a full fine-tune replaces and updates it.
        weight = full_head_weight(model)
        layer = output_layer(model)
        if weight is not layer.weight and not layer.weight.requires_grad:
            self._gathered_head = weight  # a sharded frozen head (LoRA): one gather for the run
        return weight

    @staticmethod
    def _rows(batch: dict[str, Any], mask: Tensor, rows: Tensor, weights: Tensor | None) -> dict[str, Any]:
        """The batch cut to ``rows`` (kept in data-loader order) and to the columns where they have tokens
        (``mask``: the real tokens)."""
        size, width = batch["input_ids"].shape
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
            out[ROW_WEIGHTS] = weights.to(mask.device)
        return out

    def training_step(self, model, inputs, *args, **kwargs):
        weights = inputs.pop(ROW_WEIGHTS, None)
        index = inputs.pop("example_index", None)
        unwrapped = self.accelerator.unwrap_model(self.model)
        receivers = [receive for receive in (getattr(self.policy, "record_training_losses", None),
                                             self._record_stale_losses if self.stale_scores else None) if receive]
        with row_weighted_gradients(unwrapped, weights), \
                training_row_losses(unwrapped, None if not receivers or index is None
                                    else lambda losses: [receive(index, losses) for receive in receivers]):
            return super().training_step(model, inputs, *args, **kwargs)

    def _record_stale_losses(self, index: Tensor, losses: Tensor) -> None:
        index, losses = index.cpu(), losses.detach().float().cpu()
        self._stale_loss[index] = losses
        if self.args.world_size > 1:
            self._stale_news.append((index, losses))

    def _share_stale_losses(self) -> None:
        """Every rank's newly recorded training losses, on every rank: a row trained on one rank may be a
        candidate on another (global selection repacks rows; each epoch's sampler deals them anew). Called at
        the same points on every rank (each selection, each checkpoint)."""
        if not self.stale_scores or self.args.world_size <= 1:
            return
        news: list[list[tuple[Tensor, Tensor]] | None] = [None] * self.args.world_size
        torch.distributed.all_gather_object(news, self._stale_news)
        self._stale_news = []
        for rank_news in news:  # rank order: a row trained on two ranks at once keeps the later rank's loss
            for index, losses in rank_news:
                self._stale_loss[index] = losses

    def _get_train_sampler(self, train_dataset=None):
        # A policy that prunes whole epochs (InfoBatch) decides which rows the Trainer's data loader draws.
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if not hasattr(self.policy, "sampler"):
            return super()._get_train_sampler(train_dataset)
        rows_per_step = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps \
            * self.args.world_size
        epochs = math.ceil(self.args.num_train_epochs) if self.args.max_steps <= 0 else \
            math.ceil(self.args.max_steps / math.ceil(len(dataset) / rows_per_step))
        return self.policy.sampler(len(dataset), epochs, rows_per_step, self.args.device)

    def _set_signature_columns_if_needed(self):
        # The Trainer drops a Hugging Face Dataset's columns its model does not take; the index must stay.
        super()._set_signature_columns_if_needed()
        if "example_index" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "example_index"]

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
        self._share_stale_losses()  # the last step's, which no later selection exchanged
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

    def _rank_name(self, stem: str, suffix: str, rank: int | None = None) -> str:
        rank = self.args.process_index if rank is None else rank
        return f"{stem}.rank{rank}.{suffix}" if self.args.world_size > 1 else f"{stem}.{suffix}"

    def _open_log(self, resumed_step: int | None) -> None:
        """A fresh log, or on resume the old one without the steps that will run again. The main process also
        cuts those steps from the logs of ranks a run at another world size left behind."""
        path = Path(self.args.output_dir) / self._rank_name(LOG_STEM, "jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = _log_lines_before(path, resumed_step)
        if resumed_step is not None and self.args.process_index == 0:
            ours = {self._rank_name(LOG_STEM, "jsonl", rank) for rank in range(self.args.world_size)}
            for other in path.parent.glob(f"{LOG_STEM}*.jsonl"):
                if other.name not in ours:
                    atomic_write_text(other, "".join(_log_lines_before(other, resumed_step)))
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
        self._share_stale_losses()
        counts = {"rows_streamed": self._rows_streamed, **{name: getattr(self, name) for name in COUNTERS}}
        if self.global_selection:  # every rank's counts in one file, for a run at any world size to go on from
            counts = self._summed_over_ranks(counts)
        state = {"policy": self.policy.state_dict(), **counts}
        if self.stale_scores:
            state["stale_loss"] = self._stale_loss
        if not self.global_selection or self.args.process_index == 0:
            buffer = io.BytesIO()
            torch.save(state, buffer)
            write_checked(folder / self._state_name(), buffer.getvalue())
        super()._save_checkpoint(model, trial)

    def _state_name(self) -> str:
        """The checkpoint file of this rank's selection state. Under global selection the policy's state is the
        same on every rank, so the main process writes it once, without a rank in its name, for a run resumed
        at any world size to read."""
        return "selection_state.pt" if self.global_selection else self._rank_name("selection_state", "pt")

    def _load_selection_state(self, checkpoint: str) -> int:
        """Restore the policy's memories and the counters; returns the checkpoint's step. Under global
        selection the main process takes the run's counts so far and the other ranks start theirs from 0, so
        their sum at the end is the run's whatever the world size."""
        path = Path(checkpoint) / self._state_name()
        if path.exists():
            damage = checked_problem(path)  # weights_only refuses code, not a changed number
            if damage is not None:
                raise ValueError(f"{damage}: the policy's memories cannot be restored from it; resume from an "
                                 f"earlier checkpoint (delete {Path(checkpoint).name}) or start the run afresh")
            state = torch.load(path, weights_only=True)  # plain tensors and numbers: no code unpickled
            self.policy.load_state_dict(state.pop("policy"))
            if "stale_loss" in state:
                self._stale_loss = state.pop("stale_loss")
            counted_elsewhere = self.global_selection and self.args.process_index != 0
            self._rows_streamed = 0 if counted_elsewhere else state.pop("rows_streamed")
            for name in COUNTERS:
                setattr(self, name, type(state[name])(0) if counted_elsewhere else state[name])
        else:
            logger.warning("%s has no selection state: the policy starts with empty memories", checkpoint)
        return json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"]

    def _summed_over_ranks(self, counts: dict[str, float]) -> dict[str, float]:
        """``counts`` added up over the ranks (a collective); integers stay integers."""
        if self.args.world_size <= 1:
            return dict(counts)
        values = torch.tensor([float(value) for value in counts.values()], dtype=torch.float64,
                              device=self.args.device)
        summed = self.accelerator.reduce(values, reduction="sum").tolist()
        return {name: type(value)(total) for (name, value), total in zip(counts.items(), summed, strict=True)}

    def _sum_counters_over_ranks(self) -> None:
        for name, value in self._summed_over_ranks({name: getattr(self, name) for name in COUNTERS}).items():
            setattr(self, name, value)

    def _reference_losses(self) -> Tensor:
        """Every training row's loss under the policy's reference model: computed once (by the main process
        under DDP) and cached in the run folder, keyed by the reference and the rows' tokens."""
        dataset = self.train_dataset
        reference = getattr(self.policy, "reference_model", None)
        digest = hashlib.sha256(json.dumps(reference).encode())
        if reference is not None and Path(reference).exists():  # a folder retrained in place is another model
            for file in sorted(Path(reference).rglob("*")):
                if file.is_file():
                    digest.update(f"{file.relative_to(reference)}:{file.stat().st_size}:"
                                  f"{file.stat().st_mtime_ns}".encode())
        for i in range(len(dataset)):
            row = dataset[i]
            for name in ("input_ids", "labels"):
                digest.update(np.asarray(row[name], dtype=np.int64).tobytes())
        key = digest.hexdigest()
        path = Path(self.args.output_dir) / "ref_losses.pt"
        with self.args.main_process_first(desc="reference losses"):
            if path.exists() and checked_problem(path) is None:  # a damaged cache is computed again
                cached = torch.load(path, weights_only=True)
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
                write_checked(path, buffer.getvalue())
        return losses


class SelectiveTrainer(SelectionMixin, Trainer):
    """``transformers.Trainer`` with online batch selection; see :class:`SelectionMixin` for the arguments."""


def train_online(examples: Sequence[Example], policy: Policy | str, keep: float = 0.25, *,
                 model: str | None = None, settings: TrainSettings | None = None, warmup_steps: int = 0,
                 trainer_class: type[SelectionMixin] = SelectiveTrainer,
                 holdout: Sequence[Example] | None = None, global_selection: bool = False,
                 stale_scores: bool = False, training_args: Any = None,
                 callbacks: Sequence[Any] | None = None) -> TrainResult:
    """Fine-tune as :func:`slimtune.train.train` does, backpropagating the K = ``keep`` rows of every
    candidate batch of B = ``settings.batch_size`` that ``policy`` (a Policy or a registered name) chooses.

    ``trainer_class``: another :class:`SelectionMixin` trainer, e.g. one built on TRL's SFTTrainer.
    ``holdout``: for RHO-loss without a ``reference_model``, the held-out rows its irreducible-loss model
    trains on (none of them may be in ``examples``); by default the policy's ``holdout`` share of
    ``examples``, drawn with the run's seed and removed from training. Their ids go to
    ``output_dir/holdout_ids.json``. ``global_selection``: choose each optimiser step's K among the candidates
    of all its micro-batches on all ranks (see :meth:`SelectionMixin._select_globally`). ``stale_scores``:
    score candidates with their losses from their last training forward, running no scoring forward (see
    the module's docstring). ``training_args``, ``callbacks``: the user's, as :func:`slimtune.train.train`
    takes them.
    """
    examples = as_examples(examples)
    settings = settings or TrainSettings()
    policy = get_policy(policy) if isinstance(policy, str) else policy
    if getattr(policy, "requires_reference", False) and policy.reference_model is None:
        examples, held_out = split_holdout(examples, holdout, policy.holdout, settings.seed)
        Path(settings.output_dir).mkdir(parents=True, exist_ok=True)
        write_json(Path(settings.output_dir) / "holdout_ids.json", [ex.id for ex in held_out])
        policy = dataclasses.replace(policy, reference_model=str(irreducible_model(held_out, model, settings)))
    return train(examples, model=model, settings=settings, training_args=training_args, callbacks=callbacks,
                 trainer_class=trainer_class,
                 trainer_kwargs={"policy": policy, "keep": keep, "warmup_steps": warmup_steps,
                                 "max_length": settings.max_length, "global_selection": global_selection,
                                 "stale_scores": stale_scores})


def split_holdout(examples: Sequence[Example], holdout: Sequence[Example] | None, share: float,
                  seed: int) -> tuple[list[Example], list[Example]]:
    """(rows to train on, held-out rows): ``holdout`` as given (refused if it shares an id with the pool), else
    a seeded ``share`` of the pool."""
    if holdout is not None:
        shared = {ex.id for ex in holdout} & {ex.id for ex in examples}
        if shared:
            raise ValueError(f"{len(shared)} held-out rows are also in the training pool (e.g. "
                             f"{sorted(shared)[:3]}): the irreducible-loss model must not see rows the run trains on")
        return list(examples), list(holdout)
    if not 0 < share < 1:
        raise ValueError(f"holdout must be a share of the pool in (0, 1), got {share}")
    count = max(1, math.floor(share * len(examples) + 0.5))
    if count >= len(examples):
        raise ValueError(f"a held-out share of {share} leaves nothing of {len(examples)} rows to train on")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:count])
    return ([ex for i, ex in enumerate(examples) if i not in held],
            [ex for i, ex in enumerate(examples) if i in held])


def irreducible_model(held_out: Sequence[Example], model: str | None, settings: TrainSettings) -> Path:
    """RHO-LOSS's irreducible-loss model: ``model`` fine-tuned on the held-out rows with the run's settings, in
    ``output_dir/irreducible``; reused when a previous run trained it on the same rows from the same model."""
    from slimtune.data.example import pool_hash

    folder = Path(settings.output_dir) / "irreducible"
    own = dataclasses.replace(settings, output_dir=str(folder))
    record = folder / "slimtune_train.json"
    if (folder / "adapter").exists() and record.exists():
        previous = json.loads(record.read_text())
        if (previous["pool_hash"], previous["model"], previous["settings"]) == \
                (pool_hash(held_out), model, json.loads(json.dumps(dataclasses.asdict(own), default=str))):
            return folder / "adapter"
    return train(held_out, model=model, settings=own).adapter_dir
