"""SLAP: batch-aware, stratified, on-policy selection valued by a Hessian-approximated loss drop.

What the paper says (Zou et al., 2026, arXiv 2605.23969; only the abstract is public, no code):
  * batch-aware: it scores the *learnability of whole batch compositions*, not single examples;
  * *distribution-aware stratified sampling*, so the chosen data cover the whole distribution;
  * *relative distance optimisation* to maximise diversity inside a batch;
  * *Hessian-approximated gradient information* drives dynamic batch selection;
  * "loss-based pruning", "on-policy": the scores come from the model being trained, as it trains;
  * LLaMA and ChatGLM; multi-turn dialogue, multilingual translation and QA; it matches or beats full-data
    training with 20-40% less training data.

Everything below that list is our reconstruction. Per step, from B candidates to a batch S of K rows:

    1. signals      l_i     on-policy mean response loss (the shared no-grad forward; nothing extra)
                    g_i     LM-head gradient sketch, (1/T_i) sum_t (P_out d_t)(P_in h_t)^T,
                            d_t = softmax(z_t) - onehot(y_t), over response positions t   [D = d_out d_in]
                    r_i     mean-pooled last hidden state over real tokens (or g_i)
    2. strata       h(i)    loss-quantile bin of l_i, edges = quantiles of the losses of a window of recent
                            candidates (per task, and crossed with the task, when ``by_task``)
    3. allocation   n_h     one slot per non-empty stratum when K allows, the rest by largest deficit to
                            K w_h / sum w,  w_h = N_h (proportional) or N_h S_h (Neyman, S_h = loss std in h)
    4. learnability gain(S) = eta g_S.g_ref - eta^2/2 g_S^T H g_S,   g_S = mean_{i in S} g_i,
                            g_ref = mean of all candidates' g_i,   H = G + delta I,
                            G = (1/B) sum_i (1/T_i) sum_t (P_out A_t P_out^T) kron (P_in h_t)(P_in h_t)^T,
                            A_t = diag(p_t) - p_t p_t^T,  p_t = softmax(z_t)      [D x D]
                            eta = step_scale * |g_ref|^2 / (g_ref^T H g_ref)
    5. diversity    div(i, S) = min(CAP, min_{j in S} |r_i - r_j| / s_h(i)),  s_h = median pairwise distance
                            inside stratum h
    6. greedy       repeat K times, over rows whose stratum has an open slot:
                            i* = argmax (|S|+1) [gain(S + i) - gain(S)] / sigma + lambda div(i, S)
                            sigma = std over candidates of gain({i}); S <- S + i*

Per epoch ("pruning"): score the whole pool with the current model (no grad, batched), take the strata edges,
g_ref and H from the pool itself, keep ``keep`` of it by the same steps 3-6 (in blocks of ``block`` rows, so
the cost grows linearly with the pool), and train the epoch on the kept rows: :class:`SLAPPruning`.

Design choices the abstract leaves open, all ours:
  * Strata are loss quantiles because the abstract names loss-based pruning and distribution coverage; a
    window of recent candidates (not the current batch alone) fixes the edges, so a stratum means the same
    thing from one step to the next while still following the model as its losses fall. Crossed with the
    task, quantiles are taken per task: tasks differ in loss scale, and a global edge would file one task
    whole into one stratum.
  * Proportional allocation is the default because it is unbiased for the candidate distribution; Neyman
    spends more slots where losses vary most. The one-slot floor is what makes "cover the whole distribution"
    hold at small K (big-loss would take only the top stratum).
  * H is the LM head's exact Gauss-Newton block in the sketch space: for the head W (logits z_t = W h_t),
    the Gauss-Newton matrix of the candidates' mean loss is G = (1/B) sum_i (1/T_i) sum_t A_t kron h_t h_t^T,
    which for a linear head is its Hessian, and the sketch S = P_out kron P_in maps it to S G S^T, the
    formula in step 4 (E[S^T S] = I, so g_S^T (S G S^T) g_S estimates the unsketched quadratic form). Not
    the empirical Fisher of the candidates' own sketches, which measures how the observed-label gradients of
    the rows at hand spread rather than how the loss curves (so its quadratic term is the squared alignment
    of S with those same gradients, confounded with the linear term), and has rank at most B (10 against
    D = 512), where G takes the model's own predictive distribution at every token. Cost, kept bounded without
    truncating p: P_out diag(p_t) P_out^T is symmetric, so it is p_t against a fixed table of the products of
    P_out's rows a <= b, stacked under P_out itself so that one pass over p_t gives P_out p_t too:
    (d_out + d_out (d_out + 1) / 2) V multiply-adds per response token (152 V at 16 x 32, a quarter of the
    576 V of the head's own logits for SmolLM2), plus one D x D product per batch; the table is as many
    floats times V (30 MB at V = 49k), built once. p_t is the exponential of the log-softmax the scoring
    loss already took at the response positions: neither the logits nor their softmax are recomputed, and
    the probabilities are held a chunk of tokens at a time. It is damped by ``damping`` times its mean eigenvalue so
    the damping is scale-free. A batch of aligned gradients keeps |g_S| large where different directions
    partly cancel, so redundant rows pay more curvature for the same alignment with g_ref.
  * g_ref is the mean gradient of all candidates: on-policy and with no validation set, the direction the full
    candidate batch would have stepped in, so gain(S) asks how much of that step S buys.
  * eta is the Newton step along g_ref, so gain is invariant to the sketch's scale; ``step_scale`` moves it.
  * The sketch is the LM head's gradient: d_t is the backprop signal every earlier layer's gradient (LoRA's
    included) is built from, and its outer product with h_t can be projected as (P_out d_t)(P_in h_t)^T
    without forming the V x H matrix (LoGra's Kronecker trick); Rademacher P's, seeded.
  * Marginal gains are multiplied by |S|+1 (a row's share of the batch mean) and divided by the spread of
    single-row gains, so that lambda weighs diversity against learnability in the same units at every pick.
    Distances are divided by the stratum's own median spread and capped at CAP: a tight stratum's rows count
    as diverse when they are far apart *for that stratum*, and a row from an untouched region is simply new.
  * With learnability off the value term is the on-policy loss (scaled the same way), i.e. loss-based
    selection inside strata: the ablation removes the Hessian term, not the on-policy signal.

What the ablation measured (``benchmarks/slap_ablation.py``, 3 seeds, 150 Tatoeba + GSM8K rows, 70% seen;
numbers in the benchmark notes; measured with the empirical Fisher of the candidates as H, before the
Gauss-Newton block replaced it, and not rerun since): per-epoch SLAP at 70% matches full data's held-out loss
(1.625 vs 1.624), per-step SLAP ties uniform selection; the curvature term is the one component with an effect
(it keeps GSM8K: loss 1.187 with it, 1.245 without); diversity, learnability and stratification show none. On
a pool with 20% swapped responses SLAP trains on no more corrupted rows than uniform, while big-loss chases
them, and stratification still adds nothing (chrF lower with it). It stays on by default because the abstract
names it and these pools are small (a stratum holds two or three of B = 10 candidates); ``stratify=False`` is
the variant to try first.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from slimtune.data.tokenize import IGNORE_INDEX
from slimtune.features.projection import Projector, RademacherProjector
from slimtune.online.base import CandidateBatch, Policy

#: Relative distances are capped here: two rows further apart than twice their stratum's typical spread are
#: both simply "new", and a row whose stratum has no chosen row yet must not swamp the value term.
CAP = 2.0


@dataclass
class RowFeatures:
    """The per-row signals SLAP reads, small enough to keep for a whole pool; and ``curvature``, the mean over
    the rows scored of their LM-head Gauss-Newton blocks in the sketch space (D x D; step 4 of the module
    docstring). ``curvature`` describes the set the rows were scored in: :meth:`rows` keeps it as it is, so
    a reordered or cut set is still valued against the curvature of the set it came from."""

    loss: Tensor
    tasks: list[str]
    sketch: Tensor | None = None
    rep: Tensor | None = None
    curvature: Tensor | None = None

    def __len__(self) -> int:
        return int(self.loss.shape[0])

    def rows(self, index: Tensor) -> RowFeatures:
        pick = index.tolist()
        return RowFeatures(self.loss[index], [self.tasks[i] for i in pick],
                           None if self.sketch is None else self.sketch[index],
                           None if self.rep is None else self.rep[index], self.curvature)

    @staticmethod
    def cat(parts: list[RowFeatures]) -> RowFeatures:
        def join(name: str) -> Tensor | None:
            values = [getattr(p, name) for p in parts]
            return None if values[0] is None else torch.cat(values)

        curvature = None
        if parts[0].curvature is not None:  # the mean over all rows: each part's mean weighted by its rows
            curvature = sum(len(p) * p.curvature for p in parts) / max(1, sum(len(p) for p in parts))
        return RowFeatures(join("loss"), [t for p in parts for t in p.tasks], join("sketch"), join("rep"),
                           curvature)


class HeadSignals(NamedTuple):
    """``sketch`` (B, D): each row's projected LM-head gradient; ``curvature`` (D, D) or None: the mean over
    the B rows of their Gauss-Newton blocks, in the same sketch space."""

    sketch: Tensor
    curvature: Tensor | None


class SketchMaps(NamedTuple):
    """P_out (d_out, V) and P_in (d_in, H) as matrices, and ``readout``: P_out's rows and, for the curvature,
    the products of its rows' pairs a <= b, P[a, v] P[b, v], so that one product p @ readout.T gives both
    P_out p and every entry of P_out diag(p) P_out^T; ``pairs`` (d_out^2,) maps entry (a, b) to its pair's
    row (None without the curvature)."""

    out: Tensor
    inp: Tensor
    readout: Tensor
    pairs: Tensor | None


def sketch_maps(p_out: Projector, p_in: Projector, vocab: int, width: int, device: torch.device | str, *,
                curvature: bool, chunk: int = 4096) -> SketchMaps:
    """The projectors' matrices for a head of ``vocab`` x ``width``, read a block of identity at a time."""

    def matrix(projector: Projector, n: int) -> Tensor:
        return torch.cat([projector.project(torch.eye(min(chunk, n - lo), device=device), offset=lo)
                          for lo in range(0, n, chunk)]).T.contiguous()

    out = matrix(p_out, vocab)
    if not curvature:
        return SketchMaps(out, matrix(p_in, width), out, None)
    # P diag(p) P^T is symmetric: the d(d+1)/2 pairs a <= b hold all of it, in little over half the products
    first, second = torch.triu_indices(len(out), len(out), device=device)
    pairs = torch.empty(len(out), len(out), dtype=torch.long, device=device)
    pairs[first, second] = pairs[second, first] = torch.arange(len(first), device=device)
    readout = torch.cat([out, out[first] * out[second]])
    return SketchMaps(out, matrix(p_in, width), readout, pairs.flatten())


