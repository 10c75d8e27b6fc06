"""Scale: wall time and peak memory of each selection stage on synthetic pools of growing size, 1 and 2 processes.

Pools: short rows recombined from the shared data (the prompt of one GSM8K / P3 / Tatoeba row, the response of
another, each cut to :data:`CAP_CHARS` characters at a word boundary; ids ``scale-0000000`` ...; seed 0), written
once per size as JSONL, streamed so a million rows never sit in memory while they are written. The rows of a
smaller pool are the first rows of a larger one.

Model: a head-light random-init Llama (2 layers, width 64) with a byte-level BPE tokenizer of
:data:`VOCAB` tokens trained with Hugging Face ``tokenizers`` on the shared data and SmolLM2's chat template.
The unit tests' ``tiny`` model carries SmolLM2's 49k-token vocabulary, whose LM head would be most of every
forward here (LESS at 1M rows was estimated at 3.5 h for the head alone); a small vocabulary keeps the model's
work per token near that of the transformer layers, so what grows with n is the library's own work.

Stages (each measured in a fresh process, or a fresh ``torchrun`` job of 2 gloo processes, with a private
``SLIMTUNE_CACHE`` so nothing is read from an earlier run; the pool is read before the clock starts, except in
``load``):

- ``load``: ``load_examples`` of the JSONL file;
- ``tokenise``: ``TokenizedDataset`` (max length :data:`MAX_LENGTH`) into an empty Arrow cache;
- ``less``: LESS without warm-up (fresh LoRA r=4 on q/k/v/o, d = 256): pool and target gradient features
  and scoring, top 10% (``select`` as a user calls it, tokenising included);
- ``delift``: DELIFT, sparse kernel with k = 4 neighbours per row (the model's own embeddings, neighbour lists,
  in-context kernel with prompts and responses cut to 32 tokens) and the lazy greedy to 10% of the pool.
  Neighbours come from the head-light model (``neighbour_embedding="model"``), not MiniLM, for the reason the
  model is head-light: all-MiniLM-L6-v2 costs about 8 ms a row on this machine's 2 cores (80 of DELIFT's 112 s
  at 10k rows), fixed work per row that would make the 1M-row run 3 hours per process count and hide the
  library's own scaling (measured with MiniLM earlier: 91 s at 10k, 1,134 s at 100k on 1 process);
- ``kcenter``: greedy k-center on the model's mean-pooled embeddings, a FIXED :data:`KCENTER_CENTRES` centres at
  every n: the traversal is O(n k), so a budget that grew with n would make it quadratic by construction.

Memory: each rank reads its own VmHWM (peak resident set) from /proc; "beyond model" subtracts the rank's
resident set after imports and loading the model, before the pool is read. Threads: the machine's cores are
split among the processes (2 cores: 1 process x 2 threads, 2 processes x 1 thread), except tokenising's worker
processes: under a launch the main process tokenises while the others wait for its table, so it gets every core.

Each (stage, n, processes) result is written to ``benchmarks/results/scale.json`` (atomically) as soon as it is
measured, with a digest of its stage's settings; a rerun skips what is there under the same settings, so a
killed run resumes at the next measurement (``--fresh`` discards everything).

    python benchmarks/scale.py --sizes 10000 100000 1000000   # writes benchmarks/results/scale.json and the
                                                              # "Scale" section of benchmarks/README.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from readme import command_line, replace_section

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results" / "scale.json"
HEADING = "## Scale"
STAGES = ("load", "tokenise", "less", "delift", "kcenter")
CAP_CHARS = 160  # about 50 tokens of the benchmark's tokenizer, so a whole row fits MAX_LENGTH
MAX_LENGTH = 192
VOCAB = 1024
KCENTER_CENTRES = 1_000
TARGET_ROWS = 16
#: Each stage's selector parameters (the model is added at run time).
SELECTORS = {
    "less": ("less", {"warmup": False, "training": {"lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
                      "proj_dim": 256, "grad_batch_size": 32, "shard_rows": 4096, "max_length": MAX_LENGTH},
             0.1),
    "delift": ("delift", {"sparse_k": 4, "max_text_tokens": 32, "neighbour_embedding": "model"}, 0.1),
    "kcenter": ("kcenter", {"embedding": "model", "batch_size": 64, "shard_rows": 4096,
                            "max_length": MAX_LENGTH}, KCENTER_CENTRES),
}
SLOPE_TARGET, RSS_TARGET_MB = 1.1, 4096


# -- the synthetic pool ---------------------------------------------------------------------------------------
def cap(text: str, chars: int = CAP_CHARS) -> str:
    """``text`` cut to at most ``chars`` characters, at the last space when there is one."""
    text = " ".join(text.split())
    if len(text) <= chars:
        return text
    cut = text[:chars]
    return cut[:cut.rfind(" ")] if " " in cut else cut


def shared_pairs(data: Path = DATA) -> tuple[list[str], list[str]]:
    """Prompts and responses of the shared data sets under ``data``, in a fixed order."""
    prompts, responses = [], []
    with open(data / "gsm8k" / "train.jsonl") as fh:
        for line in fh:
            record = json.loads(line)
            prompts.append(record["question"])
            responses.append(record["answer"])
    with open(data / "p3" / "p3_sample.jsonl") as fh:
        for line in fh:
            record = json.loads(line)
            prompts.append(record["prompt"])
            responses.append(record["completion"].replace("<|endoftext|>", ""))
    for path in sorted((data / "tatoeba").glob("tatoeba.*-eng.eng")):
        language = path.name.split(".")[1].split("-")[0]
        sentences = (data / "tatoeba" / f"tatoeba.{language}-eng.{language}").read_text().splitlines()
        prompts += [f"Translate to English: {s}" for s in sentences]
        responses += path.read_text().splitlines()
    return [cap(p) for p in prompts], [cap(r) for r in responses if r.strip()]


def synthetic_records(rows: int, seed: int = 0, data: Path = DATA):
    """The pool's records, one at a time: the first ``rows`` of one endless seeded stream."""
    prompts, responses = shared_pairs(data)
    rng = random.Random(seed)
    for i in range(rows):
        yield {"id": f"scale-{i:07d}", "messages": [{"role": "user", "content": rng.choice(prompts)},
                                                    {"role": "assistant", "content": rng.choice(responses)}]}


