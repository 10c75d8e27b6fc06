"""SLAP's own cost per step, in parts, against the floor of issue 15 (B no-grad scoring forwards + a forward
and backward of the K rows trained), all in process CPU seconds so that other jobs on the machine do not count.

Per step, on B = ``--candidates`` GSM8K training rows (max length 256) and the embedded SmolLM2-135M with LoRA
r=8 (``--model``): the floor (a plain no-grad forward of the B rows, every logit, then forward + backward of the
K rows SLAP chose, cut as the trainer cuts them) timed with ``time.process_time``; then SLAP's step as the online
trainer runs it (the scoring forward with trimmed logits and hidden states, ``SLAPPolicy.choose``) under
cProfile with a process-time clock, its time split by function into parts. SLAP's extra cost is its step
minus the floor's forward. The first step pays one-off costs (the sketch's matrices, the head check) and is
left out. ``--ops`` also prints the aten operators of one step's SLAP work (torch.profiler, by input shape).

    .venv/bin/python benchmarks/slap_profile.py                       # ~2 min of CPU
    .venv/bin/python benchmarks/slap_profile.py --compare old.json    # a "before" column from an earlier run

Prints the table, writes benchmarks/results/slap_profile.json (``--results``) and rewrites the "SLAP's cost
per step" section of benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from online import gsm8k, machine
from readme import command_line, replace_section

from slimtune.data.tokenize import Collator, TokenizedDataset
from slimtune.models import LoraSettings
from slimtune.online import get_policy
from slimtune.online.base import CandidateBatch
from slimtune.online.trainer import (
    SelectiveTrainer,
    accepts_logits_to_keep,
    forward_signals,
    full_head_weight,
    keep_count,
    logits_are_linear,
)
from slimtune.train import TrainSettings, prepare_model

HERE = Path(__file__).resolve().parent
SECTION = "## SLAP's cost per step"
#: Parts of SLAP's step, each the cumulative time of the functions named (file suffix, function name); what
#: the named parts leave of the step is "other".
PARTS = {
    "scoring forward (model)": [("online/trainer.py", "forward_signals")],
    "sketch + Gauss-Newton block (head_signals)": [("policies/slap.py", "head_signals")],
    "representation (mean_pool)": [("policies/slap.py", "mean_pool")],
    "strata (_stratify)": [("policies/slap.py", "_stratify")],
    "g_ref, H, eta (_reference)": [("policies/slap.py", "_reference")],
    "greedy (_assemble)": [("policies/slap.py", "_assemble")],
}


def cumulative(stats: pstats.Stats, where: list[tuple[str, str]]) -> float:
    return sum(row[3] for (path, _, name), row in stats.stats.items()
               if any(path.endswith(suffix) and name == func for suffix, func in where))


def candidates(batch: dict, signals: dict, head: torch.Tensor | None) -> CandidateBatch:
    """The CandidateBatch the trainer hands the policy (its ``_candidates``, for a batch from the pool)."""
    size = len(batch["input_ids"])
    return CandidateBatch(index=torch.arange(size), ids=[str(i) for i in range(size)], tasks=["gsm8k"] * size,
                          input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"], token_count=(batch["labels"][:, 1:] != -100).sum(1),
                          extras={} if head is None else {"head": head}, **signals)


def profile(args) -> dict:
    torch.manual_seed(args.seed)
    model, tokenizer = prepare_model(args.model, TrainSettings(lora=LoraSettings(r=8, alpha=16), progress=False))
    pool = TokenizedDataset(gsm8k("train", args.pool, seed=args.seed), tokenizer, 256)
    collate = Collator(tokenizer.pad_token_id)
    order = list(range(len(pool)))
    random.Random(args.seed).shuffle(order)
    batches = [collate([pool[i] for i in order[s * args.candidates:(s + 1) * args.candidates]])
               for s in range(args.steps + 1)]
    policy = get_policy("slap", seed=args.seed)
    k = keep_count(args.keep, args.candidates)
    trim = accepts_logits_to_keep(model)
    head = full_head_weight(model) if logits_are_linear(model, batches[0]) else None

    def slap_step(batch: dict) -> torch.Tensor:
        """What SelectiveTrainer._select runs for SLAP: the scoring forward and the choice."""
        model.eval()
        signals = forward_signals(model, batch, logits=head is None, hidden=True, trim_logits=trim,
                                  log_probs="logit_factors" in policy.needs(), head=head)
        return policy.choose(candidates(batch, signals, head), k)

    steps = []
    for s, batch in enumerate(batches):
        profiler = cProfile.Profile(time.process_time)
        started = time.process_time()
        profiler.enable()
        chosen = slap_step(batch)
        profiler.disable()
        slap = time.process_time() - started
        started = time.process_time()
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        plain_forward = time.process_time() - started
        model.train()
        started = time.process_time()
        trained = SelectiveTrainer._rows(batch, batch["attention_mask"], chosen.sort().values, None)
        model(**trained).loss.backward()
        model.zero_grad()
        train_k = time.process_time() - started
        stats = pstats.Stats(profiler)
        parts = {name: cumulative(stats, where) for name, where in PARTS.items()}
        parts["other (Python glue, CandidateBatch, choose)"] = slap - sum(parts.values())
        print(f"step {s}: SLAP {slap:.2f} s, floor forward {plain_forward:.2f} s, K fwd+bwd {train_k:.2f} s",
              file=sys.stderr, flush=True)
        if s > 0:
            steps.append({"slap": slap, "plain_forward": plain_forward, "train_k": train_k, "parts": parts,
                          "response_tokens": int((batch["labels"][:, 1:] != -100).sum()),
                          "tokens": int(batch["attention_mask"].sum())})
    if args.ops:
        model.eval()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            slap_step(batches[1])
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=20))
    return mean_step(steps)


def mean_step(steps: list[dict]) -> dict:
    n = len(steps)
    out = {name: sum(s[name] for s in steps) / n for name in ("slap", "plain_forward", "train_k",
                                                               "response_tokens", "tokens")}
    out["parts"] = {name: sum(s["parts"][name] for s in steps) / n for name in steps[0]["parts"]}
    out["floor"] = out["plain_forward"] + out["train_k"]
    out["extra"] = out["slap"] - out["plain_forward"]
    out["step_over_floor"] = (out["floor"] + out["extra"]) / out["floor"]
    out["steps"] = steps
    return out


def table(result: dict, before: dict | None) -> str:
    runs = [("before", before), ("now", result)] if before else [("now", result)]
    head = "| part | " + " | ".join(f"CPU s/step ({label}) | share of floor ({label})" for label, _ in runs) + " |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]

    def row(name: str, value) -> None:
        lines.append(f"| {name} | " + " | ".join(f"{value(r):.3f} | {value(r) / r['floor']:.1%}" for _, r in runs)
                     + " |")

    row("floor: B no-grad forwards (plain, every logit)", lambda r: r["plain_forward"])
    row("floor: forward + backward of the K rows", lambda r: r["train_k"])
    row("**floor**", lambda r: r["floor"])
    for name in result["parts"]:
        row(f"SLAP: {name}", lambda r, name=name: r["parts"].get(name, 0.0))
    row("**SLAP's step** (scoring forward + policy)", lambda r: r["slap"])
    row("**SLAP's extra** (its step - the floor's forward)", lambda r: r["extra"])
    lines.append("| **step / floor** | " + " | ".join(f"{r['step_over_floor']:.3f} | " for _, r in runs) + "")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--pool", type=int, default=64)
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=3, help="steps measured, after one left out")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ops", action="store_true", help="also print the top aten operators of SLAP's work")
    parser.add_argument("--compare", type=Path, help="an earlier run's JSON, shown as the 'before' column")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "slap_profile.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started, load = time.perf_counter(), machine()
    result = profile(args)
    before = json.loads(args.compare.read_text())["result"] if args.compare else None
    text = table(result, before)
    print(text)
    command = command_line("slap_profile.py", sys.argv[1:])
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({"command": command, "machine": load, "seconds": time.perf_counter() - started,
                                        "settings": {k: str(v) if isinstance(v, Path) else v
                                                     for k, v in vars(args).items()},
                                        "result": result, "before": before}, indent=1))
    setup = (f"`{command}` on {load}. Model {args.model} with LoRA r=8; B = {args.candidates} GSM8K training "
             f"rows (max length 256, seed {args.seed}), K = {keep_count(args.keep, args.candidates)}; "
             f"{args.steps} steps after one left out, mean per step of {result['tokens']:.0f} tokens, "
             f"{result['response_tokens']:.0f} of them response tokens. Process CPU seconds, "
             "SLAP's parts by cProfile (process-time clock). Results: `benchmarks/results/slap_profile.json`.")
    replace_section(SECTION, "\n\n".join([setup, text]))


if __name__ == "__main__":
    main()