#: Response tokens whose (tokens, V) probabilities are held at once: the sketch needs only their products
#: with the thin ``readout``, so the probabilities never exist for the whole batch.
TOKEN_CHUNK = 256


def head_signals(hidden: Tensor, labels: Tensor, maps: SketchMaps, *, logits: Tensor | None = None,
                 head: Tensor | None = None, log_probs: Tensor | None = None) -> HeadSignals:
    """Each row's LM-head gradient of its mean response loss, projected to (d_out x d_in) and flattened, and
    (when ``maps`` has the curvature's ``pairs``) the rows' mean Gauss-Newton block in that space.

    grad_W_i = (1/T_i) sum_t d_t h_t^T with d_t = softmax(z_t) - onehot(y_t), so
    P_out grad_W_i P_in^T = (1/T_i) sum_t (P_out d_t)(P_in h_t)^T: only response positions are touched and
    the V x H gradient is never formed. The Gauss-Newton block uses the same p_t = softmax(z_t):
    (1/B) sum_i (1/T_i) sum_t (P_out diag(p_t) P_out^T - (P_out p_t)(P_out p_t)^T) kron (P_in h_t)(P_in h_t)^T.
    p_t is read from ``log_probs`` (N, V), the scoring loss's own log-softmax at the response positions (see
    :class:`CandidateBatch`), or else from z_t: ``logits`` (B, T, V) or h_t @ ``head``.T at the response
    positions alone.
    """
    targets = labels[:, 1:]
    rows, pos = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    n_rows = labels.shape[0]
    h = hidden[rows, pos].float()
    weight_t = head.float().T if log_probs is None and logits is None else None

    def probs(lo: int, hi: int) -> Tensor:
        if log_probs is not None:
            return log_probs[lo:hi].float().exp()
        z = logits[rows[lo:hi], pos[lo:hi]].float() if logits is not None else h[lo:hi] @ weight_t
        return torch.softmax(z, dim=-1)

    read = torch.cat([probs(lo, lo + TOKEN_CHUNK) @ maps.readout.T
                      for lo in range(0, max(1, len(rows)), TOKEN_CHUNK)])
    d_out, d_in = maps.out.shape[0], maps.inp.shape[0]
    u = h @ maps.inp.T
    out_p = read[:, :d_out]
    out_delta = out_p - maps.out.T[targets[rows, pos]]  # P_out (p - onehot(y))
    outer = out_delta.unsqueeze(2) * u.unsqueeze(1)
    sketch = torch.zeros(n_rows, d_out * d_in, device=outer.device)
    sketch.index_add_(0, rows, outer.flatten(1))
    count = torch.bincount(rows, minlength=n_rows).clamp_min(1)
    sketch = sketch / count.unsqueeze(1)
    if maps.pairs is None:
        return HeadSignals(sketch, None)
    weight = (1.0 / (count[rows] * n_rows)).unsqueeze(1)  # (1/B)(1/T_i) for each token of row i
    spread = (weight * read[:, d_out:]).T @ (u.unsqueeze(2) * u.unsqueeze(1)).flatten(1)
    spread = spread[maps.pairs].reshape(d_out, d_out, d_in, d_in).permute(0, 2, 1, 3).reshape(d_out * d_in, -1)
    mean_part = (out_p.unsqueeze(2) * u.unsqueeze(1)).flatten(1)
    return HeadSignals(sketch, spread - (weight * mean_part).T @ mean_part)


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return ((hidden * mask).sum(1) / mask.sum(1).clamp_min(1)).float()