def pool_file(work: Path, rows: int, data: Path = DATA) -> Path:
    """The pool of ``rows`` rows as JSONL under ``work``, written on first use (to a temporary name, renamed
    when whole, so an interrupted write is never taken for a pool)."""
    path = work / "pools" / f"pool-{rows}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        with open(partial, "w") as fh:
            for record in synthetic_records(rows, data=data):
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(partial, path)
    return path


# -- the head-light model -------------------------------------------------------------------------------------
def headlight_model(work: Path, data: Path = DATA) -> Path:
    """A local model folder: random-init 2-layer Llama, a :data:`VOCAB`-token byte-level BPE tokenizer trained
    on the shared data, SmolLM2's chat template. Built once (under a temporary name, then renamed)."""
    folder = work / f"headlight-llama-{VOCAB}"
    if (folder / "config.json").exists():
        return folder
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from slimtune.models import load_tokenizer

    smollm2 = load_tokenizer("tiny")  # SmolLM2's tokenizer: its special tokens and chat template
    specials = [smollm2.pad_token, smollm2.bos_token, smollm2.eos_token]
    specials = list(dict.fromkeys(t for t in specials if t))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    prompts, responses = shared_pairs(data)
    bpe.train_from_iterator(prompts + responses, trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=smollm2.bos_token,
                                        eos_token=smollm2.eos_token, pad_token=smollm2.pad_token,
                                        chat_template=smollm2.chat_template)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    work.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=work))
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process published it first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# -- one measurement, inside the fresh process (or each torchrun rank) ------------------------------------------
def memory_mb() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) / 1024
    return fields


