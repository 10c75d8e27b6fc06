"""Nearest neighbours for sparse kernels, computed once and read by every process; the dense-or-sparse rule.

A sparse kernel scores each row against its k nearest columns only, and its stored blocks are keyed by those
neighbour lists, so every process must hold exactly the same lists. :func:`nearest_neighbours` computes them a
shard of rows at a time through a keyed feature store (under ``accelerate launch`` / ``torchrun`` each process
its share, then all read the merged lists) and makes them exact and engine-independent:

1. candidates: the k + :data:`MARGIN` columns of highest float32 cosine, by faiss (``IndexFlatIP``, when
   installed) or by a blocked torch search (:func:`~slimtune.features.store.chunked_matmul_topk`); the two may
   disagree in the last bits of a cosine;
2. ranking: the candidates' cosines recomputed in float64, best first, ties to the lower column index;
3. a row whose k-th float64 cosine is within float32 error of its last candidate's (a tie group wider than
   the margin: duplicated rows) might miss a column the other engine found, so it is searched again in
   float64 over every column.

Either engine therefore gives the same lists, equal to a float64 brute-force search with index tie-breaks.
Above :data:`EXACT_LIMIT` candidates faiss searches an inverted-file index instead (step 1 becomes
approximate: a true neighbour in a list it does not probe is missed); its centroids are a seeded sample of the
rows, so every process builds the same index and the stored lists still do not depend on the process count.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from slimtune.features.store import FeatureStore, chunked_matmul_topk

#: Extra float32 candidates per row, so float32 rounding rarely decides which columns are ranked.
MARGIN = 8
#: Candidates above which faiss searches an inverted-file index (approximate, near n * sqrt(n) work) instead of
#: comparing every pair; the blocked torch search stays exact at any size.
EXACT_LIMIT = 200_000
#: Inverted lists searched per query by that index (of 4 sqrt(n)).
NPROBE = 64
#: A kernel with more columns than this is made sparse unless the caller chose otherwise (DELIFT(SE)).
DENSE_LIMIT = 5000
#: Neighbours per row of a kernel made sparse by :func:`sparse_width`.
AUTO_SPARSE_K = 32
_FORMAT_VERSION = 1
_QUERY_BLOCK = 1024
#: Rows whose candidates are gathered in float64 at once (256 x 40 x 384 doubles: 31 MB).
_RANK_BLOCK = 256


def sparse_width(n_columns: int, sparse_k: int | None) -> int | None:
    """Neighbours per row for a kernel over ``n_columns`` candidates: ``sparse_k`` when set and below
    ``n_columns``, :data:`AUTO_SPARSE_K` when unset and the dense kernel would exceed :data:`DENSE_LIMIT`
    columns, else None (dense)."""
    if sparse_k is None:
        return AUTO_SPARSE_K if n_columns > DENSE_LIMIT else None
    return sparse_k if sparse_k < n_columns else None


def require_dense_fits(n_rows: int, n_columns: int, bytes_per_entry: int, *,
                       available: int | None = None) -> None:
    """Refuse, before any work, a dense kernel that needs more than the memory available now
    (``bytes_per_entry``: what its builder holds per kernel entry at its peak), naming the size it would need
    and the way out."""
    import psutil  # accelerate's own dependency

    need = n_rows * n_columns * bytes_per_entry
    available = psutil.virtual_memory().available if available is None else available
    if need > available:
        raise MemoryError(
            f"a dense {n_rows:,} x {n_columns:,} kernel needs about {need / 2**30:.1f} GiB ({bytes_per_entry} bytes "
            f"per entry while it is built and scaled) but {available / 2**30:.1f} GiB is available: set sparse_k "
            f"(e.g. {AUTO_SPARSE_K}) to keep only each row's nearest columns")


def nearest_neighbours(queries: Tensor, candidates: Tensor, k: int, *, cache: bool | str | os.PathLike = True,
                       engine: str = "auto", shard_rows: int = 4096) -> tuple[Tensor, Tensor]:
    """For each query row, the ``k`` candidate rows of highest cosine (``k`` capped at the candidates):
    ``(cosines, indices)``, both (len(queries), k), best first, ties to the lower index (module docstring).

    ``cache``: True for the feature store under the slimtune cache, a folder for a store root elsewhere, or
    False for a store in a temporary folder (then every process searches every row). ``engine``: "faiss",
    "torch" or "auto" (faiss when installed); the answer does not depend on it.
    """
    same = candidates is queries
    queries = _unit_rows(queries)
    candidates = queries if same else _unit_rows(candidates)
    k = min(k, len(candidates))
    if engine == "auto":
        engine = "faiss" if importlib.util.find_spec("faiss") is not None else "torch"
    if engine not in ("faiss", "torch"):
        raise ValueError(f"engine must be 'faiss', 'torch' or 'auto'; got {engine!r}")

    index = []  # the faiss index, built by the first shard this process computes and kept for the others

    def compute(lo: int, hi: int) -> dict[str, np.ndarray]:
        width = min(len(candidates), k + MARGIN)
        if engine == "faiss":
            index[:] = index or [_faiss_index(candidates)]
            found = torch.from_numpy(index[0].search(np.ascontiguousarray(queries[lo:hi].numpy()), width)[1])
        else:
            found = torch.cat([chunked_matmul_topk(candidates, queries[start:min(hi, start + _QUERY_BLOCK)], width)[1]
                               for start in range(lo, hi, _QUERY_BLOCK)])
        cosines, indices = _exact_top(queries[lo:hi], candidates, found.long(), k)
        return {"cosines": cosines, "indices": indices}

    key = {"kind": "neighbours", "version": _FORMAT_VERSION, "queries": _digest(queries),
           "candidates": _digest(candidates), "k": k, "shard_rows": shard_rows,
           "search": "exact" if engine == "torch" or len(candidates) <= EXACT_LIMIT else f"ivf-{NPROBE}"}
    with FeatureStore.cached(key, cache) as store:
        return _filled(store, len(queries), shard_rows, compute)


def _unit_rows(rows: Tensor) -> Tensor:
    """``rows`` as unit-norm float32 rows on the CPU, copied only when they are not that already: a pool's
    stored embeddings are (the embeddings module's contract), and at a million 384-d rows each copy is 1.5 GB."""
    rows = torch.as_tensor(rows, dtype=torch.float32).cpu()
    norms = torch.cat([part.norm(dim=1) for part in rows.split(1 << 16)]) if len(rows) else rows.new_ones(0)
    return rows if bool(((norms - 1).abs() <= 1e-5).all()) else F.normalize(rows, dim=1)


def _filled(store: FeatureStore, n: int, shard_rows: int, compute) -> tuple[Tensor, Tensor]:
    store.fill(["cosines", "indices"], n, shard_rows, compute)
    return (torch.from_numpy(np.asarray(store.open("cosines", n))),
            torch.from_numpy(np.asarray(store.open("indices", n))))


def _faiss_index(candidates: Tensor):
    """An exact inner-product index, or above :data:`EXACT_LIMIT` rows an inverted-file one whose centroids
    are a seeded sample of the rows (not k-means), so every process builds the same index."""
    import faiss

    rows = np.ascontiguousarray(candidates.numpy())
    if len(rows) <= EXACT_LIMIT:
        index = faiss.IndexFlatIP(rows.shape[1])
    else:
        n_lists = int(4 * math.sqrt(len(rows)))
        quantizer = faiss.IndexFlatIP(rows.shape[1])
        quantizer.add(rows[np.sort(np.random.default_rng(0).choice(len(rows), n_lists, replace=False))])
        index = faiss.IndexIVFFlat(quantizer, rows.shape[1], n_lists, faiss.METRIC_INNER_PRODUCT)
        index.train(rows[:n_lists])  # a quantizer that already holds n_lists centroids is kept as it is
        index.nprobe = NPROBE
    index.add(rows)
    return index


def _exact_top(queries: Tensor, candidates: Tensor, found: Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of each row's ``found`` candidates (-1: none) by float64 cosine, ties to the lower index;
    a row the candidates cannot settle is searched in float64 over every candidate."""
    missing = found < 0
    found = found.clamp_min(0)
    # products summed element-wise, not by a matrix kernel: a BLAS kernel may round a column at the edge of its
    # tile differently from one inside it, so equal rows would get cosines one ulp apart and ties would not be ties
    cosines = torch.cat([(queries[lo:lo + _RANK_BLOCK, None].double()
                          * candidates[found[lo:lo + _RANK_BLOCK]].double()).sum(-1)
                         for lo in range(0, len(queries), _RANK_BLOCK)])
    cosines[missing] = -torch.inf
    cosines, found = _ranked(cosines, found)
    # a float32 cosine is within `slack` of the float64 one, so a column outside the candidates cannot beat
    # the k-th unless that is within twice the slack of the weakest candidate
    slack = queries.shape[1] * 2.0 ** -23
    unsure = (cosines[:, k - 1] - cosines[:, -1] <= 2 * slack) & (found.shape[1] < len(candidates))
    unsure |= ~torch.isfinite(cosines[:, k - 1])
    for row in torch.nonzero(unsure)[:, 0].tolist():
        every = torch.cat([(candidates[lo:lo + _RANK_BLOCK * 64].double() * queries[row].double()).sum(-1)
                           for lo in range(0, len(candidates), _RANK_BLOCK * 64)])
        cosines[row, :k], found[row, :k] = (part[0, :k] for part in _ranked(
            every[None], torch.arange(len(candidates))[None]))
    return cosines[:, :k].float().numpy(), found[:, :k].numpy()


def _ranked(cosines: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's entries best first, ties to the lower index: sort by index, then stably by cosine."""
    by_index = torch.argsort(indices, dim=1)
    cosines, indices = cosines.gather(1, by_index), indices.gather(1, by_index)
    order = torch.sort(cosines, dim=1, descending=True, stable=True).indices
    return cosines.gather(1, order), indices.gather(1, order)


def _digest(rows: Tensor) -> str:
    digest = hashlib.sha256()
    for part in rows.split(1 << 16):  # a slice at a time: a whole-matrix tobytes() is one more copy of it
        digest.update(np.ascontiguousarray(part.numpy()).tobytes())
    return digest.hexdigest()[:20]


__all__ = ["AUTO_SPARSE_K", "DENSE_LIMIT", "nearest_neighbours", "require_dense_fits", "sparse_width"]
