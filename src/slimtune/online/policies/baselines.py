"""The online baselines users set UDS and SLAP against (uniform, big-loss, grad-norm, RHO-loss, and
loss-minus-init: RHO-loss's score without held-out data, named for what it is).

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

    def row_features(self, batch: CandidateBatch) -> dict[str, Tensor]:
        return {"row": torch.zeros(len(batch))}

    def choose_pooled(self, features: dict[str, Tensor], k: int) -> Tensor:
        return torch.randperm(len(features["row"]), generator=self._generator)[:k]

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
class LossMinusInitPolicy(TopKPolicy):
    """Loss minus initial loss: the K candidates whose loss has fallen least since training began,

        score(x) = L(x; theta_t) - L(x; theta_0)

    with theta_0 the model being fine-tuned as it was before training (the trainer computes those losses once
    over the training set and caches them in the run folder). This is what RHO-LOSS degenerates to without
    held-out data, named for what it is: the reference has seen nothing the model has not, so the score says
    nothing about which rows are learnable rather than noise.
    """

    name: ClassVar[str] = "loss-minus-init"
    reference_model: ClassVar[str | None] = None

    def needs(self) -> set[str]:
        return {"loss", "ref_loss"}

    def score(self, batch: CandidateBatch) -> Tensor:
        return batch.loss - batch.ref_loss


@dataclass
class RhoLossPolicy(LossMinusInitPolicy):
    """RHO-LOSS (Mindermann et al., ICML 2022): the K candidates with the largest reducible holdout loss,

        score(x) = L(x; theta_t) - L(x; theta_IL)

    learnable (the irreducible-loss model fits them, so they are not noise), worth learning and not yet learnt.
    theta_IL is trained on a held-out split that the main run never trains on; its loss on every training row
    is computed once and cached.

    ``reference_model``: the IL model (an id, path or PEFT adapter folder sharing the tokenizer). Left unset,
    :func:`~slimtune.online.trainer.train_online` carves ``holdout`` (a share of the pool, or the rows the caller
    gives) out of the training pool, trains the IL model on it (cached in ``output_dir/irreducible``) and
    sets it; a trainer built by hand refuses the policy without one.
    """

    name: ClassVar[str] = "rho-loss"
    requires_reference: ClassVar[bool] = True
    reference_model: str | None = None
    holdout: float = 0.1
