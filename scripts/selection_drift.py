"""Does today's CLI select what an earlier commit selected? (issue #14: "a 1-process run of today's CLI gives the
same selections as before on the bundled data, or the change is explained".)

Runs ``slimtune select`` on one process for each method at two checkouts, this one and ``--base`` (a git worktree
made under ``--work``), on the same pool of bundled rows (the first 100 GSM8K train rows and the first 100
distinct P3 rows; target: the first 20 GSM8K test rows, given to LESS only), each checkout with a cache of its
own so nothing computed by one is read by the other, then compares the manifests: the kept set, its order, the
largest score difference and the rows whose score moved by more than ``--tolerance``. With ``--long-rows`` it
also says whether exactly the rows longer than ``max_length`` (512) tokens moved, the change #14 made on
purpose (the prompt is cut from the left, keeping the response, where it used to be cut on the right).

    .venv/bin/python scripts/selection_drift.py --base 9865182 --methods random length loss ifd kcenter \\
        delift-se less delift --work /tmp/drift

Checkouts older than ``python -m slimtune`` are driven through ``slimtune.cli.app``; the embedded model's
converted folder is copied into each private cache so neither converts the GGUF again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "src" / "slimtune" / "data" / "samples"
CLI = "import sys; sys.argv[0] = 'slimtune'; from slimtune.cli import app; app()"


def write_rows(work: Path) -> tuple[Path, Path]:
    pool, target, seen = work / "pool.jsonl", work / "target.jsonl", set()
    lines = []
    for name in ("gsm8k/train.jsonl", "p3/p3_sample.jsonl"):
        taken = 0
        for line in (SAMPLES / name).read_text().splitlines(keepends=True):
            if line not in seen and taken < 100:  # the P3 sample repeats a record: the reader refuses duplicates
                seen.add(line)
                lines.append(line)
                taken += 1
    pool.write_text("".join(lines))
    target.write_text("".join((SAMPLES / "gsm8k/test.jsonl").read_text().splitlines(keepends=True)[:20]))
    return pool, target


def checkout(base: str, work: Path) -> Path:
    folder = work / f"checkout-{base}"
    if not folder.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(folder), base], check=True)
    return folder


def select(source: Path, label: str, method: str, pool: Path, target: Path, work: Path) -> float:
    from slimtune.utils import cache_dir

    cache = work / f"cache-{label}"
    cache.mkdir(parents=True, exist_ok=True)
    for converted in ("smollm2-135m-instruct", "tiny-llama"):
        if (cache_dir() / converted).exists() and not (cache / converted).exists():
            shutil.copytree(cache_dir() / converted, cache / converted)
    out = work / label / method
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(source / "src"), "SLIMTUNE_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, "-c", CLI, "select", "--method", method, "--budget", "20", "--data", str(pool),
               "--out", str(out), *(["--target", str(target)] if method == "less" else [])]
    start = time.perf_counter()
    with open(work / f"{label}-{method}.log", "w") as log:
        subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - start


def compare(work: Path, method: str, tolerance: float, long_ids: set[str] | None) -> dict:
    def read(label: str):
        rows = json.loads((work / label / method / "manifest.json").read_text())["examples"]
        kept = [r["id"] for r in sorted((r for r in rows if r["kept"]), key=lambda r: r["rank"])]
        return kept, {r["id"]: r["score"] for r in rows}

    (kept_a, score_a), (kept_b, score_b) = read("base"), read("today")
    moved = sorted(i for i in score_a if (score_a[i] is None) != (score_b[i] is None) or (
        score_a[i] is not None and abs(score_a[i] - score_b[i]) > tolerance))
    finite = [abs(score_a[i] - score_b[i]) for i in score_a if score_a[i] is not None and score_b[i] is not None]
    result = {"method": method, "same_kept_set": set(kept_a) == set(kept_b), "same_order": kept_a == kept_b,
              "kept_overlap": len(set(kept_a) & set(kept_b)), "kept": len(kept_b),
              "largest_score_difference": max(finite, default=0.0), "rows_moved": len(moved),
              "unscored_before": sum(s is None for s in score_a.values()),
              "unscored_now": sum(s is None for s in score_b.values())}
    if long_ids is not None:
        result["moved_rows_are_the_long_rows"] = set(moved) == long_ids if moved else None
    return result


def long_rows(pool: Path, max_length: int = 512) -> set[str]:
    from slimtune.data import load_examples
    from slimtune.data.tokenize import encode_example
    from slimtune.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2")
    return {ex.id for ex in load_examples(str(pool)).examples
            if len(encode_example(ex, tokenizer, None)["input_ids"]) > max_length}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the earlier commit")
    parser.add_argument("--methods", nargs="+", default=["random", "length", "loss", "ifd", "kcenter", "delift-se"])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--tolerance", type=float, default=1e-4, help="a score moving less than this has not moved")
    parser.add_argument("--long-rows", action="store_true", help="check that the moved rows are the long rows")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    pool, target = write_rows(args.work)
    base = checkout(args.base, args.work)
    long_ids = long_rows(pool) if args.long_rows else None
    results = []
    for method in args.methods:
        seconds = {label: select(source, label, method, pool, target, args.work)
                   for label, source in (("base", base), ("today", ROOT))}
        results.append({**compare(args.work, method, args.tolerance, long_ids),
                        "seconds_base": round(seconds["base"], 1), "seconds_today": round(seconds["today"], 1)})
        print(json.dumps(results[-1]), flush=True)
    (args.work / "drift.json").write_text(json.dumps({"base": args.base, "results": results}, indent=1))


if __name__ == "__main__":
    main()
