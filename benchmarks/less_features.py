"""LESS gradient features: throughput, overhead and memory of slimtune's extraction on the embedded model.

One run measures, on the same GSM8K batches (SmolLM2-135M, LoRA r=128 / alpha 512 on q/k/v/o as in the
paper, max length 256, batch 8, d = 8192):

1. plain forward+backward (the floor: what any gradient method must pay), alternated batch by batch with
2. slimtune: batched per-example gradients + Adam direction + sparse JL projection, split into its parts;
3. the authors' recipe: one example per forward/backward, the full gradient vector, Adam, then a dense
   Rademacher matrix. That matrix is D x 8192 (483 GB in fp32 for D = 14.7M) and cannot exist here, so its
   product is timed on a 1 GB slice of rows and scaled by D / slice rows (exact for a product whose cost is
   linear in rows, and kind to the baseline: the real matrix would not fit in memory). The same scaling
   gives slimtune's block-regenerated dense Rademacher projector on this CPU;
4. peak resident memory of a full extraction into the feature store for two pool sizes, each in a fresh
   process, sampled from /proc every 5 ms (tracemalloc cannot see torch's allocations).

The model's LoRA B factors are drawn at random (std 1e-3) and the Adam moments are synthetic, so every
factor has a gradient and the timing is that of a real checkpoint; no training is needed to time features.

    python benchmarks/less_features.py            # writes benchmarks/results/less_features.json and the
                                                  # "LESS gradient features" section of benchmarks/README.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from readme import command_line, replace_section

from slimtune.data.example import make_example
from slimtune.data.tokenize import Collator, TokenizedDataset
from slimtune.features.gradients import (
    AdamMoments,
    extract_gradient_features,
    parameter_offsets,
    stream_per_example_gradients,
    trainable_parameters,
)
from slimtune.features.losses import example_losses, response_logits
from slimtune.features.projection import RademacherProjector, SparseJLProjector
from slimtune.features.store import FeatureStore
from slimtune.models import LoraSettings, apply_lora, load_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results" / "less_features.json"
HEADING = "## LESS gradient features"
DIM, MAX_LENGTH, BATCH = 8192, 256, 8


def gsm8k(rows: int):
    with open(DATA / "gsm8k" / "train.jsonl") as fh:
        records = [json.loads(line) for line in fh][:rows]
    return [make_example([{"role": "user", "content": r["question"]},
                          {"role": "assistant", "content": r["answer"]}], task="gsm8k") for r in records]


def setup(rows: int):
    """Model with the paper's LoRA, random B factors, synthetic Adam moments, and the tokenised pool."""
    model, tokenizer = load_model("smollm2", device="cpu", dtype="fp32")
    torch.manual_seed(0)
    model = apply_lora(model, LoraSettings(r=128, alpha=512, dropout=0.1)).eval()
    params = trainable_parameters(model)
    for name, p in params:
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=1e-3)
    exp_avg = {name: 1e-4 * torch.randn(p.shape) for name, p in params}
    exp_avg_sq = {name: 1e-8 * torch.rand(p.shape) for name, p in params}
    moments = AdamMoments(exp_avg, exp_avg_sq, source="synthetic")
    data = TokenizedDataset(gsm8k(rows), tokenizer, MAX_LENGTH)
    return model, tokenizer, moments, data


def batches(data: TokenizedDataset, pad_token_id: int):
    """Batches of 8 rows sorted by length, as the extraction forms them."""
    order = sorted(range(len(data)), key=lambda i: -len(data.rows[i]["input_ids"]))
    collate = Collator(pad_token_id)
    return [collate([data[i] for i in order[k:k + BATCH]]) for k in range(0, len(order), BATCH)]


