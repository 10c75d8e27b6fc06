"""InfoBatch's cost per step in its unpruned first epoch against a plain Trainer step on the same rows, in
process CPU seconds so that other jobs on the machine do not count.

In its first epoch InfoBatch prunes nothing (no row has a loss yet), so its step trains exactly what a plain
step trains and should cost the same. Per step, on B = ``--candidates`` GSM8K training rows (max length 256,
InfoBatch's first-epoch order) and ``--model`` with LoRA r=8 (``--layers`` keeps only the first decoder
layers: the LM head and the vocabulary stay whole, so reading per-row losses weighs more than in the whole
model), three steps, interleaved, each timed with ``time.process_time``: a plain ``transformers.Trainer``
step (``get_batch_samples`` + ``training_step``: forward, loss, backward); the same step of a
``SelectiveTrainer`` with InfoBatch (its ``_select``, the per-row training losses it hands the policy, its
selection log); and that InfoBatch step where the model's loss is wrapped, as a model with a loss of its own
has it, so the trainer reads the rows' losses off the logits (every model's path before the token-wise loss).
The first step pays one-off costs and is left out. Then one InfoBatch step of each kind under cProfile
(process-time clock) gives the CPU time of selection (``_select``) and of reading losses off the logits
(``response_losses``).

    .venv/bin/python benchmarks/infobatch_profile.py --model tiny                    # ~1 min of CPU
    .venv/bin/python benchmarks/infobatch_profile.py --model smollm2 --layers 4      # ~5 min of CPU

Prints the steps and their means; writes benchmarks/results/infobatch_profile_{model}[-{layers}layers].json
(``--results``).
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import json
import os
import pstats
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from online import gsm8k, machine
from readme import command_line
from transformers import Trainer
from transformers.loss.loss_utils import ForCausalLMLoss

from slimtune.data.tokenize import Collator, TokenizedDataset
from slimtune.models import LoraSettings, apply_lora, load_model
from slimtune.online import get_policy
from slimtune.online.trainer import SelectiveTrainer
from slimtune.train import TrainSettings, training_arguments

HERE = Path(__file__).resolve().parent


def build(args, folder: str) -> tuple[Trainer, SelectiveTrainer, list[dict]]:
    """Both trainers on one model, and the first epoch's batches in InfoBatch's order."""
    torch.manual_seed(args.seed)
    settings = TrainSettings(output_dir=folder, batch_size=args.candidates, max_length=256, seed=args.seed,
                             lora=LoraSettings(r=8, alpha=16), progress=False)
    model, tokenizer = load_model(args.model, device="cpu", dtype="fp32")
    if args.layers:
        model.model.layers = model.model.layers[:args.layers]
        model.config.num_hidden_layers = args.layers
    model = apply_lora(model, settings.lora)
    model.train()
    dataset = TokenizedDataset(gsm8k("train", args.pool, seed=args.seed), tokenizer, 256)
    training = training_arguments(settings)
    plain = Trainer(model=model, args=training, train_dataset=dataset,
                    data_collator=Collator(tokenizer.pad_token_id))
    infobatch = SelectiveTrainer(model=model, args=training, train_dataset=dataset,
                                 data_collator=Collator(tokenizer.pad_token_id, keep_index=True),
                                 policy=get_policy("infobatch", seed=args.seed), keep=1.0)
    infobatch._open_log(None)
    order = list(infobatch._get_train_sampler())
    collate = infobatch.data_collator
    batches = [collate([infobatch.train_dataset[i] for i in order[s * args.candidates:(s + 1) * args.candidates]])
               for s in range(args.steps + 1)]
    return plain, infobatch, batches


def step(trainer: Trainer, batch: dict) -> None:
    """One micro-batch as the Trainer's loop runs it: draw (selection included), forward, loss, backward."""
    if not isinstance(trainer, SelectiveTrainer):
        batch = {k: v for k, v in batch.items() if k != "example_index"}
    samples, items = trainer.get_batch_samples(iter([batch]), 1, trainer.args.device)
    trainer.training_step(trainer.model, samples[0], items)
    trainer.model.zero_grad(set_to_none=True)