def cpu_seconds() -> float:
    """User + system CPU time of this process and of the worker processes it has waited for."""
    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def target_examples():
    from slimtune.data.example import make_example

    with open(DATA / "gsm8k" / "test.jsonl") as fh:
        records = [json.loads(line) for _, line in zip(range(TARGET_ROWS), fh)]
    return [make_example([{"role": "user", "content": cap(r["question"])},
                          {"role": "assistant", "content": cap(r["answer"])}], task="gsm8k") for r in records]


def measure(stage: str, pool: str, model: str, out: str) -> None:
    from slimtune.data import load_examples
    from slimtune.data.tokenize import TokenizedDataset
    from slimtune.models import choose_device, load_model
    from slimtune.select import get_selector
    from slimtune.utils import process_state

    choose_device()  # accelerate's state first, as the CLI does: it sets up the process group
    state = process_state()
    _, tokenizer = load_model(model)
    baseline = memory_mb()["VmRSS"]
    examples = None if stage == "load" else load_examples(pool).examples
    parts: dict[str, float] = {}
    state.wait_for_everyone()
    start, cpu_start = time.perf_counter(), cpu_seconds()
    if stage == "load":
        examples = load_examples(pool).examples
    elif stage == "tokenise":
        TokenizedDataset(examples, tokenizer, MAX_LENGTH)
    else:
        method, params, budget = SELECTORS[stage]
        selection = get_selector(method, model=model, **params).select(
            examples, budget, target=target_examples() if stage == "less" else None)
        details = selection.cost.details
        if stage == "delift":
            parts = {"kernel_s": details["pool_kernel_seconds"], "greedy_s": details["greedy_seconds"]}
        if stage == "less":
            parts = {"pool_features_s": details["less"]["pool_features"]["seconds"]}
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    memory = memory_mb()
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"rank-{state.process_index}.json").write_text(json.dumps({
        "rank": state.process_index, "rows": len(examples), "seconds": seconds, "cpu_s": cpu,
        "baseline_mb": baseline, "peak_mb": memory["VmHWM"], "beyond_model_mb": memory["VmHWM"] - baseline, **parts}))
    if state.num_processes > 1:
        state.destroy_process_group()


