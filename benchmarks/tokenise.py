"""Tokenised pools: resident memory of a pool's token ids held as Python lists (TokenizedDataset before #14)
versus the memory-mapped Arrow table it holds now, and where tokenising in worker processes starts to pay.

1. memory: synthetic pools of short rows recombined from the shared Tatoeba pairs (a sentence in one of ten
   languages, "translate to English", answered by the English side of another random row; seed 0), tiny
   model's tokenizer (SmolLM2's), max length 128. Each variant runs in a fresh process:
   - arrow: ``TokenizedDataset`` into an empty cache (the build tokenises), then every row read once;
   - eager: the same rows as a list of ``{"input_ids", "labels"}`` dicts of Python ints, built as the old
     loop built them (labels share the id objects and the one -100), then every row read once. The ids are
     read from the table the arrow run cached instead of being tokenised again: a list's memory does not
     depend on where its ints came from, and the shared machine is spared a second tokenisation.
   Memory is read from /proc/self/status: VmRSS after the pool's Examples exist (the baseline), VmHWM (the
   peak) at the end, and the end's RSS split into anonymous (private to the process) and file-backed pages
   (the memory-mapped Arrow files: page cache, shared by every rank on the machine, dropped under pressure).
   Worker processes of the build are reported apart (their peak, ``RUSAGE_CHILDREN``).
2. workers: wall time to tokenise pools of 2,000 and 8,000 rows with one process and with two.

    python benchmarks/tokenise.py [--rows 200000]   # writes benchmarks/results/tokenise.json and the
                                                    # "Tokenised pools" section of benchmarks/README.md
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
from readme import command_line, replace_section

from slimtune.data.example import make_example
from slimtune.data.tokenize import IGNORE_INDEX, TokenizedDataset
from slimtune.models import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tatoeba"
RESULTS = ROOT / "benchmarks" / "results" / "tokenise.json"
HEADING = "## Tokenised pools"
MAX_LENGTH = 128
LANGUAGES = ("fra", "deu", "spa", "ita", "por", "nld", "rus", "cmn", "jpn", "tur")


def synthetic_pool(rows: int):
    sentences = [line for lang in LANGUAGES
                 for line in (DATA / f"tatoeba.{lang}-eng.{lang}").read_text().splitlines()]
    english = [line for lang in LANGUAGES for line in (DATA / f"tatoeba.{lang}-eng.eng").read_text().splitlines()]
    rng = random.Random(0)
    return [make_example([{"role": "user", "content": f"Translate to English: {rng.choice(sentences)}"},
                          {"role": "assistant", "content": rng.choice(english)}], source="synthetic")
            for _ in range(rows)]


def memory() -> dict[str, int]:
    """Fields of /proc/self/status, in bytes."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


def eager_rows(cache: Path) -> list[dict[str, list[int]]]:
    """The rows as the old in-memory TokenizedDataset held them, read batch by batch from the cached table."""
    rows = []
    for path in sorted(cache.rglob("tokens-*.arrow")):
        with pa.OSFile(str(path)) as source:
            for batch in pa.ipc.open_stream(source):
                for ids, labels in zip(batch.column("input_ids").to_pylist(), batch.column("labels").to_pylist()):
                    rows.append({"input_ids": ids,
                                 "labels": [IGNORE_INDEX if y == IGNORE_INDEX else i for i, y in zip(ids, labels)]})
    return rows


def memory_worker(variant: str, rows: int, cache: str, num_proc: int, out: str) -> None:
    pool = synthetic_pool(rows)
    tokenizer = load_tokenizer("tiny")
    gc.collect()
    base = memory()["VmRSS"]
    start = time.perf_counter()
    if variant == "arrow":
        data = TokenizedDataset(pool, tokenizer, MAX_LENGTH, num_proc=num_proc, cache_dir=cache)
    else:
        data = eager_rows(Path(cache))
    built = time.perf_counter() - start
    tokens = sum(len(data[i]["input_ids"]) for i in range(len(data)))
    end = memory()
    Path(out).write_text(json.dumps({
        "variant": variant, "rows": rows, "tokens": tokens, "build_s": built, "base_mb": base / 2**20,
        "peak_mb": end["VmHWM"] / 2**20, "growth_mb": (end["VmHWM"] - base) / 2**20,
        "end_anon_mb": end["RssAnon"] / 2**20, "end_file_mb": end["RssFile"] / 2**20,
        "workers_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**10}))


def run_worker(*args: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, __file__, "--worker", *args, out.name], check=True)
        return json.loads(Path(out.name).read_text())


def time_build(rows: int, num_proc: int) -> float:
    pool, tokenizer = synthetic_pool(rows), load_tokenizer("tiny")
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        TokenizedDataset(pool, tokenizer, MAX_LENGTH, num_proc=num_proc, cache_dir=cache)
        return time.perf_counter() - start


def markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |",
            *("| " + " | ".join(row) + " |" for row in rows)]


def write_readme(result: dict, argv: list[str]) -> None:
    lines = [f"`{command_line('tokenise.py', argv)}` on {platform.machine()}, {os.cpu_count()} cores shared with "
             f"other jobs (load average {result['load']:.1f} at the end; {result['seconds']:.0f} s in all): numbers "
             f"are rough. Synthetic pools of short Tatoeba rows (module docstring), max length {MAX_LENGTH}, arrow "
             f"built with num_proc={result['num_proc']}. Results: `benchmarks/results/tokenise.json`.", ""]
    lines += markdown(["pool rows", "variant", "tokens", "build s", "RSS with Examples MB", "peak RSS MB",
                       "growth MB", "end: anonymous MB", "end: file-backed MB", "build workers' peak MB"],
                      [[f"{m['rows']:,}", m["variant"], f"{m['tokens']:,}", f"{m['build_s']:.1f}",
                        f"{m['base_mb']:.0f}", f"{m['peak_mb']:.0f}", f"{m['growth_mb']:.0f}",
                        f"{m['end_anon_mb']:.0f}", f"{m['end_file_mb']:.0f}",
                        f"{m['workers_peak_mb']:.0f}" if m["variant"] == "arrow" else ""]
                       for m in result["memory"]])
    lines += ["", *markdown(["pool rows", "num_proc 1 s", "num_proc 2 s"],
                            [[f"{w['rows']:,}", f"{w['seconds'][0]:.1f}", f"{w['seconds'][1]:.1f}"]
                             for w in result["workers"]])]
    replace_section(HEADING, "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--num-proc", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        variant, rows, cache, num_proc, out = args.worker
        memory_worker(variant, int(rows), cache, int(num_proc), out)
        return
    start = time.perf_counter()
    result = {"num_proc": args.num_proc, "memory": [], "workers": []}
    for rows in (args.rows // 10, args.rows):
        with tempfile.TemporaryDirectory() as cache:
            for variant in ("arrow", "eager"):  # arrow first: eager reads the ids it cached
                result["memory"].append(run_worker(variant, str(rows), cache, str(args.num_proc)))
                print(json.dumps(result["memory"][-1]), flush=True)
    for rows in (2_000, 8_000):
        result["workers"].append({"rows": rows, "seconds": [time_build(rows, n) for n in (1, 2)]})
        print(json.dumps(result["workers"][-1]), flush=True)
    result["seconds"], result["load"] = time.perf_counter() - start, os.getloadavg()[0]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    write_readme(result, sys.argv[1:])


if __name__ == "__main__":
    main()