def allocate(counts: dict[str, int], weights: dict[str, float], k: int) -> dict[str, int]:
    """Slots per stratum: one for each non-empty stratum when ``k`` allows, then one at a time to the stratum
    furthest below its share ``k w_h / sum w`` that still has unchosen rows."""
    nonempty = [h for h, n in counts.items() if n > 0]
    k = min(k, sum(counts.values()))
    total = sum(weights[h] for h in nonempty)
    if total <= 0:  # e.g. Neyman with no spread anywhere: fall back to proportional
        weights, total = {h: float(counts[h]) for h in nonempty}, float(sum(counts[h] for h in nonempty))
    target = {h: k * weights[h] / total for h in nonempty}
    slots = {h: int(k >= len(nonempty)) if h in target else 0 for h in counts}
    for _ in range(k - sum(slots.values())):
        open_ = [h for h in nonempty if slots[h] < counts[h]]
        best = max(open_, key=lambda h: target[h] - slots[h])
        slots[best] += 1
    return slots


class Reference(NamedTuple):
    """What a batch is valued against: g_ref, H (None without curvature), eta, and gain(all) for scale."""

    g_ref: Tensor
    hessian: Tensor | None
    eta: float
    full: float


class BatchGain:
    """gain(S) = eta g_S.g_ref - eta^2/2 g_S^T H g_S for a growing S, with every row's marginal gain in O(nD).

    With s = sum_{j in S} g_j and k = |S|: g_S.g_ref = (sum_{j in S} a_j)/k with a_i = g_i.g_ref, and
    g_S^T H g_S = s^T H s / k^2 with (s + g_i)^T H (s + g_i) = s^T H s + 2 g_i.(H s) + g_i^T H g_i.
    ``ref.hessian=None`` drops the curvature term (the ablation), leaving the linear alignment with g_ref.
    """

    def __init__(self, g: Tensor, ref: Reference):
        self.g, self.eta, self.curved = g, ref.eta, ref.hessian is not None
        self.align = g @ ref.g_ref
        self.hg = g @ ref.hessian if self.curved else None  # rows of H g_i (H is symmetric)
        self.self_curv = (self.hg * g).sum(1) if self.curved else torch.zeros(len(g))
        self.h_sum = torch.zeros_like(ref.g_ref)  # H s
        self.sum_align, self.curv, self.k, self.value = 0.0, 0.0, 0, 0.0

    def _gain(self, sum_align, curv, k: int):
        return self.eta * sum_align / k - (self.eta ** 2 / 2 * curv / k ** 2 if self.curved else 0.0)

    def singles(self) -> Tensor:
        """gain({i}) of every row alone."""
        return self._gain(self.align, self.self_curv, 1)

    def marginal(self) -> Tensor:
        """gain(S + i) - gain(S) for every row i."""
        curv = self.curv + 2 * self.g @ self.h_sum + self.self_curv
        return self._gain(self.sum_align + self.align, curv, self.k + 1) - self.value

    def add(self, i: int) -> None:
        self.curv += float(2 * self.g[i] @ self.h_sum + self.self_curv[i])
        if self.curved:
            self.h_sum += self.hg[i]
        self.sum_align += float(self.align[i])
        self.k += 1
        self.value = float(self._gain(self.sum_align, self.curv, self.k))