def plain_step(model, batch) -> None:
    logits, labels = response_logits(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    example_losses(logits, labels)[0].sum().backward()
    model.zero_grad(set_to_none=True)


def ours_step(model, batch, moments, projector, parts: dict[str, float]) -> torch.Tensor:
    """slimtune's gradient_features, with the time of each part recorded: Adam and the projection run inside
    the backward pass, so forward+backward is the rest (forming the per-example gradients included)."""
    offsets = parameter_offsets(model)
    out = torch.zeros(batch["input_ids"].shape[0], DIM)
    inside = dict.fromkeys(("Adam direction", "sparse JL projection"), 0.0)

    def consume(name, grad):
        start = time.perf_counter()
        vector = moments.direction(name, grad)
        middle = time.perf_counter()
        projector.project(vector, offsets[name], out)
        inside["Adam direction"] += middle - start
        inside["sparse JL projection"] += time.perf_counter() - middle

    start = time.perf_counter()
    stream_per_example_gradients(model, batch, consume)
    total = time.perf_counter() - start
    for part, seconds in inside.items():
        parts[part] += seconds
    parts["forward+backward, forming per-example gradients"] += total - sum(inside.values())
    return out


def authors_example(model, row, m, v, pad_token_id) -> tuple[float, float, torch.Tensor]:
    """One example the authors' way: HF loss, backward, cat of .grad, Adam on the full vector (m, v are
    the moments concatenated once, as their code prepares them)."""
    batch = Collator(pad_token_id)([row])
    start = time.perf_counter()
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
          labels=batch["labels"]).loss.backward()
    backward = time.perf_counter() - start
    start = time.perf_counter()
    params = trainable_parameters(model)
    g = torch.cat([p.grad.reshape(-1) for _, p in params])
    vector = (0.9 * m + 0.1 * g) / torch.sqrt(0.999 * v + 0.001 * g * g + 1e-8)
    model.zero_grad(set_to_none=True)
    return backward, time.perf_counter() - start, vector


def dense_product_seconds(vector: torch.Tensor, slice_rows: int, repeats: int = 3) -> float:
    """Seconds for vector[:slice_rows] @ P[:slice_rows] with P materialised (the authors' dense matrix)."""
    matrix = torch.randint(0, 2, (slice_rows, DIM), dtype=torch.float32).mul_(2).sub_(1)
    piece = vector[:slice_rows].unsqueeze(0)
    piece @ matrix  # first touch
    start = time.perf_counter()
    for _ in range(repeats):
        piece @ matrix
    return (time.perf_counter() - start) / repeats


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_worker(mode: str, rows: int, out: str) -> None:
    """In this fresh process, either extract features for ``rows`` pool rows into a fresh store or run a plain
    forward+backward over the same batches, reporting the resident-memory peak."""
    model, tokenizer, moments, data = setup(rows)
    base = rss_bytes()
    peak = [base]
    running = True

    def sample():
        while running:
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    tokens, store_bytes = 0, 0
    if mode == "plain":
        for batch in batches(data, tokenizer.pad_token_id):
            plain_step(model, batch)
            tokens += int(batch["attention_mask"].sum())
    else:
        with tempfile.TemporaryDirectory() as folder:
            stats = extract_gradient_features(model, data, FeatureStore(folder), projector=SparseJLProjector(DIM),
                                              moments=moments, batch_size=BATCH, shard_rows=16,
                                              pad_token_id=tokenizer.pad_token_id)
            store_bytes = sum(f.stat().st_size for f in Path(folder).rglob("*.npy"))
            tokens = stats.tokens
    seconds = time.perf_counter() - start
    running = False
    sampler.join()
    Path(out).write_text(json.dumps({"mode": mode, "rows": len(data), "tokens": tokens, "seconds": seconds,
                                     "rss_after_setup_mb": base / 2**20, "peak_rss_mb": peak[0] / 2**20,
                                     "growth_mb": (peak[0] - base) / 2**20, "store_mb": store_bytes / 2**20}))


