"""UDS, Utility-Diversity Sampling (Zou et al., "Utility-Diversity Aware Online Batch Selection for LLM
Supervised Fine-tuning", 2025, arXiv 2510.16882; code github.com/gfyddha/UDS).

Algorithm, for each candidate batch, from the logits L_i (N_i x V) of one no-grad forward:

    s_intra(i) = ||L_i||_* = sum_j sigma_j(L_i)                 utility + intra-sample diversity
    z_i        = vec(G2 L_i G1^T)                                two-sided SRFT sketch, d2 x d1 = 8 x 128
    s_inter(i) = mean_{z in memory} ||z_i - z||_2                inter-sample diversity (0 while empty)
    s(i)       = norm(s_intra)(i) + alpha * norm(s_inter)(i)
    keep the top K;  memory <- last M of (memory + z of the kept rows)

Paper versus authors' code, and the defaults here. The code takes the nuclear norm of the raw logits over
every position of the padded batch (prompt and padding included) and adds alpha * s_inter unnormalised, with
alpha = 1.5e-3 to 2.5e-3 tuned for 7B models. The default here is the paper's intent: L_i is the logits at the
example's response positions (those whose next token is a response token: the only logits that get a gradient
in supervised fine-tuning; prompt and padding are masked), and both terms are z-scored over the candidate
batch, so alpha is the weight of diversity in units of the batch's spread and one value works across models
and lengths. ``unmasked_raw=True`` reproduces the code's whole-row variant (every position of the padded row,
no normalisation; use its alpha values).

Three cheap computations make this affordable at V ~ 50k-150k:
- singular values from the N x N Gram matrix, sigma_j = sqrt(lambda_j(L L^T)), instead of an SVD of N x V;
- the sketch as two thin matrix products. An SRFT G = sqrt(n/d) * R * Re(F) * D (random signs D, DFT F, d
  random rows R) applied to real data is a product with a d x n cosine matrix with signed columns, and zero-
  padding the sequence to ``max_length`` means only its first N columns meet data: z = G2[:, :N] (L G1^T).
  The scale sqrt(n/d) on the unnormalised DFT is the authors', so raw-mode alphas carry over;
- no logits at all when the model's logits are L = H W^T (last hidden state H, N x h; LM head W, V x h), as
  in Llama, Qwen or Mistral: L L^T = H (W^T W) H^T and L G1^T = H (W^T G1^T), with the h x h and h x d1
  products of the head computed once while the head is unchanged (always, under LoRA). The scoring forward
  then costs what a loss-only forward costs. The trainer falls back to full logits for other heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from slimtune.online.base import CandidateBatch, TopKPolicy, top_k


def gram_nuclear_norm(gram: Tensor) -> Tensor:
    """sum_j sigma_j(L) from the Gram matrix L L^T (or L^T L): the square roots of its eigenvalues."""
    # float64 eigenvalues: the small ones, near float32 round-off of the large ones, still add up.
    return torch.linalg.eigvalsh(gram.double()).clamp_min(0).sqrt().sum().float()


def nuclear_norm(matrix: Tensor) -> Tensor:
    """||L||_* from the smaller of the two Gram matrices: an N x N eigenproblem when N << V."""
    matrix = matrix.float()
    return gram_nuclear_norm(matrix @ matrix.T if matrix.shape[0] <= matrix.shape[1] else matrix.T @ matrix)


def srft_matrix(n: int, d: int, generator: torch.Generator) -> Tensor:
    """A d x n subsampled randomised Fourier transform (real part) as a dense matrix: row j is
    sqrt(n/d) * cos(2 pi k_j t / n) * s_t for d distinct random frequencies k_j and random signs s_t."""
    signs = torch.randint(0, 2, (n,), generator=generator) * 2 - 1
    freqs = torch.randperm(n, generator=generator)[:d]
    # (k * t) mod n in integers keeps the angle exact for large n.
    phase = (freqs.unsqueeze(1).long() * torch.arange(n).unsqueeze(0)) % n
    return math.sqrt(n / d) * torch.cos(2 * math.pi * phase.double() / n).float() * signs


def zscore(values: Tensor) -> Tensor:
    spread = values.std(unbiased=False)
    return (values - values.mean()) / spread if spread > 0 else torch.zeros_like(values)


@dataclass
class UDSPolicy(TopKPolicy):
    """UDS: top-K of ||L_i||_* + alpha * (mean distance of the logits' sketch to the last M chosen sketches).

    ``vocab_dim`` (d1) and ``seq_dim`` (d2) size the sketch (128 x 8 = 1,024 dims, the authors' setting);
    ``max_length`` is the sequence length the sketch zero-pads to; None (the default) takes training's
    maximum length from the trainer, so no row the trainer accepts is too long; ``memory_size`` is M;
    ``unmasked_raw``: the authors' whole-row variant (see the module's docstring).
    """

    name: ClassVar[str] = "uds"
    alpha: float = 1.0
    memory_size: int = 1024
    vocab_dim: int = 128
    seq_dim: int = 8
    max_length: int | None = None
    unmasked_raw: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        self._vocab_side: Tensor | None = None
        self._seq_side: Tensor | None = None
        self._head_key: tuple | None = None
        self._memory = torch.empty(0, self.vocab_dim * self.seq_dim)
        self._last_sketch: dict[int, Tensor] = {}

    def needs(self) -> set[str]:
        return {"logit_factors"}

    def _projections(self, vocab: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """G1 (d1 x V) and G2 (d2 x max_length), drawn once from ``seed``."""
        if self._vocab_side is None or self._vocab_side.shape[1] != vocab:
            if self.max_length is None:
                raise ValueError("UDSPolicy(max_length=None) takes training's maximum length from the online "
                                 "trainer; outside it, pass max_length")
            if self.vocab_dim > vocab or self.seq_dim > self.max_length:
                raise ValueError(f"UDS sketch of {self.seq_dim} x {self.vocab_dim} does not fit logits of "
                                 f"{self.max_length} positions x {vocab} tokens")
            generator = torch.Generator().manual_seed(self.seed)
            self._vocab_side = srft_matrix(vocab, self.vocab_dim, generator)
            self._seq_side = srft_matrix(self.max_length, self.seq_dim, generator)
        self._vocab_side, self._seq_side = self._vocab_side.to(device), self._seq_side.to(device)
        return self._vocab_side, self._seq_side

    def _head_products(self, head: Tensor) -> tuple[Tensor, Tensor]:
        """W^T W (float64) and W^T G1^T, recomputed only when the head weight changes."""
        key = (head.data_ptr(), head._version, head.device)
        if key != self._head_key:
            weight = head.detach().float()
            self._head_gram = (weight.T @ weight).double()
            self._head_sketch = weight.T @ self._projections(len(weight), weight.device)[0].T
            self._head_key = key
        return self._head_gram, self._head_sketch

    def _grams_and_vocab_sketches(self, batch: CandidateBatch) -> list[tuple[Tensor, Tensor]]:
        """Per row, L L^T and L G1^T over its response positions (every position with ``unmasked_raw``)."""
        real = torch.ones_like(batch.attention_mask, dtype=torch.bool) if self.unmasked_raw \
            else batch.response_mask & batch.attention_mask.bool()
        if batch.logits is not None:
            vocab_side = self._projections(batch.logits.shape[-1], batch.logits.device)[0]
            rows = [batch.logits[i][real[i]].float() for i in range(len(batch))]
            return [(row @ row.T, row @ vocab_side.T) for row in rows]
        head_gram, head_sketch = self._head_products(batch.extras["head"])
        rows = [batch.hidden[i][real[i]].float() for i in range(len(batch))]
        return [(row.double() @ head_gram @ row.double().T, row @ head_sketch) for row in rows]

    def sketch(self, vocab_sketch: Tensor) -> Tensor:
        """z = vec(G2 L G1^T) from L G1^T (N x d1) of one example, (d2 * d1,)."""
        n = len(vocab_sketch)
        if n > self.max_length:
            raise ValueError(f"UDS sketches sequences of up to max_length={self.max_length} tokens; got {n}. "
                             "Leave the policy's max_length unset (training's) or raise it to the training "
                             "max length.")
        return (self._seq_side[:, :n].to(vocab_sketch.device) @ vocab_sketch).flatten()

    def row_features(self, batch: CandidateBatch) -> dict[str, Tensor]:
        """Each row's ||L_i||_* and sketch z_i: all that scoring and the memory need."""
        parts = self._grams_and_vocab_sketches(batch)
        sketches = torch.stack([self.sketch(vocab_sketch) for _, vocab_sketch in parts])
        intra = torch.stack([gram_nuclear_norm(gram) for gram, _ in parts]).to(sketches.device)
        return {"intra": intra, "sketch": sketches}

    def _score(self, features: dict[str, Tensor]) -> Tensor:
        intra, sketches = features["intra"], features["sketch"]
        memory = self._memory.to(sketches.device)
        inter = (torch.cdist(sketches, memory).mean(1) if len(memory)
                 else torch.zeros(len(sketches), device=sketches.device))
        if self.unmasked_raw:
            return intra + self.alpha * inter
        return zscore(intra) + self.alpha * zscore(inter)

    def score(self, batch: CandidateBatch) -> Tensor:
        features = self.row_features(batch)
        self._last_sketch = dict(zip(batch.index.tolist(), features["sketch"], strict=True))
        return self._score(features)

    def _remember(self, kept: Tensor) -> None:
        self._memory = torch.cat([self._memory.to(kept.device), kept])[-self.memory_size:]

    def observe(self, chosen: CandidateBatch) -> None:
        self._remember(torch.stack([self._last_sketch[i] for i in chosen.index.tolist()]))

    def choose_pooled(self, features: dict[str, Tensor], k: int) -> Tensor:
        self._last_scores = self._score(features)
        chosen = top_k(self._last_scores, k)  # the per-batch choice's tie order, so both modes pick alike
        self._remember(features["sketch"][chosen])
        return chosen

    def state_dict(self) -> dict[str, Any]:
        return {"memory": self._memory.cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._memory = state["memory"]
