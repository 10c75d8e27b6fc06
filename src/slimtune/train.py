"""Fine-tuning with the Hugging Face Trainer and LoRA on a data set or a selected subset.

The Trainer stays the Trainer: slimtune only supplies the tokenised data set, the collator, the LoRA wrap
and (for online selection) a Trainer subclass, so DDP/FSDP/DeepSpeed via ``accelerate launch`` keep working.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback

from slimtune.data import as_examples
from slimtune.data.example import Example, pool_hash
from slimtune.data.tokenize import Collator, TokenizedDataset
from slimtune.features.losses import accepts_logits_to_keep
from slimtune.models import LoraSettings, apply_lora, choose_device, load_model
from slimtune.progress import compact_log_line, show_log_line, stage
from slimtune.utils import seed_everything, write_json

if TYPE_CHECKING:
    from transformers import TrainingArguments


@dataclass
class TrainSettings:
    """Training hyper-parameters. Defaults suit LoRA on a small model; the LESS warm-up overrides them."""

    output_dir: str = "runs/train"
    epochs: float = 1.0
    max_steps: int = -1
    learning_rate: float = 2e-4
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 512
    warmup_ratio: float = 0.03  # a float < 1 is a share of the total steps, rounded down; >= 1 a step count
    lr_scheduler: str = "linear"
    weight_decay: float = 0.0
    seed: int = 0
    lora: LoraSettings | None = field(default_factory=LoraSettings)
    save_checkpoints: bool = False
    logging_steps: int = 5
    device: str | None = None
    dtype: str | None = None
    gradient_checkpointing: bool = False
    #: Batches of rows of similar length (the Trainer's length-grouped sampler: random groups, longest first):
    #: a random batch of mixed rows pads to its longest, about a third more positions on a mixed pool.
    group_by_length: bool = False
    progress: bool = True


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    seconds: float
    examples_seen: int
    tokens_seen: int
    final_loss: float | None
    log_history: list[dict[str, Any]]
    encode_summary: str


def training_arguments(settings: TrainSettings, *, user: TrainingArguments | Mapping[str, Any] | None = None,
                       **overrides: Any):
    """The Trainer's arguments for ``settings``; :func:`whole_warmup` then sets whole warm-up steps once the
    training set's length is known (the Trainer would round ``warmup_ratio`` of the run up itself).

    Precedence, highest first: ``overrides`` (tests and callers building their own Trainer), the user's
    ``user`` arguments (a
    ``TrainingArguments``, or a subclass such as TRL's ``SFTConfig``, or a dict of its fields), ``settings``,
    the Trainer's defaults. Of a ``TrainingArguments`` object only the fields that differ from a default-built
    one of its class count as set, so slimtune fills the rest (``report_to`` included: ``"none"`` by default).
    """
    from transformers import TrainingArguments

    device = choose_device(settings.device)
    use_bf16 = device.type == "cuda" and settings.dtype in (None, "bf16", "bfloat16") and \
        torch.cuda.is_bf16_supported()
    kwargs = dict(
        output_dir=settings.output_dir, num_train_epochs=settings.epochs, max_steps=settings.max_steps,
        learning_rate=settings.learning_rate, per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum, warmup_steps=settings.warmup_ratio,
        lr_scheduler_type=settings.lr_scheduler, weight_decay=settings.weight_decay, seed=settings.seed,
        data_seed=settings.seed, logging_steps=settings.logging_steps,
        save_strategy="epoch" if settings.save_checkpoints else "no", save_only_model=False,
        report_to="none", remove_unused_columns=False, use_cpu=device.type == "cpu", bf16=use_bf16,
        disable_tqdm=not settings.progress, dataloader_pin_memory=device.type == "cuda",
    )
    if settings.gradient_checkpointing:  # the argument is being renamed; pass it only when asked for
        kwargs["gradient_checkpointing"] = True
    if settings.group_by_length:  # a flag before transformers 5, one of several sampling strategies since
        sampling = {f.name for f in dataclasses.fields(TrainingArguments)}
        kwargs |= ({"train_sampling_strategy": "group_by_length"} if "train_sampling_strategy" in sampling
                   else {"group_by_length": True})
    given = user_set_fields(user)
    if isinstance(user, TrainingArguments):
        args = dataclasses.replace(user, **{k: v for k, v in {**kwargs, **overrides}.items()
                                            if k not in given or k in overrides})
    else:
        args = TrainingArguments(**{**kwargs, **given, **overrides})
    return args


def whole_warmup(args: TrainingArguments, settings: TrainSettings, rows: int, given: Mapping[str, Any]) -> None:
    """Set ``args.warmup_steps`` to :func:`warmup_steps` of the run the arguments describe (the world size is
    known only once they are built, and the user's may change the batch or the run's length), unless the user
    gave ``warmup_steps`` themselves."""
    if "warmup_steps" in given:
        return
    run = dataclasses.replace(settings, batch_size=args.per_device_train_batch_size,
                              grad_accum=args.gradient_accumulation_steps, epochs=args.num_train_epochs,
                              max_steps=args.max_steps)
    args.warmup_steps = warmup_steps(run, rows, args.world_size)


def user_set_fields(user: TrainingArguments | Mapping[str, Any] | None) -> dict[str, Any]:
    """The fields the user chose: every key of a dict (an unknown one is a ValueError naming it), and the fields
    of a ``TrainingArguments`` object that differ from a default-built object of the same class."""
    from transformers import TrainingArguments

    if user is None:
        return {}
    if isinstance(user, TrainingArguments):
        default = type(user)()
        return {f.name: getattr(user, f.name) for f in dataclasses.fields(user)
                if f.init and getattr(user, f.name) != getattr(default, f.name)}
    known = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    unknown = sorted(set(user) - known)
    if unknown:
        raise ValueError(f"training_args: TrainingArguments has no field {', '.join(map(repr, unknown))}")
    return dict(user)


def parse_training_args(pairs: Sequence[str]) -> dict[str, Any]:
    """``["key=value", ...]`` as TrainingArguments fields, each value parsed by its field's type (``true``/
    ``false`` for flags, the enum's names for choices); an unknown key or a bad value is a ValueError naming it.
    """
    import argparse

    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser(TrainingArguments, exit_on_error=False)
    known = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    parsed: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise ValueError(f"'{pair}' is not key=value")
        if key not in known:
            raise ValueError(f"'{key}' is not a TrainingArguments field (see `transformers.TrainingArguments`)")
        try:
            namespace, _ = parser.parse_known_args([f"--{key}", value])
        except argparse.ArgumentError as err:
            raise ValueError(f"training argument '{key}': {err.message}") from None
        parsed[key] = getattr(namespace, key)
    return parsed


def warmup_steps(settings: TrainSettings, rows: int, world_size: int = 1) -> int:
    """Whole warm-up steps: ``warmup_ratio`` of the run's optimizer steps, rounded down.

    The Trainer rounds a ratio up, and its linear warm-up gives step 0 a learning rate of zero, so a run of one
    step (a small selection: 8 rows at batch 8) would update nothing and score exactly as the untrained model.
    """
    if settings.warmup_ratio >= 1:
        return int(settings.warmup_ratio)
    if settings.max_steps > 0:
        total = settings.max_steps
    else:
        batches = math.ceil(rows / (settings.batch_size * world_size))
        total = math.ceil(math.ceil(batches / settings.grad_accum) * settings.epochs)
    return math.floor(settings.warmup_ratio * total)


def prepare_model(model_name: str | None, settings: TrainSettings, device: str | torch.device | None = None):
    """Load the model in fp32 master weights (the Trainer's mixed precision casts on the fly) and wrap LoRA.

    ``device``: where to load it, by default ``settings.device`` (auto when unset). Training passes the
    Trainer's ``args.device``: under ``accelerate launch``/``torchrun`` that is each rank's own GPU.
    """
    dtype = "fp32" if settings.dtype is None else settings.dtype
    model, tokenizer = load_model(model_name, device=settings.device if device is None else str(device),
                                  dtype=dtype)
    if settings.lora is not None:
        model = apply_lora(model, settings.lora)
    model.train()
    return model, tokenizer


class _ProgressCallback(TrainerCallback):
    """The Trainer's progress in slimtune's vocabulary (:mod:`slimtune.progress`): a step bar and one compact
    line per log (``live``), or only the closing summary line."""

    def __init__(self, label: str, live: bool):
        self.label, self.live = label, live
        self._stack = ExitStack()
        self._stage = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._stage = self._stack.enter_context(stage(self.label, total=state.max_steps, unit="steps",
                                                      live=self.live))

    def on_step_end(self, args, state, control, **kwargs):
        if self._stage is not None:
            self._stage.advance(1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.live and logs and state.is_world_process_zero:
            show_log_line(compact_log_line(logs, state.global_step, state.max_steps))

    def on_train_end(self, args, state, control, **kwargs):
        self._stack.close()


def show_progress(trainer, label: str, *, live: bool = True) -> None:
    """Replace the Trainer's own printing (a tqdm bar and raw log dicts) with slimtune's progress lines."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_ProgressCallback(label, live))


def train(examples: Sequence[Example], *, model: str | None = None, settings: TrainSettings | None = None,
          training_args: TrainingArguments | Mapping[str, Any] | None = None,
          callbacks: Sequence[Any] | None = None, trainer_class: type | None = None,
          trainer_kwargs: dict[str, Any] | None = None) -> TrainResult:
    """Fine-tune ``model`` (id, path, ``"smollm2"`` or ``"tiny"``) on ``examples``; save adapter, config, log.

    ``training_args``: the user's own ``TrainingArguments`` (or a dict of its fields). What the user set there
    wins over ``settings``, and ``settings`` fill only the rest (see :func:`training_arguments`): e.g.
    ``training_args={"report_to": ["tensorboard"], "deepspeed": "ds.json"}`` on top of slimtune's learning rate
    and batch size. ``callbacks``: ``TrainerCallback``s (or their classes) handed to the Trainer as they are.
    ``trainer_class``/``trainer_kwargs`` let online selection swap in its Trainer subclass.

    The arguments are built before the model loads: under ``accelerate launch``/``torchrun`` building them
    sets up the process group and each rank's device, and the model loads straight onto ``args.device``.
    """
    from transformers import Trainer

    examples = as_examples(examples)  # a datasets.Dataset becomes examples once, for every use below
    settings = settings or TrainSettings()
    given = user_set_fields(training_args)
    args = training_arguments(settings, user=training_args)
    seed_everything(args.seed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lm, tokenizer = prepare_model(model, settings, device=args.device)
    dataset = TokenizedDataset(examples, tokenizer, settings.max_length)
    if len(dataset) == 0:
        raise ValueError(f"nothing to train on: {dataset.stats.summary()}")
    whole_warmup(args, settings, len(dataset), given)
    cls = trainer_class or Trainer
    keep_index = cls is not Trainer
    extra = dict(trainer_kwargs or {})
    if callbacks:
        extra["callbacks"] = [*(extra.get("callbacks") or []), *callbacks]
    # Only the stock Trainer with the model's own loss: a subclass or a loss function may read every logit.
    trim = (cls is Trainer and "compute_loss_func" not in extra and not args.label_smoothing_factor
            and accepts_logits_to_keep(lm))
    trainer = cls(model=lm, args=args, train_dataset=dataset,
                  data_collator=Collator(tokenizer.pad_token_id, keep_index=keep_index, trim_logits=trim), **extra)
    show_progress(trainer, f"training {model or 'smollm2'} on {len(dataset)} rows", live=settings.progress)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=_checkpoint_to_resume(out, {
        "model": model, "pool_hash": pool_hash(examples), "settings": dataclasses.asdict(settings),
        "training_args": {key: value for key, value in args.to_dict().items() if key in given}}))
    seconds = time.perf_counter() - start

    adapter_dir = out / "adapter"
    trainer.save_model(str(adapter_dir))
    tokenizer.save_pretrained(adapter_dir)
    history = trainer.state.log_history
    with open(out / "train_log.jsonl", "w") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in history)
    batch = args.per_device_train_batch_size * args.gradient_accumulation_steps
    steps_per_epoch = max(1, len(dataset) // batch)
    # Online selection counts what it backpropagated; plain training sees every row once per epoch.
    examples_seen = getattr(trainer, "examples_trained", None)
    if examples_seen is None:
        examples_seen = (int(round(len(dataset) * args.num_train_epochs)) if args.max_steps < 0
                         else result.global_step * batch)
    tokens_seen = getattr(trainer, "tokens_trained", None)
    if tokens_seen is None:
        tokens_seen = int(dataset.num_tokens() * examples_seen / len(dataset))
    losses = [row["loss"] for row in history if "loss" in row] or [result.training_loss]
    write_json(out / "slimtune_train.json", {
        "model": model, "settings": dataclasses.asdict(settings),
        "training_args": {key: value for key, value in args.to_dict().items() if key in given},
        "examples": len(examples), "trained_rows": len(dataset), "pool_hash": pool_hash(examples),
        "encode": dataclasses.asdict(dataset.stats), "seconds": seconds, "global_steps": result.global_step,
        "steps_per_epoch": steps_per_epoch, "examples_seen": examples_seen, "tokens_seen": tokens_seen,
        "final_loss": losses[-1], "pid": os.getpid(),
    })
    return TrainResult(output_dir=out, adapter_dir=adapter_dir, seconds=seconds, examples_seen=examples_seen,
                       tokens_seen=tokens_seen, final_loss=losses[-1],
                       log_history=history, encode_summary=dataset.stats.summary())


def _checkpoint_to_resume(out: Path, run_key: dict[str, Any]) -> str | None:
    """The last checkpoint in ``out`` when it was saved by this same run (model, rows, settings): a run killed
    after a checkpoint goes on from it, as the Trainer resumes (weights, optimizer, scheduler, RNG, data
    position; online selection restores its policy state and log). Another run's checkpoints are never
    resumed: the run's key is recorded before training, and a different one starts afresh."""
    from transformers.trainer_utils import get_last_checkpoint

    marker = out / "slimtune_run_key.json"
    key = json.loads(json.dumps(run_key, default=str))
    same_run = marker.exists() and json.loads(marker.read_text()) == key
    for checkpoint in out.glob("checkpoint-*"):
        # Another run's checkpoints would be taken for this run's after a crash, and one whose saving was cut
        # short (the Trainer writes trainer_state.json last) cannot be resumed: both go.
        if not same_run or not (checkpoint / "trainer_state.json").exists():
            shutil.rmtree(checkpoint, ignore_errors=True)
    if not same_run:
        write_json(marker, key)
        return None
    return get_last_checkpoint(str(out))


def load_trained(run_dir: str | os.PathLike, *, device: str | None = None, dtype: str | None = None):
    """``(model, tokenizer)`` of a finished run: the base model named in its config plus the saved adapter."""
    from peft import PeftModel

    run = Path(run_dir)
    config = json.loads((run / "slimtune_train.json").read_text())
    base, tokenizer = load_model(config["model"], device=device, dtype=dtype)
    adapter = run / "adapter"
    if not (adapter / "adapter_config.json").exists():  # full fine-tune: the saved model is the model
        return load_model(str(adapter), device=device, dtype=dtype)
    model = PeftModel.from_pretrained(base, adapter).eval()
    return model, tokenizer