@dataclass
class Assembly:
    """One greedy assembly: the rows picked (in order), every row's stratum, the slots per stratum, every
    row's value alone, and ``gain_share`` = gain(S) / gain(all rows): how much of the full step S buys."""

    order: list[int]
    strata: list[str]
    slots: dict[str, int]
    counts: dict[str, int]
    singles: Tensor
    gain_share: float | None

    def record(self) -> dict[str, Any]:
        chosen = Counter(self.strata[i] for i in self.order)
        return {"allocation": {h: {"candidates": self.counts[h], "slots": self.slots[h], "chosen": chosen[h]}
                               for h in sorted(self.counts)},
                "gain_share": self.gain_share}


@dataclass
class SLAPPolicy(Policy):
    """SLAP (our reconstruction of arXiv 2605.23969; see the module docstring for the algorithm and why).

    ``strata`` loss-quantile strata (``by_task`` crosses them with the task); ``allocation`` "proportional"
    or "neyman"; ``window`` recent candidates whose losses fix the strata edges; ``diversity_weight`` lambda;
    ``representation`` "hidden" (mean-pooled last hidden state) or "sketch" (the gradient sketch) for
    distances; ``sketch_out`` x ``sketch_in`` the sketch's shape; ``damping`` delta over H's mean eigenvalue;
    ``step_scale`` eta over the Newton step; ``block`` the most pool rows one pruning greedy runs over.
    ``stratify``/``learnability``/``curvature``/``diversity`` switch components off for ablations.
    """

    name: ClassVar[str] = "slap"

    strata: int = 4
    by_task: bool = False
    allocation: str = "proportional"
    window: int = 512
    diversity_weight: float = 0.5
    representation: str = "hidden"
    sketch_out: int = 16
    sketch_in: int = 32
    damping: float = 0.1
    step_scale: float = 1.0
    stratify: bool = True
    learnability: bool = True
    curvature: bool = True
    diversity: bool = True
    block: int = 2048
    seed: int = 0

    def __post_init__(self):
        if self.allocation not in ("proportional", "neyman"):
            raise ValueError(f"allocation must be 'proportional' or 'neyman', got {self.allocation!r}")
        if self.representation not in ("hidden", "sketch"):
            raise ValueError(f"representation must be 'hidden' or 'sketch', got {self.representation!r}")
        # State, not parameters: kept out of the dataclass fields so asdict() stays the method's config.
        self._window_loss: deque[float] = deque(maxlen=self.window)
        self._window_tasks: deque[str] = deque(maxlen=self.window)
        # Blocks of 4,096 input coordinates: a projector regenerates whole blocks, and its default block (2^24
        # entries) would be a million vocabulary rows, 20 times SmolLM2's vocabulary, generated per read.
        self._projectors = (RademacherProjector(self.sketch_out, self.seed, block_elements=self.sketch_out * 4096),
                            RademacherProjector(self.sketch_in, self.seed + 1, block_elements=self.sketch_in * 4096))
        self._maps: dict[tuple[int, int, str], SketchMaps] = {}
        self.last: Assembly | None = None
        self.last_edges: dict[str, list[float]] = {}

    # -- signals -------------------------------------------------------------------------------------------
    def _wants_sketch(self) -> bool:
        return self.learnability or (self.diversity and self.representation == "sketch")

    def needs(self) -> set[str]:
        wanted = {"loss"}
        if self._wants_sketch():
            wanted.add("logit_factors")  # hidden + head: logits at response positions only, never B x T x V
        if self.diversity and self.representation == "hidden":
            wanted.add("hidden")
        return wanted

    def sketch_maps(self, vocab: int, width: int, device: torch.device | str) -> SketchMaps:
        """The sketch's matrices for a head of ``vocab`` x ``width`` (built once per shape and device)."""
        key = (vocab, width, str(device))
        if key not in self._maps:
            self._maps[key] = sketch_maps(*self._projectors, vocab, width, device,
                                          curvature=self.learnability and self.curvature)
        return self._maps[key]

    def features(self, batch: CandidateBatch) -> RowFeatures:
        """What SLAP keeps of a candidate batch: loss, task, the sketch / representation it needs, and the
        batch's Gauss-Newton block when the curvature term is on."""
        sketch = rep = curvature = None
        if self._wants_sketch():
            head, log_probs = batch.extras.get("head"), batch.response_log_probs
            if batch.hidden is None or (log_probs is None and batch.logits is None and head is None):
                raise ValueError("SLAP's gradient sketch needs hidden states and the response log-probabilities, "
                                 "the logits or the LM head")
            vocab = (log_probs if log_probs is not None else batch.logits).shape[-1] if head is None \
                else head.shape[0]
            maps = self.sketch_maps(vocab, batch.hidden.shape[-1], batch.hidden.device)
            sketch, curvature = head_signals(batch.hidden, batch.labels, maps, logits=batch.logits, head=head,
                                             log_probs=log_probs)
            sketch = sketch.cpu()
            curvature = None if curvature is None else curvature.cpu()
        if self.diversity:
            rep = (sketch if self.representation == "sketch"
                   else mean_pool(batch.hidden, batch.attention_mask).cpu())
        return RowFeatures(batch.loss.detach().float().cpu(), list(batch.tasks), sketch, rep, curvature)

    # -- strata --------------------------------------------------------------------------------------------
    def _stratify(self, feats: RowFeatures, ref_loss: Tensor, ref_tasks: list[str]
                  ) -> tuple[list[str], dict[str, float], dict[str, list[float]]]:
        """Each row's stratum, each stratum's loss spread S_h over the reference, and the edges used."""
        if not self.stratify:
            return ["all"] * len(feats), {"all": float(ref_loss.std()) if len(ref_loss) > 1 else 0.0}, {}
        groups = feats.tasks if self.by_task else ["all"] * len(feats)
        ref_groups = ref_tasks if self.by_task else ["all"] * len(ref_loss)
        levels = torch.arange(1, self.strata, dtype=torch.float32) / self.strata
        keys = [""] * len(feats)
        spread, edges = {}, {}
        for group in sorted(set(groups)):
            ref = ref_loss[torch.tensor([t == group for t in ref_groups])]
            cut = torch.quantile(ref, levels) if len(ref) else torch.zeros(len(levels))
            edges[group] = cut.tolist()
            prefix = "" if group == "all" else f"{group}/"
            ref_bins = torch.bucketize(ref, cut)
            for b in ref_bins.unique().tolist():
                members = ref[ref_bins == b]
                spread[f"{prefix}q{b}"] = float(members.std()) if len(members) > 1 else 0.0
            rows = [i for i, t in enumerate(groups) if t == group]
            for i, b in zip(rows, torch.bucketize(feats.loss[rows], cut).tolist()):
                keys[i] = f"{prefix}q{b}"
        return keys, spread, edges

    # -- assembly ------------------------------------------------------------------------------------------
    def _reference(self, feats: RowFeatures) -> Reference:
        """g_ref, H and eta from the reference rows (the candidates, or the whole pool)."""
        g_ref = feats.sketch.mean(0)
        along = float(g_ref @ g_ref)
        if not self.curvature:
            return Reference(g_ref, None, 1.0, along)
        if feats.curvature is None:
            raise ValueError("SLAP's curvature term needs the rows' Gauss-Newton block (RowFeatures.curvature, "
                             "which SLAPPolicy.features computes); or pass curvature=False")
        gauss_newton = feats.curvature
        hessian = gauss_newton + self.damping * gauss_newton.diagonal().mean() * torch.eye(len(g_ref))
        curv = float(g_ref @ hessian @ g_ref)
        eta = self.step_scale * along / curv if curv > 0 else 0.0
        return Reference(g_ref, hessian, eta, eta * along - eta ** 2 / 2 * curv)

    def _assemble(self, feats: RowFeatures, k: int, keys: list[str], spread: dict[str, float],
                  ref: Reference | None) -> Assembly:
        """Steps 3-6: allocate slots over the strata, then add rows greedily into the open strata."""
        n = len(feats)
        counts = Counter(keys)
        neyman = self.allocation == "neyman"
        weights = {h: counts[h] * (spread.get(h, 0.0) if neyman else 1.0) for h in counts}
        slots = allocate(dict(counts), weights, k)
        names = sorted(counts)
        stratum = torch.tensor([names.index(h) for h in keys])
        left = torch.tensor([slots[h] for h in names])
        gain = BatchGain(feats.sketch, ref) if ref is not None else None
        singles = gain.singles() if gain is not None else feats.loss
        sigma = float(singles.std()) if n > 1 else 0.0
        sigma = sigma if sigma > 0 else 1.0
        if self.diversity:
            scale = self._spread_scale(feats.rep, keys)
            nearest = torch.full((n,), math.inf)
        chosen = torch.zeros(n, dtype=torch.bool)
        order: list[int] = []
        for _ in range(sum(slots.values())):
            value = (len(order) + 1) * gain.marginal() / sigma if gain is not None else singles / sigma
            if self.diversity:
                value = value + self.diversity_weight * (nearest / scale).clamp(max=CAP)
            i = int(value.masked_fill(chosen | (left[stratum] == 0), -math.inf).argmax())
            order.append(i)
            chosen[i] = True
            left[stratum[i]] -= 1
            if gain is not None:
                gain.add(i)
            if self.diversity:
                nearest = torch.minimum(nearest, (feats.rep - feats.rep[i]).norm(dim=1))
        share = gain.value / ref.full if gain is not None and ref.full > 0 else None
        return Assembly(order, keys, slots, dict(counts), singles, share)

    def _spread_scale(self, rep: Tensor, keys: list[str]) -> Tensor:
        """Per row, the median pairwise distance inside its stratum (on at most 256 rows of it, seeded)."""
        gen = torch.Generator().manual_seed(self.seed)

        def median_distance(rows: Tensor) -> float:
            if len(rows) > 256:
                rows = rows[torch.randperm(len(rows), generator=gen)[:256]]
            if len(rows) < 2:
                return 0.0
            dist = torch.cdist(rep[rows], rep[rows])
            return float(dist[torch.triu_indices(len(rows), len(rows), 1).unbind()].median())

        overall = median_distance(torch.arange(len(keys))) or 1.0
        scale = {}
        for h in sorted(set(keys)):  # sorted: the seeded subsampling must not follow string hashing
            scale[h] = median_distance(torch.tensor([i for i, key in enumerate(keys) if key == h])) or overall
        return torch.tensor([scale[h] for h in keys])

    # -- the two granularities -----------------------------------------------------------------------------
    def choose(self, batch: CandidateBatch, k: int) -> Tensor:
        return self._choose(self.features(batch), k)

    def row_features(self, batch: CandidateBatch) -> dict[str, Any]:
        """:meth:`features` as global selection gathers them: per row loss, task, sketch and representation,
        and the batch's Gauss-Newton block as a total over its rows, (1, D, D), which
        :meth:`choose_pooled` adds up over the step's batches and divides by the rows pooled."""
        feats = self.features(batch)
        out: dict[str, Any] = {"loss": feats.loss, "tasks": feats.tasks}
        for name in ("sketch", "rep"):
            if getattr(feats, name) is not None:
                out[name] = getattr(feats, name)
        if feats.curvature is not None:
            out["curvature_total"] = (len(feats) * feats.curvature).unsqueeze(0)
        return out

    def choose_pooled(self, features: dict[str, Any], k: int) -> Tensor:
        """The step's K among every micro-batch's candidates on every rank, by the same steps 2-6 as
        :meth:`choose` on one batch of them all: the window grows by all of them (in pooled order), the
        strata, g_ref and H are the pool's. Every rank gets the same features, so every rank chooses alike."""
        total = features.get("curvature_total")
        feats = RowFeatures(features["loss"], list(features["tasks"]), features.get("sketch"),
                            features.get("rep"), None if total is None else total.sum(0) / len(features["loss"]))
        return self._choose(feats, k)

    def _choose(self, feats: RowFeatures, k: int) -> Tensor:
        self._window_loss.extend(feats.loss.tolist())
        self._window_tasks.extend(feats.tasks)
        window = torch.tensor(list(self._window_loss))
        keys, spread, edges = self._stratify(feats, window, list(self._window_tasks))
        ref = self._reference(feats) if self.learnability else None
        self.last = self._assemble(feats, k, keys, spread, ref)
        self.last_edges = edges
        self._last_scores = self.last.singles
        return torch.tensor(self.last.order, dtype=torch.long)

    def log_record(self) -> dict[str, Any]:
        """The allocation actually used at the last ``choose``/``prune``: candidates, slots and chosen rows
        per stratum, the loss edges of the strata and the chosen batch's ``gain_share`` (see ``Assembly``)."""
        if self.last is None:
            return {}
        return {**self.last.record(), "edges": self.last_edges}

    def prune(self, feats: RowFeatures, keep: float | int) -> Tensor:
        """Per-epoch pruning: the pool rows to train on, by the same rule with the pool as its own reference.

        ``keep`` is a share of the pool or a row count. The pool is shuffled (seeded) into blocks of at most
        ``block`` rows and each block keeps its share, so the greedy costs O(n block D) rather than
        O(n^2 D); the strata edges, g_ref and H stay those of the whole pool.
        """
        n = len(feats)
        m = keep if isinstance(keep, int) else round(keep * n)
        keys, spread, edges = self._stratify(feats, feats.loss, feats.tasks)
        ref = self._reference(feats) if self.learnability else None
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        blocks = perm.chunk(max(1, math.ceil(n / self.block)))
        bounds = [0, *torch.tensor([len(b) for b in blocks]).cumsum(0).tolist()]
        kept, slots, singles = [], Counter(), torch.empty(n)
        for block, lo, hi in zip(blocks, bounds, bounds[1:]):
            part = self._assemble(feats.rows(block), round(m * hi / n) - round(m * lo / n),
                                  [keys[i] for i in block.tolist()], spread, ref)
            kept += block[part.order].tolist()
            slots.update(part.slots)
            singles[block] = part.singles
        counts = Counter(keys)
        self.last = Assembly(kept, keys, {h: slots[h] for h in counts}, dict(counts), singles, None)
        self.last_edges = edges
        self._last_scores = singles
        return torch.tensor(kept, dtype=torch.long)

    def state_dict(self) -> dict[str, Any]:
        return {"window_loss": list(self._window_loss), "window_tasks": list(self._window_tasks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._window_loss = deque(state["window_loss"], maxlen=self.window)
        self._window_tasks = deque(state["window_tasks"], maxlen=self.window)
