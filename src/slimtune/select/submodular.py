"""Facility-location objectives and greedy maximisers for submodular subset selection, in torch.

A kernel ``S`` has one row per *ground* element ``i`` (what must be represented, usually the pool) and one
column per *candidate* ``j`` (what may be picked, usually the pool again); ``S[i, j]`` in [0, 1] is how well
``j`` represents ``i``. For a chosen set ``A`` of candidates:

    Facility Location (FL)         f(A)     = sum_i max_{j in A} S[i, j]
    FL Mutual Information (FLMI)   I(A; Q)  = sum_i min(max_{j in A} S[i, j], eta * max_{q in Q} S_Q[i, q])
    FL Conditional Gain (FLCG)     f(A | P) = sum_i max(max_{j in A} S[i, j] - nu * max_{p in P} S_P[i, p], 0)

with ``S_Q`` (ground x queries) the similarity to a target/query set Q and ``S_P`` (ground x existing) the
similarity to an already-learnt set P; ``eta = nu = 1`` by default and the empty set scores 0. These are
submodlib's definitions (``FacilityLocationMutualInformationFunction``: ``query_sijs`` is n x |Q| and the sum
runs over the ground set, not over Q; ``FacilityLocationConditionalGainFunction``: f(A u P) - f(P) of an FL
over [S | nu S_P], which is the formula above), which DELIFT calls directly.

All three are one facility location in disguise. Keep ``best[i] = max(floor[i], max_{j in A} S[i, j])``;
the gain of candidate ``j`` is ``sum_i relu(S[i, j] - best[i])``, the value ``sum_i best[i] - floor[i]``:

    FL     floor = 0,                              kernel S
    FLMI   floor = 0,                              kernel min(S[i, j], cap[i]), cap[i] = eta * max_q S_Q[i, q]
           (min distributes over max, so min(max_j S[i, j], cap[i]) = max_j min(S[i, j], cap[i]))
    FLCG   floor[i] = nu * max_p S_P[i, p],        kernel S
           (max(m - b, 0) = max(m, b) - b for b >= 0)

Kernels may be dense tensors, torch sparse tensors (COO/CSR/CSC) or a k-nearest-neighbour pair
``(indices, values)`` of shape (n, k) each: row ``i`` is similar only to candidates ``indices[i]``, 0
elsewhere (a square pool kernel). Sparse kernels are never densified: they are stored column-wise (CSC),
so a block of candidates' gains is one gather over their stored entries; missing entries are 0 and gain
nothing because ``best >= 0``.

A sparse kernel may instead say what its missing entries stand for: ``background`` b > 0, the value of
every entry it does not store (DELIFT's utility kernel, where an uncomputed pair means "no effect", which
scales to a value above the harmful pairs'). The objective is then exactly the one over the dense kernel
with b in those entries, still without densifying it. A pick raises every row it does not store to b, so
with ``shortfall = sum_i max(b - best[i], 0)`` (kept over the few rows still below b) the gain of ``j`` is

    shortfall + sum over j's stored entries (i, s) of  max(s - best[i], 0) - max(b - best[i], 0),

one gather over ``j``'s column as before; a stored entry below b (a harmful pair) gains less than not
being stored at all.

:func:`greedy_maximize` runs naive, lazy (Minoux's accelerated greedy, identical picks to naive) or
stochastic greedy (Mirzasoleiman et al., 2015) over any of the objectives and always returns ``k`` items;
ties go to the lowest candidate index.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Iterable, Iterator, Sequence, Set

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from slimtune.select.base import Budget, Selection

#: A dense or torch-sparse (ground x candidates) tensor, or a square kNN kernel ``(indices, values)``.
Kernel = Tensor | tuple[Tensor, Tensor]

#: Elements a dense gain block may materialise at once, which bounds the memory of naive greedy's sweeps.
_BLOCK_ELEMENTS = 1 << 24
#: Lazy greedy re-evaluates stale heap tops in blocks that double from the first size up to the last,
#: trading a few wasted gains for far fewer Python round trips when many bounds are stale.
_LAZY_FIRST_BLOCK = 8
_LAZY_MAX_BLOCK = 64


class _DenseColumns:
    """A dense kernel stored candidate-major, so each candidate's column is one contiguous row."""

    def __init__(self, by_candidate: Tensor):
        self.by_candidate = by_candidate
        self.n_candidates, self.n_ground = by_candidate.shape
        self.dtype, self.device = by_candidate.dtype, by_candidate.device

    def _blocks(self, candidates: Tensor) -> tuple[Tensor, ...]:
        if len(candidates) == 0:
            return ()
        return candidates.split(max(1, _BLOCK_ELEMENTS // max(1, self.n_ground)))

    def gains(self, best: Tensor, candidates: Tensor | None, low: Tensor | None) -> Tensor:
        if candidates is None:
            candidates = torch.arange(self.n_candidates, device=self.device)
        parts = [(self.by_candidate[b] - best).clamp_(min=0).sum(1) for b in self._blocks(candidates)]
        return torch.cat(parts) if parts else best.new_zeros(0)

    def below_background(self, best: Tensor) -> None:
        return None  # every entry is stored

    def raise_best(self, best: Tensor, j: int, low: None) -> None:
        torch.maximum(best, self.by_candidate[j], out=best)

    def cover(self, best: Tensor, candidates: Tensor) -> None:
        for b in self._blocks(candidates):
            torch.maximum(best, self.by_candidate[b].amax(0), out=best)

    def clip_rows(self, cap: Tensor) -> _DenseColumns:
        return _DenseColumns(torch.minimum(self.by_candidate, cap))


class _SparseColumns:
    """A sparse kernel in CSC form: candidate ``j`` covers ground rows ``rows[ptr[j]:ptr[j+1]]``; every
    other entry of row ``i`` is ``background[i]`` (None: 0 everywhere, the plain sparse kernel)."""

    def __init__(self, ptr: Tensor, rows: Tensor, cols: Tensor, values: Tensor, n_ground: int,
                 background: Tensor | None = None):
        self.ptr, self.rows, self.cols, self.values = ptr, rows, cols, values
        self.background = background
        self.n_ground, self.n_candidates = n_ground, len(ptr) - 1
        self.dtype, self.device = values.dtype, values.device
        # add() slices one column per pick; host-side offsets spare a device sync each time.
        self._ptr_host = ptr.tolist()

    def _entries(self, candidates: Tensor) -> tuple[Tensor, Tensor]:
        """For the stored entries of ``candidates``' columns: each entry's position in ``candidates``, and
        its index into ``rows``/``values``."""
        starts = self.ptr[candidates]
        lengths = self.ptr[candidates + 1] - starts
        first = torch.cumsum(lengths, 0) - lengths  # where each candidate's entries begin in the output
        total = int(lengths.sum())
        # Segment ids by marking where each later candidate begins and counting marks: unlike
        # repeat_interleave this stays single-threaded on small blocks, which matters on busy CPUs.
        marks = torch.zeros(total + 1, dtype=torch.long, device=starts.device)
        segment = marks.index_add_(0, first[1:], torch.ones_like(first[1:]))[:total].cumsum(0)
        entry = torch.arange(total, device=starts.device) + (starts - first)[segment]
        return segment, entry

    def _entry_gains(self, best: Tensor, rows: Tensor, values: Tensor) -> Tensor:
        gain = (values - best[rows]).clamp_(min=0)
        if self.background is not None:  # the background this stored entry replaces
            gain -= (self.background[rows] - best[rows]).clamp_(min=0)
        return gain

    def gains(self, best: Tensor, candidates: Tensor | None, low: Tensor | None) -> Tensor:
        shortfall = 0.0 if low is None else float((self.background[low] - best[low]).sum())
        if candidates is None:  # every entry, already grouped by column
            out = best.new_zeros(self.n_candidates)
            out.index_add_(0, self.cols, self._entry_gains(best, self.rows, self.values))
        else:
            segment, entry = self._entries(candidates)
            out = best.new_zeros(len(candidates))
            out.index_add_(0, segment, self._entry_gains(best, self.rows[entry], self.values[entry]))
        return out.add_(shortfall)

    def below_background(self, best: Tensor) -> Tensor | None:
        """The rows whose best is still below their background (None without a background)."""
        if self.background is None:
            return None
        return (best < self.background).nonzero().squeeze(1)

    def raise_best(self, best: Tensor, j: int, low: Tensor | None) -> Tensor | None:
        """Add ``j``: its stored rows rise to their entries, every other row to its background (only the
        ``low`` rows can be below it). Returns the rows still below their background."""
        span = slice(self._ptr_host[j], self._ptr_host[j + 1])
        rows = self.rows[span]
        raised = torch.maximum(best[rows], self.values[span])
        if low is not None:
            best[low] = torch.maximum(best[low], self.background[low])
        best[rows] = raised
        return None if low is None else low[best[low] < self.background[low]]

    def cover(self, best: Tensor, candidates: Tensor) -> None:
        candidates = candidates.unique()
        _, entry = self._entries(candidates)
        if self.background is not None:  # a row with fewer stored entries than picks meets its background
            stored = torch.bincount(self.rows[entry], minlength=self.n_ground)
            missing = stored < len(candidates)
            best[missing] = torch.maximum(best[missing], self.background[missing])
        best.scatter_reduce_(0, self.rows[entry], self.values[entry], "amax")

    def clip_rows(self, cap: Tensor) -> _SparseColumns:
        clipped = torch.minimum(self.values, cap[self.rows])
        background = None if self.background is None else torch.minimum(self.background, cap)
        return _SparseColumns(self.ptr, self.rows, self.cols, clipped, self.n_ground, background)


def _float(t: Tensor) -> Tensor:
    return t if t.is_floating_point() else t.float()


def _check_background(background: float) -> None:
    if not (math.isfinite(background) and background >= 0):
        raise ValueError(f"background must be finite and non-negative, got {background}")


def _check_nonnegative(values: Tensor, what: str) -> None:
    if values.numel() and not (values.min() >= 0 and torch.isfinite(values).all()):
        raise ValueError(f"{what} must be finite and non-negative (similarities in [0, 1])")


def _triplets(kernel: Kernel) -> tuple[Tensor, Tensor, Tensor, tuple[int, int]]:
    """``(rows, cols, values, shape)`` of a sparse kernel in either accepted form."""
    if isinstance(kernel, tuple):
        indices, values = kernel
        if indices.shape != values.shape or indices.dim() != 2:
            raise ValueError("a kNN kernel is (indices, values), both of shape (n, k)")
        n, k = indices.shape
        if indices.numel() and not 0 <= int(indices.min()) <= int(indices.max()) < n:
            raise ValueError(f"a kNN kernel's indices must name candidates of its own pool of {n}")
        rows = torch.arange(n, device=indices.device).repeat_interleave(k)
        return rows, indices.reshape(-1).long(), _float(values.reshape(-1)), (n, n)
    coo = kernel.to_sparse_coo().coalesce()
    rows, cols = coo.indices()
    return rows, cols, _float(coo.values()), tuple(coo.shape)


def _as_columns(kernel: Kernel, background: float = 0.0) -> _DenseColumns | _SparseColumns:
    _check_background(background)
    if isinstance(kernel, Tensor) and kernel.layout == torch.strided:
        if kernel.dim() != 2:
            raise ValueError(f"a kernel is 2-D (ground x candidates), got shape {tuple(kernel.shape)}")
        kernel = _float(kernel)
        _check_nonnegative(kernel, "kernel entries")
        return _DenseColumns(kernel.t().contiguous())
    rows, cols, values, (n_ground, n_candidates) = _triplets(kernel)
    _check_nonnegative(values, "kernel entries")
    # Sorting by (column, row) gives CSC order; a repeated (row, column) keeps its largest similarity.
    keys, inverse = torch.unique(cols * n_ground + rows, sorted=True, return_inverse=True)
    values = values.new_zeros(len(keys)).scatter_reduce_(0, inverse, values, "amax", include_self=False)
    cols, rows = keys // n_ground, keys % n_ground
    ptr = torch.zeros(n_candidates + 1, dtype=torch.long, device=values.device)
    ptr[1:] = torch.cumsum(torch.bincount(cols, minlength=n_candidates), 0)
    fill = values.new_full((n_ground,), background) if background > 0 else None
    return _SparseColumns(ptr, rows, cols, values, n_ground, fill)


def _row_max(kernel: Kernel, n_ground: int, what: str, background: float = 0.0) -> Tensor:
    """``max_q kernel[i, q]`` per ground row (0 for a kernel with no columns); a sparse kernel's row that does
    not store every column also meets its ``background``."""
    _check_background(background)
    if isinstance(kernel, Tensor) and kernel.layout == torch.strided:
        values, rows = _float(kernel), None
        shape = tuple(kernel.shape)
    else:
        rows, cols, values, shape = _triplets(kernel)
    if len(shape) != 2 or shape[0] != n_ground:
        raise ValueError(f"{what} must have one row per ground element ({n_ground}), got shape {shape}")
    _check_nonnegative(values, what)
    if rows is None:
        return values.amax(1) if shape[1] else values.new_zeros(n_ground)
    best = values.new_zeros(n_ground).scatter_reduce_(0, rows, values, "amax")
    if background > 0 and shape[1]:
        stored = torch.bincount(torch.unique(rows * shape[1] + cols) // shape[1], minlength=n_ground)
        best[stored < shape[1]] = best[stored < shape[1]].clamp(min=background)
    return best


class FLObjective:
    """What the three objectives share: a facility location with a per-row floor, whose state is ``best``
    (one number per ground element). Build one through :class:`FacilityLocation`,
    :class:`FLMutualInformation` or :class:`FLConditionalGain`."""

    def __init__(self, columns: _DenseColumns | _SparseColumns, floor: Tensor):
        self._columns = columns
        self._floor = floor
        self.reset()

    @property
    def n_ground(self) -> int:
        return self._columns.n_ground

    @property
    def n_candidates(self) -> int:
        return self._columns.n_candidates

    @property
    def device(self) -> torch.device:
        return self._floor.device

    def reset(self) -> None:
        """Forget the added set (back to the empty set)."""
        self._best = self._floor.clone()
        self._low = self._columns.below_background(self._best)

    def _index(self, candidates: Iterable[int] | Tensor) -> Tensor:
        if isinstance(candidates, Set | Iterator):  # torch.as_tensor takes sequences and arrays only
            candidates = list(candidates)
        return torch.as_tensor(candidates, dtype=torch.long, device=self.device).reshape(-1)

    def marginal_gains(self, candidates: Iterable[int] | Tensor | None = None) -> Tensor:
        """Gain of adding each of ``candidates`` (one at a time; all candidates if None) to the set added so
        far."""
        return self._columns.gains(self._best, None if candidates is None else self._index(candidates),
                                   self._low)

    def add(self, j: int) -> None:
        """Add candidate ``j`` to the current set."""
        self._low = self._columns.raise_best(self._best, int(j), self._low)

    @property
    def value(self) -> float:
        """Objective value of the set added so far."""
        return float((self._best - self._floor).sum(dtype=torch.float64))

    def evaluate(self, subset: Iterable[int] | Tensor) -> float:
        """Objective value of ``subset`` (candidate indices), independent of the current set."""
        best = self._floor.clone()
        self._columns.cover(best, self._index(subset))
        return float((best - self._floor).sum(dtype=torch.float64))


class FacilityLocation(FLObjective):
    """``f(A) = sum_i max_{j in A} S[i, j]``: how well ``A`` represents every ground element. ``background``:
    the value of the entries a sparse ``S`` does not store (module docstring)."""

    def __init__(self, S: Kernel, background: float = 0.0):
        columns = _as_columns(S, background)
        floor = torch.zeros(columns.n_ground, dtype=columns.dtype, device=columns.device)
        super().__init__(columns, floor)


class FLMutualInformation(FLObjective):
    """``I(A; Q) = sum_i min(max_{j in A} S[i, j], eta * max_q S_query[i, q])``.

    Each ground element counts only up to its similarity to the query set, so A is drawn towards what Q
    looks like, and once the query-relevant part of the pool is represented further picks gain almost
    nothing (FLMI saturates; greedy then fills the budget on near-zero gains). With a kernel whose unrelated
    pairs still score well above 0, such as (cos + 1) / 2 (about 0.5 for orthogonal embeddings), the caps of
    unrelated rows are met by almost any pick, so saturation comes after few picks. ``S_query`` is
    (ground x queries); ``background`` and ``query_background`` are the values of the entries sparse ``S``
    and ``S_query`` do not store.
    """

    def __init__(self, S: Kernel, S_query: Kernel, eta: float = 1.0, *, background: float = 0.0,
                 query_background: float = 0.0):
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        columns = _as_columns(S, background)
        cap = eta * _row_max(S_query, columns.n_ground, "S_query", query_background).to(columns.device,
                                                                                        columns.dtype)
        super().__init__(columns.clip_rows(cap), torch.zeros_like(cap))


class FLConditionalGain(FLObjective):
    """``f(A | P) = sum_i max(max_{j in A} S[i, j] - nu * max_p S_existing[i, p], 0)``.

    Ground elements the existing set P already represents count only by how much better A represents them,
    so A is drawn to what P lacks. ``S_existing`` is (ground x existing); ``background`` and
    ``existing_background`` are the values of the entries sparse ``S`` and ``S_existing`` do not store.
    """

    def __init__(self, S: Kernel, S_existing: Kernel, nu: float = 1.0, *, background: float = 0.0,
                 existing_background: float = 0.0):
        if nu < 0:
            raise ValueError(f"nu must be >= 0, got {nu}")
        columns = _as_columns(S, background)
        floor = nu * _row_max(S_existing, columns.n_ground, "S_existing", existing_background).to(
            columns.device, columns.dtype)
        super().__init__(columns, floor)


Picks = Iterator[tuple[int, float]]


def _naive(objective: FLObjective, k: int, epsilon: float, seed: int) -> Picks:
    available = torch.ones(objective.n_candidates, dtype=torch.bool, device=objective.device)
    while True:
        gains = objective.marginal_gains().masked_fill_(~available, -math.inf)
        j = int(torch.argmax(gains))  # the first maximum, i.e. the lowest index among ties
        available[j] = False
        yield j, float(gains[j])


def _lazy(objective: FLObjective, k: int, epsilon: float, seed: int) -> Picks:
    # Heap of (-upper bound, candidate, step the bound was computed at). Submodularity makes an old gain an
    # upper bound on today's, so a top whose bound is fresh beats every other candidate; ordering by
    # (-gain, index) makes it the lowest-index maximum, exactly naive greedy's pick.
    gains = objective.marginal_gains().tolist()
    heap = [(-g, j, 0) for j, g in enumerate(gains)]
    heapq.heapify(heap)
    step = 0
    while True:
        block = _LAZY_FIRST_BLOCK
        while heap[0][2] != step:
            stale = []
            while heap and heap[0][2] != step and len(stale) < block:
                stale.append(heapq.heappop(heap)[1])
            for j, g in zip(stale, objective.marginal_gains(stale).tolist()):
                heapq.heappush(heap, (-g, j, step))
            block = min(2 * block, _LAZY_MAX_BLOCK)
        negative_gain, j, _ = heapq.heappop(heap)
        yield j, -negative_gain
        step += 1


def _stochastic(objective: FLObjective, k: int, epsilon: float, seed: int) -> Picks:
    # Mirzasoleiman et al. (2015): scoring a uniform sample of (n / k) log(1 / epsilon) remaining candidates
    # per step still reaches (1 - 1/e - epsilon) of the optimum in expectation, at O(n log(1 / epsilon)) gains
    # in all instead of O(n k).
    n = objective.n_candidates
    sample_size = max(1, math.ceil(n / k * math.log(1 / epsilon)))
    rng = random.Random(seed)
    # The remaining candidates, kept in plain Python (swap-remove, O(sample) per step): tiny torch ops here
    # would cost more in dispatch and thread wake-ups than the gains themselves.
    remaining = list(range(n))
    position = list(range(n))  # position[j]: where candidate j sits in remaining
    while True:
        sample = sorted(rng.sample(remaining, min(sample_size, len(remaining))))
        gains = objective.marginal_gains(sample).tolist()
        best = max(range(len(sample)), key=gains.__getitem__)  # the first maximum: lowest index among ties
        j = sample[best]
        last = remaining.pop()
        if last != j:
            remaining[position[j]] = last
            position[last] = position[j]
        yield j, gains[best]


_METHODS = {"naive": _naive, "lazy": _lazy, "stochastic": _stochastic}


def greedy_maximize(objective: FLObjective, k: int, *, method: str = "lazy", epsilon: float = 0.01,
                    seed: int = 0) -> tuple[list[int], list[float]]:
    """Pick ``k`` candidates greedily; returns the picks in order and each pick's marginal gain.

    ``method``: ``"lazy"`` (default; same picks as ``"naive"``, far fewer gain evaluations), ``"naive"``
    (every remaining candidate's gain at every step) or ``"stochastic"`` (each step scores a seeded random
    sample of ``(n / k) log(1 / epsilon)`` remaining candidates). Picks never stop early on zero gain. The
    objective is reset first and holds the picked set afterwards (``objective.value == sum(gains)``).
    """
    if method not in _METHODS:
        raise ValueError(f"unknown greedy method '{method}'; known: {', '.join(_METHODS)}")
    if not 0 <= k <= objective.n_candidates:
        raise ValueError(f"k must be in [0, {objective.n_candidates}], got {k}")
    if method == "stochastic" and not 0 < epsilon < 1:
        raise ValueError(f"epsilon must be in (0, 1), got {epsilon}")
    objective.reset()
    order: list[int] = []
    gains: list[float] = []
    if k == 0:
        return order, gains
    for j, gain in _METHODS[method](objective, k, epsilon, seed):
        objective.add(j)
        order.append(j)
        gains.append(gain)
        if len(order) == k:
            break
    return order, gains


def greedy_scores(objective: FLObjective, k: int, **greedy) -> tuple[np.ndarray, list[int]]:
    """A selector's ``(scores, order)`` from :func:`greedy_maximize` (``greedy``: its keyword arguments): a
    picked candidate scores its marginal gain when it was picked, an unpicked one the gain it would still
    add to the final set."""
    order, gains = greedy_maximize(objective, k, **greedy)
    scores = np.empty(objective.n_candidates)
    scores[order] = gains
    rest = np.setdiff1d(np.arange(objective.n_candidates), order)
    scores[rest] = objective.marginal_gains(torch.from_numpy(rest)).cpu().numpy()
    return scores, order


class GreedyToBudget:
    """For a Selector whose ``score`` runs a greedy: ``select`` lets it stop at the budget
    (:meth:`greedy_picks`) rather than order the whole pool (stochastic greedy's sample size depends on the
    budget, and the tail of a full order, all gains zero, is lazy greedy's slowest part). The budget lives
    only for that call: ``score`` called alone, or later on another pool, orders its whole pool."""

    def select(self, pool: Sequence, budget, *, target=None, existing=None, allow_unscored=False) -> Selection:
        self._picks = Budget.parse(budget).resolve(len(pool)) if pool else 0
        try:
            return super().select(pool, budget, target=target, existing=existing, allow_unscored=allow_unscored)
        finally:
            del self._picks

    def greedy_picks(self, n: int) -> int:
        return getattr(self, "_picks", n)


def _rows_to_sparse(indices: Tensor, values: Tensor, n_columns: int) -> Tensor:
    """A sparse COO tensor from each row's column ``indices`` and ``values`` (both n x k)."""
    indices, order = indices.sort(dim=1)  # row-major, columns ascending: already coalesced
    n, k = indices.shape
    rows = torch.arange(n, device=indices.device).repeat_interleave(k)
    coordinates = torch.stack([rows, indices.reshape(-1)])
    return torch.sparse_coo_tensor(coordinates, values.gather(1, order).reshape(-1), size=(n, n_columns),
                                   is_coalesced=True, check_invariants=False)


def knn_sparsify(S: Tensor, k: int) -> Tensor:
    """Keep each row's ``k`` largest entries of a dense kernel (0 elsewhere), as a sparse COO tensor."""
    k = min(k, S.shape[1])
    values, indices = S.topk(k, dim=1)
    return _rows_to_sparse(indices, values, S.shape[1])


def cosine_kernel(emb_a: Tensor, emb_b: Tensor | None = None, *, k: int | None = None,
                  chunk_size: int = 4096) -> Tensor:
    """DELIFT(SE)'s kernel ``(cos(a_i, b_j) + 1) / 2`` in [0, 1], between rows of ``emb_a`` and ``emb_b``
    (``emb_a`` itself when omitted).

    Computed ``chunk_size`` rows at a time. With ``k`` only each row's ``k`` most similar columns are kept
    and the result is a sparse COO tensor, so the dense n x n matrix never exists.
    """
    a = F.normalize(_float(emb_a), dim=1)
    b = a if emb_b is None else F.normalize(_float(emb_b), dim=1).to(a.dtype)
    dense_chunks, index_chunks, value_chunks = [], [], []
    for chunk in a.split(chunk_size):
        similarity = (chunk @ b.T).add_(1).mul_(0.5).clamp_(0, 1)
        if k is None:
            dense_chunks.append(similarity)
        else:
            values, indices = similarity.topk(min(k, len(b)), dim=1)
            index_chunks.append(indices)
            value_chunks.append(values)
    if k is None:
        return torch.cat(dense_chunks)
    return _rows_to_sparse(torch.cat(index_chunks), torch.cat(value_chunks), len(b))


__all__ = [
    "FLConditionalGain",
    "FLMutualInformation",
    "FLObjective",
    "FacilityLocation",
    "GreedyToBudget",
    "Kernel",
    "cosine_kernel",
    "greedy_maximize",
    "greedy_scores",
    "knn_sparsify",
]
