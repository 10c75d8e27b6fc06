"""Does today's CLI select what an earlier commit selected? (issue #14: "a 1-process run of today's CLI gives the
same selections as before on the bundled data, or the change is explained".)

Runs ``slimtune select`` on one process for each method at two checkouts, this one and ``--base`` (a git worktree
made under ``--work``), on the same pool of bundled rows (the first 100 GSM8K train rows and the first 100
distinct P3 rows; target: the first 20 GSM8K test rows, given to LESS only), each checkout with a cache of its
own so nothing computed by one is read by the other, then compares the manifests: the kept set, its order, the
largest score difference and the rows whose score moved by more than ``--tolerance``. With ``--long-rows`` it
also says whether exactly the rows longer than ``max_length`` (512) tokens moved, the change #14 made on
purpose (the prompt is cut from the left, keeping the response, where it used to be cut on the right).

With ``--explain-delift`` it also says why DELIFT's kept set moved: it reads each checkout's raw pool kernel
back from that checkout's cache (computing nothing), compares the neighbour lists and the raw utilities pair by
pair, and replays today's greedy on each raw kernel under each scaling rule: the rule before 4e66b24 (min-max
over the stored pairs, a pair never computed worth 0 after scaling) and today's (``UtilityMatrix.scaled``:
a pair never computed is utility 0, self-pairs clipped to 1), and today's without the self-pair clipping. If
the raw kernels agree and each rule gives back its own checkout's kept rows, the whole change is the scaling
rule.

    .venv/bin/python scripts/selection_drift.py --base 9865182 --methods random length loss ifd kcenter \\
        delift-se less delift --work /tmp/drift --long-rows --explain-delift

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
#: Run under a checkout's code: its raw DELIFT pool kernel, read from its cache with the manifest's parameters.
DUMP_KERNEL = """
import dataclasses, json, sys
import numpy as np
from slimtune.data import load_examples
from slimtune.features.utility import InContextUtility
from slimtune.select.base import Cost
from slimtune.select.delift import DeliftSelector

def computing(*args, **kwargs):
    raise RuntimeError("a DELIFT kernel block is missing from this cache: this check reads kernels, it computes none")

InContextUtility._distances = computing
pool_file, manifest, out = sys.argv[1:]
params = json.loads(open(manifest).read())["params"]
selector = DeliftSelector(**{f.name: params[f.name] for f in dataclasses.fields(DeliftSelector) if f.name in params})
pool, cost = list(load_examples(pool_file).examples), Cost()
embeddings = selector._embed(pool, cost)
kernel = selector._kernel(pool, pool, embeddings, embeddings, cost, "pool")
np.savez(out, values=kernel.values, columns=kernel.columns)
"""


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


def environment(source: Path, cache: Path) -> dict[str, str]:
    # resolved: the cache's path is part of the converted model's identity, so a symlinked work folder must read
    # the stores under the path that filled them
    return {**os.environ, "PYTHONPATH": str(source / "src"), "SLIMTUNE_CACHE": str(cache.resolve()),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def select(source: Path, label: str, method: str, pool: Path, target: Path, work: Path) -> float:
    from slimtune.utils import cache_dir

    cache = work / f"cache-{label}"
    cache.mkdir(parents=True, exist_ok=True)
    for converted in ("smollm2-135m-instruct", "tiny-llama"):
        if (cache_dir() / converted).exists() and not (cache / converted).exists():
            shutil.copytree(cache_dir() / converted, cache / converted)
    out = work / label / method
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-c", CLI, "select", "--method", method, "--budget", "20", "--data", str(pool),
               "--out", str(out), *(["--target", str(target)] if method == "less" else [])]
    start = time.perf_counter()
    with open(work / f"{label}-{method}.log", "w") as log:
        subprocess.run(command, env=environment(source, cache), stdout=log, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - start


def manifest(work: Path, label: str, method: str) -> tuple[dict, list[str]]:
    """A checkout's selection manifest and its kept ids in rank order."""
    rows = json.loads((work / label / method / "manifest.json").read_text())
    return rows, [r["id"] for r in sorted((r for r in rows["examples"] if r["kept"]), key=lambda r: r["rank"])]


def compare(work: Path, method: str, tolerance: float, long_ids: set[str] | None) -> dict:
    def read(label: str):
        rows, kept = manifest(work, label, method)
        return kept, {r["id"]: r["score"] for r in rows["examples"]}

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


def explain_delift(work: Path, pool: Path, sources: dict[str, Path]) -> dict:
    """Why DELIFT's selection moved (module docstring): raw kernels compared, greedy replayed per scaling rule."""
    import numpy as np

    from slimtune.data import load_examples
    from slimtune.features.utility import UtilityMatrix, _content_keys
    from slimtune.select.submodular import FacilityLocation, greedy_scores

    kernels, kept = {}, {}
    for label, source in sources.items():
        dumped = subprocess.run([sys.executable, "-c", DUMP_KERNEL, str(pool),
                                 str(work / label / "delift" / "manifest.json"),
                                 str(work / f"{label}-kernel.npz")], env=environment(source, work / f"cache-{label}"),
                                capture_output=True, text=True)
        if dumped.returncode:
            sys.exit(f"reading {label}'s DELIFT kernel from {work / f'cache-{label}'} failed:\n{dumped.stderr[-2000:]}")
        kernels[label] = np.load(work / f"{label}-kernel.npz")
        rows, kept[label] = manifest(work, label, "delift")
        params = rows["params"]
    examples = list(load_examples(str(pool)).examples)
    ids = [ex.id for ex in examples]
    keys, _ = _content_keys(examples, examples)
    base, today = kernels["base"], kernels["today"]
    same_lists = base["columns"].shape == today["columns"].shape and (base["columns"] == today["columns"]).all()

    def before_4e66b24(values, columns):
        lo, hi = values.min(), values.max()
        return UtilityMatrix(((values - lo) / (hi - lo)).astype(np.float32), columns, len(ids))

    def today_rule(values, columns):
        return UtilityMatrix(values, columns, len(ids), {}, keys[:, None] == keys[columns]).scaled()

    def today_without_self_pair_clipping(values, columns):  # the background rule alone
        return UtilityMatrix(values, columns, len(ids)).scaled()

    replays = {}
    for kernel_label, kernel in kernels.items():
        for rule in (before_4e66b24, today_rule, today_without_self_pair_clipping):
            scaled = rule(kernel["values"], kernel["columns"])
            _, order = greedy_scores(FacilityLocation(scaled.to_torch(), background=scaled.background),
                                     len(kept["today"]), method=params["optimizer"], epsilon=params["epsilon"],
                                     seed=params["seed"])
            picked = [ids[i] for i in order]
            replays[f"{kernel_label} kernel, {rule.__name__}"] = {
                label: picked == chosen for label, chosen in kept.items()}
    return {"same_neighbour_lists": bool(same_lists),
            "largest_raw_utility_difference": float(np.abs(base["values"] - today["values"]).max())
            if same_lists else None,
            "replay_gives_the_kept_rows_of": replays}


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
    parser.add_argument("--explain-delift", action="store_true",
                        help="replay DELIFT's greedy on both raw kernels under each scaling rule")
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
        if method == "delift" and args.explain_delift:
            results[-1]["explained"] = explain_delift(args.work, pool, {"base": base, "today": ROOT})
        print(json.dumps(results[-1]), flush=True)
    (args.work / "drift.json").write_text(json.dumps({"base": args.base, "results": results}, indent=1))


if __name__ == "__main__":
    main()
