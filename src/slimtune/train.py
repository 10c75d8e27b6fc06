"""Fine-tuning with the Hugging Face Trainer and LoRA on a data set or a selected subset.

The Trainer stays the Trainer: slimtune only supplies the tokenised data set, the collator, the LoRA wrap
and (for online selection) a Trainer subclass, so DDP/FSDP/DeepSpeed via ``accelerate launch`` keep working.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slimtune.data import as_examples
from slimtune.data.example import Example, pool_hash
from slimtune.data.tokenize import Collator, TokenizedDataset
from slimtune.models import LoraSettings, apply_lora, choose_device, load_model
from slimtune.utils import seed_everything, write_json


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


def training_arguments(settings: TrainSettings, rows: int | None = None, **overrides: Any):
    """The Trainer's arguments for ``settings``. Give ``rows`` (the training set's length) for whole warm-up steps
    (:func:`warmup_steps`); without it the Trainer rounds ``warmup_ratio`` of the run up itself."""
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
        report_to=[], remove_unused_columns=False, use_cpu=device.type == "cpu", bf16=use_bf16,
        disable_tqdm=not settings.progress, dataloader_pin_memory=device.type == "cuda",
    )
    if settings.gradient_checkpointing:  # the argument is being renamed; pass it only when asked for
        kwargs["gradient_checkpointing"] = True
    kwargs.update(overrides)
    args = TrainingArguments(**kwargs)
    if rows is not None and "warmup_steps" not in overrides:
        args.warmup_steps = warmup_steps(settings, rows, args.world_size)  # the world size is known only now
    return args


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


def prepare_model(model_name: str | None, settings: TrainSettings):
    """Load the model in fp32 master weights (the Trainer's mixed precision casts on the fly) and wrap LoRA."""
    dtype = "fp32" if settings.dtype is None else settings.dtype
    model, tokenizer = load_model(model_name, device=settings.device, dtype=dtype)
    if settings.lora is not None:
        model = apply_lora(model, settings.lora)
    model.train()
    return model, tokenizer


def train(examples: Sequence[Example], *, model: str | None = None, settings: TrainSettings | None = None,
          trainer_class: type | None = None, trainer_kwargs: dict[str, Any] | None = None) -> TrainResult:
    """Fine-tune ``model`` (id, path, ``"smollm2"`` or ``"tiny"``) on ``examples``; save adapter, config, log.

    ``trainer_class``/``trainer_kwargs`` let online selection swap in its Trainer subclass.
    """
    from transformers import Trainer

    settings = settings or TrainSettings()
    seed_everything(settings.seed)
    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lm, tokenizer = prepare_model(model, settings)
    dataset = TokenizedDataset(as_examples(examples), tokenizer, settings.max_length)
    if len(dataset) == 0:
        raise ValueError(f"nothing to train on: {dataset.stats.summary()}")
    cls = trainer_class or Trainer
    keep_index = cls is not Trainer
    trainer = cls(model=lm, args=training_arguments(settings, rows=len(dataset)), train_dataset=dataset,
                  data_collator=Collator(tokenizer.pad_token_id, keep_index=keep_index),
                  **(trainer_kwargs or {}))
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start

    adapter_dir = out / "adapter"
    trainer.save_model(str(adapter_dir))
    tokenizer.save_pretrained(adapter_dir)
    history = trainer.state.log_history
    with open(out / "train_log.jsonl", "w") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in history)
    steps_per_epoch = max(1, len(dataset) // (settings.batch_size * settings.grad_accum))
    # Online selection counts what it backpropagated; plain training sees every row once per epoch.
    examples_seen = getattr(trainer, "examples_trained", None)
    if examples_seen is None:
        examples_seen = (int(round(len(dataset) * settings.epochs)) if settings.max_steps < 0
                         else result.global_step * settings.batch_size * settings.grad_accum)
    tokens_seen = getattr(trainer, "tokens_trained", None)
    if tokens_seen is None:
        tokens_seen = int(dataset.num_tokens() * examples_seen / len(dataset))
    losses = [row["loss"] for row in history if "loss" in row] or [result.training_loss]
    write_json(out / "slimtune_train.json", {
        "model": model, "settings": dataclasses.asdict(settings), "examples": len(examples),
        "trained_rows": len(dataset), "pool_hash": pool_hash(list(examples)),
        "encode": dataclasses.asdict(dataset.stats), "seconds": seconds, "global_steps": result.global_step,
        "steps_per_epoch": steps_per_epoch, "examples_seen": examples_seen, "tokens_seen": tokens_seen,
        "final_loss": losses[-1], "pid": os.getpid(),
    })
    return TrainResult(output_dir=out, adapter_dir=adapter_dir, seconds=seconds, examples_seen=examples_seen,
                       tokens_seen=tokens_seen, final_loss=losses[-1],
                       log_history=history, encode_summary=dataset.stats.summary())


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