def run_measurement(stage: str, rows: int, processes: int, work: Path, model: Path,
                    threads: int | None = None) -> dict:
    """One (stage, n, processes) measurement in a fresh process or torchrun job, with a cache of its own."""
    run = work / "runs" / f"{stage}-{rows}-{processes}"
    shutil.rmtree(run, ignore_errors=True)
    (run / "cache").mkdir(parents=True)
    cores = len(os.sched_getaffinity(0))
    threads = threads or max(1, cores // processes)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    command = [*(launcher if processes > 1 else [sys.executable]), __file__, "--measure", stage,
               str(pool_file(work, rows)), str(model), str(run / "report")]
    env = {**os.environ, "SLIMTUNE_CACHE": str(run / "cache"), "OMP_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "SLIMTUNE_NUM_PROC": str(cores), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "SLIMTUNE_VERBOSITY": "quiet",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    with open(run / "log.txt", "w") as log:
        done = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = (run / "log.txt").read_text()[-3000:]
        raise RuntimeError(f"{stage} at {rows:,} rows on {processes} process(es) failed (exit "
                           f"{done.returncode}); log {run / 'log.txt'}:\n{tail}")
    ranks = [json.loads(p.read_text()) for p in sorted((run / "report").glob("rank-*.json"))]
    shutil.rmtree(run / "cache", ignore_errors=True)
    return {"stage": stage, "rows": rows, "processes": processes, "threads": threads,
            "settings": settings_digest(stage),
            "seconds": max(r["seconds"] for r in ranks), "cpu_s": sum(r["cpu_s"] for r in ranks),
            "process_s": time.perf_counter() - start,
            "peak_mb": max(r["peak_mb"] for r in ranks), "beyond_model_mb": max(r["beyond_model_mb"] for r in ranks),
            "ranks": ranks}


# -- results, slopes, table -----------------------------------------------------------------------------------
def key(stage: str, rows: int, processes: int) -> str:
    return f"{stage}/{rows}/{processes}"


def settings_digest(stage: str) -> str:
    """What a cached measurement of ``stage`` depends on besides (n, processes): resuming under other settings
    would mix incomparable numbers. Per stage, so changing one stage's settings remeasures that stage only."""
    text = json.dumps([CAP_CHARS, MAX_LENGTH, VOCAB, TARGET_ROWS, KCENTER_CENTRES if stage == "kcenter" else None,
                       SELECTORS.get(stage)], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def load_results(fresh: bool) -> dict:
    """The measurements there are, less those taken under other settings than their stage's now (named)."""
    results = {"measurements": {}}
    if RESULTS.exists() and not fresh:
        results = json.loads(RESULTS.read_text())
        stale = [name for name, m in results["measurements"].items()
                 if m.get("settings") != settings_digest(m["stage"])]
        if stale:
            print(f"measured under other settings, measured again: {', '.join(stale)}", flush=True)
        for name in stale:
            del results["measurements"][name]
    return results


def save_results(results: dict) -> None:
    from slimtune.utils import atomic_write_text

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS, json.dumps(results, indent=1) + "\n")


def slope(small: dict, large: dict, time: str = "seconds") -> float:
    """Log-log slope of ``time`` (wall ``seconds`` or ``cpu_s``) against n between two measurements (1 = linear)."""
    return math.log(large[time] / small[time]) / math.log(large["rows"] / small["rows"])


def markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |",
            *("| " + " | ".join(row) + " |" for row in rows)]


def verdicts(results: dict, sizes: list[int], processes: list[int]) -> list[str]:
    """A line per target: met, missed, or not measured. Wall time is the target; CPU time is given beside it
    because on a shared machine it is the one that other jobs do not stretch."""
    measured = results["measurements"]
    lines = []
    for p in processes:
        for stage in STAGES:
            done = [n for n in sizes if key(stage, n, p) in measured]
            if len(done) < 2:
                lines.append(f"- {stage}, {p} process(es): time at most linear in n: not measured")
                continue
            ends = [measured[key(stage, n, p)] for n in (done[0], done[-1])]
            wall, cpu = slope(*ends), slope(*ends, time="cpu_s")
            # a span short of the sizes asked for is reported, not judged: the target is over the whole span
            verdict = (("met" if wall <= SLOPE_TARGET else "MISSED") if done[-1] == sizes[-1] else
                       f"not judged, {sizes[-1]:,} rows not measured")
            lines.append(f"- {stage}, {p} process(es): log-log slope {done[0]:,} -> {done[-1]:,} rows: wall "
                         f"{wall:.2f} (target <= {SLOPE_TARGET}: {verdict}), CPU {cpu:.2f}")
    largest = [m for m in measured.values() if m["rows"] == sizes[-1] and m["processes"] in processes]
    if largest:
        worst = max(largest, key=lambda m: m["beyond_model_mb"])
        verdict = "met" if worst["beyond_model_mb"] < RSS_TARGET_MB else "MISSED"
        missing = [f"{stage} ({p})" for stage in STAGES for p in processes if key(stage, sizes[-1], p) not in measured]
        lines.append(f"- peak RSS per rank beyond the model at {sizes[-1]:,} rows: at most "
                     f"{worst['beyond_model_mb']:.0f} MB ({worst['stage']}, {worst['processes']} process(es)); "
                     f"target < {RSS_TARGET_MB} MB: {verdict}" +
                     (f" for the stages measured there (not measured, by processes: {', '.join(missing)})"
                      if missing else ""))
    return lines