def measure(args) -> dict:
    model, tokenizer, moments, data = setup(args.rows)
    params = trainable_parameters(model)
    dim_in = sum(p.numel() for _, p in params)
    work = batches(data, tokenizer.pad_token_id)
    tokens = sum(int(b["attention_mask"].sum()) for b in work)
    projector = SparseJLProjector(DIM)
    plain_step(model, work[0])  # warm-up: allocator, oneDNN kernels
    ours_step(model, work[0], moments, projector, dict.fromkeys(PARTS, 0.0))

    # alternate the two on each batch, so a change in the machine's load hits both alike
    plain = ours = 0.0
    parts = dict.fromkeys(PARTS, 0.0)
    for batch in work:
        start = time.perf_counter()
        plain_step(model, batch)
        plain += time.perf_counter() - start
        start = time.perf_counter()
        ours_step(model, batch, moments, projector, parts)
        ours += time.perf_counter() - start

    # the authors' recipe on the first rows; its dense product timed on a slice and scaled to D
    authors_rows = [data[i] for i in range(args.authors_rows)]
    authors_backward = authors_flatten = 0.0
    m = torch.cat([moments.exp_avg[n].reshape(-1) for n, _ in params])
    v = torch.cat([moments.exp_avg_sq[n].reshape(-1) for n, _ in params])
    for example in authors_rows:
        backward, flatten, vector = authors_example(model, example, m, v, tokenizer.pad_token_id)
        authors_backward += backward
        authors_flatten += flatten
    authors_tokens = sum(len(r["input_ids"]) for r in authors_rows)
    slice_rows = args.slice_rows
    dense_per_example = dense_product_seconds(vector, slice_rows) * dim_in / slice_rows
    authors_per_example = (authors_backward + authors_flatten) / len(authors_rows) + dense_per_example
    authors_no_projection = (authors_backward + authors_flatten) / len(authors_rows)

    rademacher = RademacherProjector(DIM)
    piece = torch.randn(BATCH, slice_rows // 16)
    rademacher.project(piece)
    start = time.perf_counter()
    rademacher.project(piece)
    rademacher_batch = (time.perf_counter() - start) * dim_in / piece.shape[1]

    n = len(data)
    floor, ours_per_example = plain / n, ours / n
    dense_ours = ours_per_example + (rademacher_batch - parts["sparse JL projection"] / len(work)) / BATCH
    rows = [
        row("plain forward+backward (floor)", floor, floor, tokens / plain),
        row("slimtune: batched + Adam + sparse JL", ours_per_example, floor, tokens / ours),
        row("slimtune with dense Rademacher (scaled)", dense_ours, floor),
        row("authors: 1 at a time, no projection", authors_no_projection, floor,
            authors_tokens / (authors_backward + authors_flatten)),
        row("authors: 1 at a time + dense matrix (scaled)", authors_per_example, floor),
    ]
    return {
        "rows": n, "tokens": tokens, "batches": len(work), "lora_params": dim_in, "proj_dim": DIM,
        "authors_rows": len(authors_rows), "slice_rows": slice_rows, "table": rows,
        "parts_seconds": parts, "overhead_vs_floor": ours / plain - 1,
        "speedup_vs_authors": authors_per_example / ours_per_example,
        "speedup_vs_authors_without_projection": authors_no_projection / ours_per_example,
        "dense_matrix_gb": dim_in * DIM * 4 / 1e9,
    }


def row(method: str, seconds: float, floor: float, tokens_per_second: float | None = None) -> dict:
    return {"method": method, "s/example": seconds, "examples/s": 1 / seconds, "tokens/s": tokens_per_second,
            "vs floor": seconds / floor}


PARTS = ("forward+backward, forming per-example gradients", "Adam direction", "sparse JL projection")


def memory(sizes: list[int]) -> list[dict]:
    """For each pool size, a plain forward+backward and then an extraction, each in a fresh process: the two
    alternate, so a change in the machine's load (or in other processes' memory) hits both alike."""
    out = []
    for rows in sizes:
        pair = {}
        for mode in ("plain", "extract"):
            with tempfile.NamedTemporaryFile(suffix=".json") as fh:
                subprocess.run([sys.executable, __file__, "--memory-worker", mode, str(rows), "--worker-out",
                                fh.name], check=True)
                pair[mode] = json.loads(Path(fh.name).read_text())
        out.append({**pair["extract"], "plain_peak_rss_mb": pair["plain"]["peak_rss_mb"],
                    "plain_growth_mb": pair["plain"]["growth_mb"], "plain_seconds": pair["plain"]["seconds"],
                    "peak_vs_plain": pair["extract"]["peak_rss_mb"] / pair["plain"]["peak_rss_mb"]})
    return out


LAYER_POOL = (("gsm8k", 20), ("p3", 20), ("tatoeba", 15), ("taskmaster4", 5))


def layers_agreement(choices: list[int]) -> dict:
    """LESS on a small mixed pool of the bundled sample with the demo's settings and one warm-up checkpoint,
    all layers against the top N: extraction time and how far the selections agree."""
    from dataclasses import asdict

    from slimtune.bench.demo import DemoSettings
    from slimtune.data.recipes import load_recipe
    from slimtune.select import get_selector

    pool = [ex for source, n in LAYER_POOL for ex in load_recipe(source, split="train", limit=n, seed=0)]
    ids = {ex.id for ex in pool}
    targets = [ex for ex in load_recipe("gsm8k", split="train", limit=len(pool) + 50, seed=1)
               if ex.id not in ids][:4]
    less = DemoSettings().less
    settings = {**less, "training": {**less["training"], "epochs": 1.0}}
    runs = {}
    with tempfile.TemporaryDirectory() as cache:
        for layers in [None, *choices]:
            selector = get_selector("less", model="smollm2", cache_dir=cache, **{**settings, "layers": layers})
            start = time.perf_counter()
            selection = selector.select(pool, 0.1, target=targets)
            details = selection.cost.details["less"]
            runs[layers] = {"scores": selection.scores.tolist(), "seconds": time.perf_counter() - start,
                            "extraction_seconds": details["pool_features"]["seconds"]
                            + details["target_features"]["seconds"]}
    reference = np.asarray(runs[None]["scores"])
    gsm8k = np.array([ex.task == "gsm8k" for ex in pool])
    table = []
    for layers, run in runs.items():
        scores = np.asarray(run["scores"])
        row = {"layers": "all" if layers is None else layers, "extraction_seconds": run["extraction_seconds"],
               "speedup": runs[None]["extraction_seconds"] / run["extraction_seconds"],
               "spearman": spearman(scores, reference),
               "gsm8k_share_top_15": float(gsm8k[top(scores, 0.15)].mean())}
        for share in (0.1, 0.3):
            row[f"overlap_top_{share:.0%}"] = len(set(top(scores, share)) & set(top(reference, share))) / len(
                top(reference, share))
        table.append(row)
    return {"pool": len(pool), "targets": len(targets), "settings": settings, "table": table,
            "pool_sources": dict(LAYER_POOL), "demo_settings": asdict(DemoSettings())["less"]}


def top(scores: np.ndarray, share: float) -> list[int]:
    return np.argsort(-scores, kind="stable")[:max(1, round(share * len(scores)))].tolist()


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks = [np.argsort(np.argsort(x, kind="stable"), kind="stable") for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def fmt(value, digits=2) -> str:
    if value is None:
        return ""
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def markdown(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *["| " + " | ".join(cells) + " |" for cells in body]]


def tables(result: dict) -> str:
    lines = markdown(["method", "s / example", "examples / s", "tokens / s", "time vs floor"],
                     [[r["method"], fmt(r["s/example"], 3), fmt(r["examples/s"], 3), fmt(r["tokens/s"], 1),
                       f"{r['vs floor']:.2f}x"] for r in result["table"]])
    total = sum(result["parts_seconds"].values())
    lines += ["", *markdown(["part of slimtune's extraction", "seconds", "share"],
                            [[part, f"{sec:.2f}", f"{sec / total:.0%}"]
                             for part, sec in result["parts_seconds"].items()])]
    lines += ["", *markdown(["pool rows", "tokens", "plain fwd+bwd peak RSS MB", "extraction peak RSS MB",
                             "extraction / plain peak", "plain growth MB", "extraction growth MB",
                             "RSS after setup MB", "plain s", "extraction s", "store MB"],
                            [[str(m["rows"]), f"{m['tokens']:,}", f"{m['plain_peak_rss_mb']:.0f}",
                              f"{m['peak_rss_mb']:.0f}", f"{m['peak_vs_plain']:.2f}x", f"{m['plain_growth_mb']:.0f}",
                              f"{m['growth_mb']:.0f}", f"{m['rss_after_setup_mb']:.0f}",
                              f"{m['plain_seconds']:.1f}", f"{m['seconds']:.1f}", f"{m['store_mb']:.2f}"]
                             for m in result["memory"]])]
    if result.get("layers"):
        lines += ["", *markdown(["layers taken", "extraction s", "speed-up", "top-10% overlap", "top-30% overlap",
                                 "Spearman vs all", "GSM8K share of top 15%"],
                                [[str(r["layers"]), f"{r['extraction_seconds']:.1f}", f"{r['speedup']:.2f}x",
                                  f"{r['overlap_top_10%']:.0%}", f"{r['overlap_top_30%']:.0%}",
                                  f"{r['spearman']:.3f}", f"{r['gsm8k_share_top_15']:.2f}"]
                                 for r in result["layers"]["table"]])]
    return "\n".join(lines)


def machine() -> str:
    load = os.getloadavg()[0]
    return (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, load average {load:.1f} at the end")


def layers_note(layers: dict) -> str:
    sources = ", ".join(f"{k} {v}" for k, v in layers["pool_sources"].items())
    return (f"- layers: LESS with the demo's settings (LoRA r={layers['settings']['training']['lora']['r']}, d = "
            f"{layers['settings']['proj_dim']}, max length {layers['settings']['max_length']}) but one warm-up "
            f"epoch (one checkpoint), on {layers['pool']} rows of the bundled sample ({sources}) against "
            f"{layers['targets']} GSM8K questions; each row of the layers table is a separate selection sharing the "
            "warm-up; extraction s = pool + target features; overlap and Spearman compare with all layers\n")


def write_readme(result: dict) -> None:
    runs = "; ".join(f"{part}: `{run['command']}` on {run['machine']}, {run['date']} ({run['seconds']:.0f} s)"
                     for part, run in result["runs"].items())
    body = (f"Parts and the runs that measured them: {runs}. Throughput: "
            f"{result['rows']} GSM8K training rows ({result['tokens']:,} tokens, max length {MAX_LENGTH}, "
            f"batches of {BATCH} sorted by length), SmolLM2-135M in fp32, LoRA r=128 / alpha 512 on q/k/v/o "
            f"({result['lora_params']:,} gradient coordinates), d = {DIM}; random LoRA B and synthetic Adam "
            f"moments. Authors' recipe timed on {result['authors_rows']} rows; rows marked *scaled* time a "
            f"dense product on {result['slice_rows']:,} of the {result['lora_params']:,} matrix rows and "
            f"scale linearly (the authors' matrix would be {result['dense_matrix_gb']:,.0f} GB). Results: "
            "`benchmarks/results/less_features.json`.\n\n" + tables(result) + "\n\n"
            f"- projection overhead (extraction vs the plain forward+backward floor): "
            f"{result['overhead_vs_floor']:+.0%} (target <= +15%: "
            f"{'met' if result['overhead_vs_floor'] <= 0.15 else 'MISSED'})\n"
            f"- speed-up over the authors' one-at-a-time recipe with its dense matrix: "
            f"{result['speedup_vs_authors']:,.0f}x (target >= 5x: "
            f"{'met' if result['speedup_vs_authors'] >= 5 else 'MISSED'}); without any projection, batching "
            f"alone: {result['speedup_vs_authors_without_projection']:.1f}x (batches pay for padding; one "
            "row at a time pays none, which is why the floor is per batch)\n"
            "- the dense-Rademacher row is slimtune's fallback projector, which regenerates its seeded blocks on "
            "every call because it never holds the matrix; the authors' row times only the product with a matrix "
            "already in memory, which at this size it cannot be. The sparse JL transform is the default\n"
            + "".join(f"- memory, {m['rows']} rows: extraction peaks at {m['peak_rss_mb']:.0f} MB RSS, the plain "
                      f"forward+backward of the same batches at {m['plain_peak_rss_mb']:.0f} MB: "
                      f"{m['peak_vs_plain']:.2f}x (target <= 1.5x: {'met' if m['peak_vs_plain'] <= 1.5 else 'MISSED'})"
                      "; each in a fresh process, plain then extraction\n" for m in result["memory"])
            + (layers_note(result["layers"]) if result.get("layers") else ""))
    replace_section(HEADING, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64, help="pool rows for the throughput comparison")
    parser.add_argument("--authors-rows", type=int, default=8, help="rows timed one at a time")
    parser.add_argument("--memory-rows", type=int, nargs="+", default=[16, 32], help="pool sizes for memory")
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 4],
                        help="top-N layer counts compared with all layers")
    parser.add_argument("--slice-rows", type=int, default=1 << 15, help="dense-matrix rows actually timed")
    parser.add_argument("--parts", nargs="+", choices=list(PART_KEYS), default=list(PART_KEYS),
                        help="parts to (re)run; the others keep their stored results")
    parser.add_argument("--no-readme", action="store_true", help="do not update benchmarks/README.md")
    parser.add_argument("--memory-worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.memory_worker:
        memory_worker(args.memory_worker[0], int(args.memory_worker[1]), args.worker_out)
        return
    # each part reruns alone and replaces its own keys in the stored results, so parts can run at different
    # times (or side by side) and the README shows every part with the command and machine that produced it
    result = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    runs = result.setdefault("runs", {})
    command = command_line("less_features.py", sys.argv[1:])
    for part in args.parts:
        start = time.perf_counter()
        if part == "throughput":
            result.update(measure(args))
        elif part == "memory":
            result["memory"] = memory(args.memory_rows)
        else:
            result["layers"] = layers_agreement(args.layers)
        runs[part] = {"command": command, "machine": machine(), "seconds": time.perf_counter() - start,
                      "date": time.strftime("%Y-%m-%d")}
    print(tables(result))
    latest = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}  # a part run side by side may have
    for part in set(latest.get("runs", {})) - set(args.parts):            # finished meanwhile: keep its keys
        result.update({k: latest[k] for k in PART_KEYS[part] if k in latest})
        runs[part] = latest["runs"][part]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    if not args.no_readme:
        write_readme(result)


PART_KEYS = {"throughput": ["rows", "tokens", "batches", "lora_params", "proj_dim", "authors_rows", "slice_rows",
                            "table", "parts_seconds", "overhead_vs_floor", "speedup_vs_authors",
                            "speedup_vs_authors_without_projection", "dense_matrix_gb"],
             "memory": ["memory"], "layers": ["layers"]}


if __name__ == "__main__":
    main()
