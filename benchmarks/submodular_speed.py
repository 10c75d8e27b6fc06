"""Speed of slimtune's facility-location greedy versus submodlib, on kNN-sparsified cosine kernels.

For each pool size n: clustered synthetic embeddings -> DELIFT(SE)'s kernel (cos + 1) / 2 keeping each row's
``--neighbours`` nearest candidates -> pick ``--fraction`` of the pool. Rows: slimtune's lazy, stochastic and
(small n) naive greedy on the sparse kernel, slimtune's lazy greedy on the dense equivalent, and submodlib's
LazyGreedy on the same kernel in its sparse mode and, where it fits, dense mode. Every row optimises the same
function, except that submodlib's sparse mode silently symmetrises the kernel to max(S, S^T) (so it
optimises a slightly different function; its objective is reported on S). ``vs_lazy`` is seconds / slimtune
lazy (sparse).

    .venv/bin/python benchmarks/submodular_speed.py                     # n = 2000 ... 20000
    .venv/bin/python benchmarks/submodular_speed.py --sizes 1000 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from slimtune.select.submodular import FacilityLocation, cosine_kernel, greedy_maximize

RESULTS = Path(__file__).resolve().parent / "results" / "submodular_speed.json"


def clustered_embeddings(n: int, dim: int, clusters: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=g)
    return centres[torch.randint(0, clusters, (n,), generator=g)] + 0.7 * torch.randn(n, dim, generator=g)


def timed(fn):
    """``((wall seconds, CPU seconds of this process), fn())``: on a shared machine CPU time shows what the
    method itself spent when wall time is inflated by other jobs."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return (time.perf_counter() - wall, time.process_time() - cpu), out


def ours(kernel, k: int, method: str, device: str, seed: int) -> tuple[tuple[float, float], float]:
    """``((wall, CPU) seconds, objective)`` of slimtune's greedy, building the objective included."""

    def run():
        objective = FacilityLocation(kernel.to(device))
        order, _ = greedy_maximize(objective, k, method=method, seed=seed)
        if device != "cpu":
            torch.cuda.synchronize()
        return objective, order

    seconds, (objective, order) = timed(run)
    return seconds, objective.evaluate(order)


def submodlib_fl(kernel: torch.Tensor, k: int, neighbours: int, dense: bool):
    """``((wall, CPU) seconds, objective)`` of submodlib's FacilityLocation LazyGreedy, building the function
    included (None without submodlib)."""
    try:
        import scipy.sparse
        from submodlib.functions.facilityLocation import FacilityLocationFunction
    except ImportError:
        return None
    n = kernel.shape[0]
    coo = kernel.coalesce()
    rows, cols = coo.indices().numpy()
    csr = scipy.sparse.csr_matrix((coo.values().double().numpy(), (rows, cols)), shape=(n, n))

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            if dense:
                fl = FacilityLocationFunction(n, mode="dense", sijs=csr.toarray(), separate_rep=False)
            else:
                fl = FacilityLocationFunction(n, mode="sparse", sijs=csr, num_neighbors=neighbours)
            return fl.maximize(k, optimizer="LazyGreedy", show_progress=False)

    seconds, picks = timed(run)
    return seconds, float(FacilityLocation(kernel).evaluate([j for j, _ in picks]))


def contenders(kernel: torch.Tensor, k: int, args: argparse.Namespace) -> list[tuple[str, Callable]]:
    n = kernel.shape[0]
    mine = partial(ours, k=k, device=args.device, seed=args.seed)
    runs = [("slimtune lazy (sparse)", partial(mine, kernel, method="lazy")),
            ("slimtune stochastic (sparse)", partial(mine, kernel, method="stochastic"))]
    if n <= args.naive_limit:
        runs.append(("slimtune naive (sparse)", partial(mine, kernel, method="naive")))
    if n <= args.dense_limit:
        runs.append(("slimtune lazy (dense)", partial(mine, kernel.to_dense(), method="lazy")))
    theirs = partial(submodlib_fl, kernel, k, args.neighbours)
    if n <= args.submodlib_sparse_limit:
        runs.append(("submodlib lazy (sparse*)", partial(theirs, dense=False)))
    if n <= args.dense_limit:
        runs.append(("submodlib lazy (dense)", partial(theirs, dense=True)))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 5000, 10000, 20000])
    parser.add_argument("--neighbours", type=int, default=32)
    parser.add_argument("--fraction", type=float, default=0.3)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--clusters", type=int, default=100)
    parser.add_argument("--naive-limit", type=int, default=5000, help="largest n for naive greedy")
    parser.add_argument("--dense-limit", type=int, default=10000, help="largest n for dense-kernel rows")
    parser.add_argument("--submodlib-sparse-limit", type=int, default=5000,
                        help="largest n for submodlib's sparse mode (n = 10000 takes minutes)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    # the first call of each torch kernel pays one-off set-up costs that would land on the first timed row
    warm_up = cosine_kernel(clustered_embeddings(300, args.dim, args.clusters, args.seed), k=args.neighbours)
    for method in ["lazy", "stochastic", "naive"]:
        ours(warm_up, 90, method, args.device, args.seed)
        ours(warm_up.to_dense(), 90, method, args.device, args.seed)

    rows = []
    for n in args.sizes:
        kernel = cosine_kernel(clustered_embeddings(n, args.dim, args.clusters, args.seed), k=args.neighbours)
        k = round(args.fraction * n)
        reference = None
        for method, run in contenders(kernel, k, args):
            result = run()
            if result is None:
                continue
            (seconds, cpu_seconds), objective = result
            reference = reference or seconds
            rows.append({"n": n, "nnz": kernel._nnz(), "k": k, "method": method, "seconds": round(seconds, 3),
                         "cpu_seconds": round(cpu_seconds, 3), "objective": round(objective, 3),
                         "vs_lazy": round(seconds / reference, 2)})
            print(" | ".join(f"{key}={value}" for key, value in rows[-1].items()), flush=True)

    header = list(rows[0])
    widths = [max(len(h), *(len(str(r[h])) for r in rows)) for h in header]
    print()
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(str(r[h]).ljust(w) for h, w in zip(header, widths)))
    print("* submodlib's sparse mode optimises FL over max(S, S^T); objective shown on S")

    environment = {"torch": torch.__version__, "numpy": np.__version__, "device": args.device,
                   "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                   "machine": platform.machine()}
    settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"settings": settings, "environment": environment, "rows": rows}
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
