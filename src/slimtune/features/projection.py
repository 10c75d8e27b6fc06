"""Random projections that keep inner products: x in R^D  ->  P x in R^d, with E[<Px, Py>] = <x, y>.

LESS (and TRAK before it) compress per-example gradients with a seeded random matrix so that cosines between
millions-of-dimension gradients can be computed from d = 8192 numbers. For unit vectors and any two
projections below,

    Var[<Px, Py>] = (1 + <x, y>^2 - 2 sum_i x_i^2 y_i^2) / d,

and the Johnson-Lindenstrauss lemma bounds the worst pair of n vectors: all pairwise inner products of unit
vectors are kept within eps with probability >= 1 - 1/n once d >= 4 ln n / (eps^2/2 - eps^3/3)
(:func:`jl_epsilon` inverts this).

Two projectors, one contract: ``project(x, offset)`` projects the coordinates
``offset .. offset + x.shape[1]`` of a long vector, so a gradient can be fed one parameter tensor at a time
and the result is the same as projecting the concatenated vector, whatever the order of the pieces (P x is
the sum over slices of P[:, slice] x_slice: the extraction projects each layer's slice inside the backward
pass, top layer first). Neither ever materialises P: its entries
are regenerated per fixed *block* of input coordinates from a generator seeded with (seed, block), so any
slicing of the input meets the same matrix.

- :class:`RademacherProjector` — the paper's choice (TRAK's ``fast_jl``): dense P with entries +-1/sqrt(d).
  Cost O(D d) multiply-adds *and* random numbers per batch, which a GPU regenerates quickly and a CPU does
  not (about 3,000 s per batch for a 15M-parameter LoRA at d = 8192 on two cores). Its blocks come from a
  generator on the input's device; CPU and CUDA generators give different matrices, so
  :meth:`Projector.identity` names the device type and features from the two are never mixed.
- :class:`SparseJLProjector` — a sparse Johnson-Lindenstrauss transform (Kane & Nelson 2014; CountSketch
  when ``nnz = 1``): every input coordinate lands, with a random sign, in one bucket of each of ``nnz``
  equal slices of the output, scaled by 1/sqrt(nnz). Same mean and the same variance as the dense matrix for
  every pair (formula above); the tail bound of the dense matrix needs nnz ~ log(1/delta)/eps, which only
  matters for inputs dominated by a few coordinates (a gradient spread over millions of LoRA weights is
  not). Cost O(D nnz) scatter-adds: a 15M-parameter gradient projects in a fraction of a second on a CPU.
  Buckets are generated on the CPU (the same matrix on every device) and cached per device, 8 bytes per
  input coordinate and nonzero.

LoGra's Kronecker projection of linear-layer gradients, (P_out delta)(P_in a)^T, is deliberately absent: the
Adam feature LESS scores with divides the gradient elementwise by sqrt(v), which destroys the outer-product
structure it relies on, and for LoRA factors the per-example gradient it avoids forming is small anyway
(benchmarks/less_features.py measures forming it).
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

DEFAULT_DIM = 8192


def block_seed(seed: int, block: int) -> int:
    """A well-mixed 63-bit generator seed for one block, so neighbouring blocks share no structure."""
    digest = hashlib.sha256(f"{seed}:{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def jl_epsilon(dim: int, n: int) -> float:
    """The eps for which ``dim`` satisfies dim >= 4 ln n / (eps^2/2 - eps^3/3): the largest error, with
    probability >= 1 - 1/n, of the pairwise inner products of n unit vectors."""
    target = 4 * math.log(max(n, 2)) / dim
    lo, hi = 0.0, 1.0
    for _ in range(60):  # bisection: the left side grows with eps on (0, 1)
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mid * mid / 2 - mid ** 3 / 3 < target else (lo, mid)
    return hi


class Projector(ABC):
    """A seeded linear map R^D -> R^dim applied piecewise; see the module docstring."""

    dim: int
    seed: int

    @abstractmethod
    def project(self, x: Tensor, offset: int = 0, out: Tensor | None = None) -> Tensor:
        """Add P[:, offset:offset + x.shape[1]] @ x_row for every row of ``x`` (B, n) into ``out`` (B, dim),
        created as zeros when not given, and return it."""

    @abstractmethod
    def identity(self, device: torch.device | str | None = None) -> dict[str, Any]:
        """Everything that determines the matrix used on ``device``: part of a feature store's key."""

    def __call__(self, x: Tensor) -> Tensor:
        return self.project(x)

    def _out(self, x: Tensor, out: Tensor | None) -> Tensor:
        if out is None:
            return torch.zeros(x.shape[0], self.dim, dtype=torch.float32, device=x.device)
        return out