@contextmanager
def own_loss(model: torch.nn.Module) -> Iterator[None]:
    """The model's causal-LM loss behind a wrapper, as a model with a loss of its own has it: the trainer then
    reads each row's loss off the logits, as it did for every model before the token-wise loss."""
    base = model.get_base_model()
    base.loss_function = functools.partial(ForCausalLMLoss)
    try:
        yield
    finally:
        del base._loss_function


def timed(trainer: Trainer, batch: dict, logits_path: bool = False) -> float:
    with own_loss(trainer.model) if logits_path else nullcontext():
        started = time.process_time()
        step(trainer, batch)
        return time.process_time() - started


VARIANTS = ("plain", "infobatch", "infobatch_logits")


def profile(args) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        plain, infobatch, batches = build(args, folder)
        runs = {"plain": lambda batch: timed(plain, batch), "infobatch": lambda batch: timed(infobatch, batch),
                "infobatch_logits": lambda batch: timed(infobatch, batch, logits_path=True)}
        steps = []
        for s, batch in enumerate(batches):
            # a different order each step, so that no variant always meets a warm (or a cold) cache
            order = VARIANTS[s % 3:] + VARIANTS[:s % 3]
            record = {name: runs[name](batch) for name in order}
            record.update(tokens=int(batch["attention_mask"].sum()), width=batch["input_ids"].shape[1],
                          response_tokens=int((batch["labels"][:, 1:] != -100).sum()))
            print(f"step {s}: " + ", ".join(f"{name} {record[name]:.3f} s" for name in VARIANTS)
                  + f" ({record['tokens']} tokens, {record['response_tokens']} response, width {record['width']})",
                  file=sys.stderr, flush=True)
            if s > 0:
                steps.append(record)
        profiler = cProfile.Profile(time.process_time)
        with own_loss(infobatch.model):
            profiler.runcall(step, infobatch, batches[1])
        parts = {f"{name} (logits path)": cumulative(pstats.Stats(profiler), name) for name in PARTS}
        profiler = cProfile.Profile(time.process_time)
        profiler.runcall(step, infobatch, batches[1])
        parts.update({name: cumulative(pstats.Stats(profiler), name) for name in PARTS})
        infobatch._log_file.close()
    n = len(steps)
    mean = {name: sum(s[name] for s in steps) / n for name in steps[0]}
    return {**mean, "ratio": mean["infobatch"] / mean["plain"],
            "ratio_logits": mean["infobatch_logits"] / mean["plain"], "parts": parts, "steps": steps}


#: Parts of an InfoBatch step beyond a plain one (functions of slimtune.online.trainer), by cProfile.
PARTS = ("_select", "response_losses")


def cumulative(stats: pstats.Stats, name: str) -> float:
    return sum(row[3] for (path, _, func), row in stats.stats.items()
               if path.endswith("online/trainer.py") and func == name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--layers", type=int, help="keep only this many decoder layers (default: all)")
    parser.add_argument("--pool", type=int, default=64)
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="steps measured, after one left out")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = machine()
    result = profile(args)
    print(f"plain {result['plain']:.3f} s/step, InfoBatch {result['infobatch']:.3f} s/step, ratio "
          f"{result['ratio']:.3f}; InfoBatch reading row losses off the logits {result['infobatch_logits']:.3f} "
          f"s/step, ratio {result['ratio_logits']:.3f} (mean of {len(result['steps'])} steps, process CPU time)")
    print("parts of one InfoBatch step (cProfile, CPU s): "
          + ", ".join(f"{name} {seconds:.3f}" for name, seconds in result["parts"].items()))
    layers = f"-{args.layers}layers" if args.layers else ""
    results = args.results or HERE / "results" / f"infobatch_profile_{args.model}{layers}.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"command": command_line("infobatch_profile.py", sys.argv[1:]), "machine": load,
                                   "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                   "result": result}, indent=1))


if __name__ == "__main__":
    main()
