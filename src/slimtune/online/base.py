"""The online vocabulary: what one scoring forward computed (CandidateBatch) and the Policy every method is.

At each step the :class:`~slimtune.online.trainer.SelectiveTrainer` draws B candidates, runs one no-grad
forward that computes what the policy ``needs()``, hands the policy a :class:`CandidateBatch`, backpropagates
the K rows it ``choose``s, and calls ``observe`` with those K so the policy can update its memories. Policies
never run the model themselves; that is what keeps scoring cheap and every policy comparable.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

import torch
from torch import Tensor

#: Names a policy may ask for in ``needs()``. ``ref_loss`` is each row's loss under the policy's
#: ``reference_model`` attribute (a model id, path or PEFT adapter folder; None: the model being trained,
#: as it was before training), computed once over the training set and cached. ``logit_factors`` is the
#: logits in factored form, ``hidden`` plus ``extras["head"]`` (V, H) with logits = hidden @ head.T, for
#: policies that need only products of the logits with thin matrices (far cheaper than B x T x V); where the
#: model's output layer is not exactly that linear map, the mechanism fills ``logits`` instead. Either way it
#: also fills ``response_log_probs``, the log-softmax its loss took at the response positions, so that a
#: policy reading the predictive distribution there (SLAP) does not compute the logits and softmax again.
SIGNALS = frozenset({"loss", "logits", "logit_factors", "hidden", "ref_loss", "embedding"})


@dataclass
class CandidateBatch:
    """One candidate batch after the shared no-grad forward. Row i of every tensor is candidate i.

    ``loss`` is each row's mean cross-entropy over its response tokens; ``logits`` (B, T, V) and ``hidden``
    (B, T, H, last layer) are filled only when the policy needs them; ``response_mask`` (B, T) marks the
    positions whose *next* token is a response token (where the loss is taken), ``attention_mask`` the real
    tokens. ``ref_loss`` is a reference model's loss (RHO-loss). ``index`` is each row's dataset index.
    ``loss`` is NaN when the policy asked for nothing (an empty ``needs()``): no scoring forward ran.
    ``progress`` is the share of training done, in [0, 1], for schedules such as InfoBatch's annealing.
    ``response_log_probs`` (N, V) is the log-softmax of the logits at the N response positions, row by row and
    in position order within a row (the order of ``response_mask.nonzero()``), as the scoring loss took it.
    """

    index: Tensor
    ids: list[str]
    tasks: list[str]
    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    loss: Tensor
    token_count: Tensor
    step: int = 0
    progress: float = 0.0
    logits: Tensor | None = None
    hidden: Tensor | None = None
    ref_loss: Tensor | None = None
    response_log_probs: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.index.shape[0])

    @property
    def response_mask(self) -> Tensor:
        """(B, T) True at positions t whose label at t+1 is a response token (causal LM shift)."""
        mask = torch.zeros_like(self.labels, dtype=torch.bool)
        mask[:, :-1] = self.labels[:, 1:] != -100
        return mask

    def subset(self, rows: Tensor | list[int]) -> CandidateBatch:
        rows_t = torch.as_tensor(rows, dtype=torch.long, device=self.loss.device)
        picked: dict[str, Any] = {}
        if self.response_log_probs is not None:  # per response token: each picked row's run of tokens
            count = self.response_mask.sum(1).tolist()
            start = [0, *torch.tensor(count).cumsum(0).tolist()]
            picked["response_log_probs"] = torch.cat(
                [self.response_log_probs[start[i]:start[i] + count[i]] for i in rows_t.tolist()])
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in picked:
                continue
            if isinstance(value, Tensor):
                picked[f.name] = value[rows_t.to(value.device)]
            elif isinstance(value, list):
                picked[f.name] = [value[i] for i in rows_t.tolist()]
        return replace(self, **picked)


class Policy(ABC):
    """An online selection method: choose K of the B candidates at each step.

    Subclasses are dataclasses whose fields are the method's parameters.
    """

    name: ClassVar[str]
    #: True for a policy that decides per row how many to keep (InfoBatch) and ignores K: a benchmark then
    #: runs it once per seed, not once per budget, and never compares it with random at a budget it ignored.
    sets_own_budget: ClassVar[bool] = False

    def needs(self) -> set[str]:
        """Signals the shared forward must compute (a subset of :data:`SIGNALS`); an empty set means the
        policy chooses without looking, and the mechanism skips the scoring forward altogether."""
        return {"loss"}

    @abstractmethod
    def choose(self, batch: CandidateBatch, k: int) -> Tensor:
        """Indices (into the batch) of the K rows to backpropagate, most wanted first. A policy that sets its
        own budget (InfoBatch) may return another number of rows, at least one."""

    def scores(self, batch: CandidateBatch) -> Tensor | None:
        """Per-candidate scores of the last ``choose`` call, for the selection log (None if not scored)."""
        return getattr(self, "_last_scores", None)

    def weights(self, batch: CandidateBatch) -> Tensor | None:
        """Per-candidate loss weights of the last ``choose`` call (None: every chosen row weighs 1)."""
        return getattr(self, "_last_weights", None)

    def observe(self, chosen: CandidateBatch) -> None:
        """Called with the chosen rows right after ``choose``, before the next candidate batch is scored
        (their backward follows; weights do not change inside an accumulation window): memories go here."""

    def row_features(self, batch: CandidateBatch) -> dict[str, Tensor | list] | None:
        """Per-row summaries, (B, ...) tensors or lists of B items, from which ``choose_pooled`` can choose:
        what global selection gathers across micro-batches and ranks and concatenates, name by name (a policy
        may also hand a per-batch total as a (1, ...) tensor, which then arrives as one row per batch). None
        (the default): the policy chooses per candidate batch."""
        return None

    def choose_pooled(self, features: dict[str, Tensor | list], k: int) -> Tensor:
        """Indices of the K rows to train among the pooled candidates (``row_features`` of every micro-batch
        of the step on every rank, concatenated in rank then micro-batch order), most wanted first. Called on
        every rank with the same features: it must choose the same rows and update memories the same way (it
        is the whole step: there is no separate ``observe``)."""
        raise NotImplementedError(f"policy '{self.name}' does not choose among pooled candidates")

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue exactly (memories, running statistics)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


def top_k(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` highest scores, highest first; a NaN score (a row not scored yet, as in the
    trainer's stale mode) ranks above every number, and ties keep candidate order."""
    return torch.sort(scores.nan_to_num(nan=math.inf), descending=True, stable=True).indices[:min(k, len(scores))]


class TopKPolicy(Policy):
    """A policy that scores each candidate on its own and keeps the K highest: top-K of ``score``."""

    @abstractmethod
    def score(self, batch: CandidateBatch) -> Tensor:
        """One score per candidate, (B,); higher is more wanted."""

    def choose(self, batch: CandidateBatch, k: int) -> Tensor:
        self._last_scores = self.score(batch)
        return top_k(self._last_scores, k)

    def row_features(self, batch: CandidateBatch) -> dict[str, Tensor]:
        return {"score": self.score(batch)}

    def choose_pooled(self, features: dict[str, Tensor], k: int) -> Tensor:
        self._last_scores = features["score"]
        return top_k(self._last_scores, k)
