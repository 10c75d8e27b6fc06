"""The online baselines users set UDS and SLAP against (uniform, big-loss, grad-norm, RHO-loss).

Each reads the signals of the trainer's one no-grad forward over the B candidates and keeps K of them.
Losses are each row's mean cross-entropy over its response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from slimtune.data.tokenize import IGNORE_INDEX
from slimtune.online.base import CandidateBatch, Policy, TopKPolicy


@dataclass
class UniformPolicy(Policy):
    """Uniform: a random K of the B candidates (seeded), chosen without looking at them.

        chosen ~ Uniform{ S subset of the candidates : |S| = K }

    It asks for no signal, so the trainer runs no scoring forward: its cost is that of training on batches of
    K, the fair "random at the same data budget" reference for the scoring policies.
    """

    name: ClassVar[str] = "uniform"
    seed: int = 0

    def __post_init__(self) -> None:
        self._generator = torch.Generator().manual_seed(self.seed)

    def needs(self) -> set[str]:
        return set()

    def choose(self, batch: CandidateBatch, k: int) -> Tensor:
        return torch.randperm(len(batch), generator=self._generator)[:k]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self._generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._generator.set_state(state["generator"])


@dataclass
class BigLossPolicy(TopKPolicy):
    """Big-loss ("MaxLoss"; Loshchilov & Hutter 2015, Kawaguchi & Lu 2020): the K worst-fitted candidates.

        score(x) = L(x; theta_t)
    """

    name: ClassVar[str] = "big-loss"

    def score(self, batch: CandidateBatch) -> Tensor:
        return batch.loss


@dataclass
class GradNormPolicy(TopKPolicy):
    """Grad-norm ("MaxGrad"; Katharopoulos & Fleuret 2018): the K candidates with the largest gradient,
    bounded by the gradient with respect to the logits, which the forward gives in closed form:

        score(x) = sum_{t in response(x)} || softmax(z_t) - onehot(y_t) ||_2

    (the per-token logit gradients of the summed loss).
    """

    name: ClassVar[str] = "grad-norm"

    def needs(self) -> set[str]:
        return {"loss", "logits"}

    def score(self, batch: CandidateBatch) -> Tensor:
        targets = batch.labels[:, 1:]
        mask = targets != IGNORE_INDEX
        # Only response positions: a (tokens, V) softmax instead of one over every padded position.
        gradient = torch.softmax(batch.logits[:, :-1][mask].float(), dim=-1)
        # p - e_y in place; the expanded form ||p||^2 - 2 p_y + 1 cancels to 0 for well-fitted tokens.
        target = targets[mask].unsqueeze(1)
        gradient.scatter_add_(1, target, -torch.ones_like(target, dtype=gradient.dtype))
        norms = gradient.norm(dim=1)
        rows = torch.arange(len(batch), device=mask.device).unsqueeze(1).expand_as(mask)[mask]
        return torch.zeros(len(batch), device=norms.device).index_add_(0, rows, norms)


@dataclass
class RhoLossPolicy(TopKPolicy):
    """RHO-LOSS (Mindermann et al., ICML 2022): the K candidates with the largest reducible holdout loss,

        score(x) = L(x; theta_t) - L(x; theta_ref)

    learnable (a reference model can fit them, so they are not noise), worth learning and not yet learnt.
    The trainer computes the reference losses once over the training set and caches them in the run folder.

    ``reference_model``: the paper's irreducible-loss model is trained on a held-out split; pass its id,
    path or PEFT adapter folder (e.g. ``runs/ref/adapter`` from ``slimtune train`` on held-out rows; it must
    share the tokenizer). None uses the model being fine-tuned as it was before training: no held-out data
    needed, and the score becomes how little a row's loss has fallen since the start, a weaker reading.
    """

    name: ClassVar[str] = "rho-loss"
    reference_model: str | None = None

    def needs(self) -> set[str]:
        return {"loss", "ref_loss"}

    def score(self, batch: CandidateBatch) -> Tensor:
        return batch.loss - batch.ref_loss