def write_readme(results: dict, sizes: list[int], processes: list[int], argv: list[str], *,
                 measured_now: bool) -> None:
    """The README section; the machine's load average is stated only after measuring (a ``--report`` rewrite's
    load says nothing about the measurements)."""
    measured = results["measurements"]
    table = []
    for stage in STAGES:
        for p in processes:
            previous = None
            for n in sizes:
                m = measured.get(key(stage, n, p))
                if m is None:
                    continue
                table.append([stage, str(p), f"{n:,}", f"{m['seconds']:.1f}", f"{n / m['seconds']:,.0f}",
                              f"{m['cpu_s']:.1f}", f"{m['peak_mb']:.0f}", f"{m['beyond_model_mb']:.0f}",
                              f"{slope(previous, m):.2f}" if previous else "",
                              f"{slope(previous, m, time='cpu_s'):.2f}" if previous else ""])
                previous = m
    load = f" (load average {os.getloadavg()[0]:.1f} at the end)" if measured_now else ""
    lines = [f"`{command_line('scale.py', argv)}` on {platform.machine()}, {os.cpu_count()} cores shared with "
             f"other jobs{load}: wall times are rough. Pools, model, "
             f"stages and settings: the script's docstring (k-center: a fixed {KCENTER_CENTRES:,} centres; DELIFT "
             f"sparse k = 4, 10% budget; LESS top 10%). Wall s is the slowest rank's time for the stage, CPU s the "
             f"ranks' user + system time added up; peak RSS is the largest rank's; beyond model subtracts that "
             f"rank's RSS after imports and the model. Slopes are log-log against the previous size. Results: "
             f"`benchmarks/results/scale.json`.", ""]
    lines += markdown(["stage", "processes", "pool rows", "wall s", "rows/s", "CPU s", "peak RSS MB per rank",
                       "beyond model MB", "wall slope", "CPU slope"], table)
    lines += ["", *verdicts(results, sizes, processes)]
    replace_section(HEADING, "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--work", type=Path, default=None,
                        help="pools, model and per-run caches (default: scale/ under slimtune's cache)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads per process (default: the cores split among the processes; 1 on a busy "
                             "machine, where a second thread spin-waits for a core it does not get)")
    parser.add_argument("--fresh", action="store_true", help="discard earlier measurements instead of resuming")
    parser.add_argument("--again", action="store_true",
                        help="measure the --stages given again at the --sizes and --processes given (after a change "
                             "of code, which the settings digest cannot see); other measurements are kept")
    parser.add_argument("--report", action="store_true",
                        help="measure nothing: rewrite the README section from the results there are")
    parser.add_argument("--measure", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(*args.measure)
        return
    from slimtune.models import cache_dir

    work = args.work or cache_dir() / "scale"
    results = load_results(args.fresh)
    if args.again:
        for stage in args.stages:
            for n in args.sizes:
                for p in args.processes:
                    results["measurements"].pop(key(stage, n, p), None)
    model = headlight_model(work)
    sizes = sorted(args.sizes)
    for n in [] if args.report else sizes:
        for stage in args.stages:
            for p in args.processes:
                if key(stage, n, p) in results["measurements"]:
                    continue
                m = run_measurement(stage, n, p, work, model, args.threads)
                results["measurements"][key(stage, n, p)] = m
                save_results(results)
                print(f"{stage:9s} n={n:>9,} p={p} {m['seconds']:9.1f} s  CPU {m['cpu_s']:9.1f} s  "
                      f"peak {m['peak_mb']:6.0f} MB  beyond model {m['beyond_model_mb']:6.0f} MB", flush=True)
    write_readme(results, sizes, args.processes, sys.argv[1:], measured_now=not args.report)


if __name__ == "__main__":
    main()