class RademacherProjector(Projector):
    """Dense +-1/sqrt(dim) entries, regenerated block by block on the input's device.

    A block is ``max(1, block_elements // dim)`` consecutive input coordinates (rows of P^T).
    """

    def __init__(self, dim: int = DEFAULT_DIM, seed: int = 0, block_elements: int = 1 << 24):
        self.dim, self.seed = dim, seed
        self.block_rows = max(1, block_elements // dim)

    def identity(self, device=None) -> dict[str, Any]:
        device_type = torch.device(device).type if device is not None else "cpu"
        return {"kind": "rademacher", "dim": self.dim, "seed": self.seed, "block_rows": self.block_rows,
                "generator": device_type}

    def _block(self, block: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        gen = torch.Generator(device=device).manual_seed(block_seed(self.seed, block))
        signs = torch.randint(0, 2, (self.block_rows, self.dim), generator=gen, device=device, dtype=dtype)
        return signs.mul_(2).sub_(1)

    def project(self, x: Tensor, offset: int = 0, out: Tensor | None = None) -> Tensor:
        out = self._out(x, out)
        x = x.to(out.dtype)
        scale = 1 / math.sqrt(self.dim)
        end = offset + x.shape[1]
        for block in range(offset // self.block_rows, -(-end // self.block_rows)):
            start = block * self.block_rows
            lo, hi = max(offset, start), min(end, start + self.block_rows)
            matrix = self._block(block, x.device, out.dtype)[lo - start:hi - start]
            out.addmm_(x[:, lo - offset:hi - offset], matrix, alpha=scale)
        return out


class SparseJLProjector(Projector):
    """``nnz`` signed entries of 1/sqrt(nnz) per input coordinate, one in each slice of dim/nnz outputs.

    A sign is folded into the bucket index: coordinates scatter into 2*dim accumulators and the result is
    ``acc[:dim] - acc[dim:]``, so applying the map is a single scatter-add per nonzero.
    """

    def __init__(self, dim: int = DEFAULT_DIM, seed: int = 0, nnz: int = 1, block_size: int = 1 << 20):
        if dim % nnz:
            raise ValueError(f"dim {dim} must be a multiple of nnz {nnz}")
        self.dim, self.seed, self.nnz, self.block_size = dim, seed, nnz, block_size
        self._cache: dict[tuple[int, str], Tensor] = {}

    def identity(self, device=None) -> dict[str, Any]:
        return {"kind": "sparse-jl", "dim": self.dim, "seed": self.seed, "nnz": self.nnz,
                "block_size": self.block_size}

    def _block(self, block: int, device: torch.device) -> Tensor:
        """(nnz, block_size) indices into the 2*dim signed accumulators."""
        key = (block, str(device))
        if key not in self._cache:
            gen = torch.Generator().manual_seed(block_seed(self.seed, block))
            width = self.dim // self.nnz
            bucket = torch.randint(0, width, (self.nnz, self.block_size), generator=gen)
            negative = torch.randint(0, 2, (self.nnz, self.block_size), generator=gen)
            slices = torch.arange(self.nnz).unsqueeze(1) * width
            self._cache[key] = (bucket + slices + negative * self.dim).to(device)
        return self._cache[key]

    def project(self, x: Tensor, offset: int = 0, out: Tensor | None = None) -> Tensor:
        out = self._out(x, out)
        acc = torch.zeros(x.shape[0], 2 * self.dim, dtype=out.dtype, device=x.device)
        x = x.to(out.dtype)
        end = offset + x.shape[1]
        for block in range(offset // self.block_size, -(-end // self.block_size)):
            start = block * self.block_size
            lo, hi = max(offset, start), min(end, start + self.block_size)
            index = self._block(block, x.device)[:, lo - start:hi - start]
            part = x[:, lo - offset:hi - offset]
            for j in range(self.nnz):
                acc.scatter_add_(1, index[j].expand_as(part), part)
        out.add_(acc[:, :self.dim] - acc[:, self.dim:], alpha=1 / math.sqrt(self.nnz))
        return out


PROJECTORS: dict[str, type[Projector]] = {"sparse": SparseJLProjector, "rademacher": RademacherProjector}


def make_projector(kind: str, dim: int = DEFAULT_DIM, seed: int = 0) -> Projector:
    """``"sparse"`` (sparse JL) or ``"rademacher"`` (dense, the paper's) by name."""
    if kind not in PROJECTORS:
        raise ValueError(f"unknown projector '{kind}'; known: {', '.join(PROJECTORS)}")
    return PROJECTORS[kind](dim=dim, seed=seed)
