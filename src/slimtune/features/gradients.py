"""Per-example gradient features, a whole batch per backward pass, projected and streamed to the store.

For example i with response tokens R_i, the loss is the response-token mean

    L_i = (1 / |R_i|) sum_{t in R_i} -log p(y_t | y_<t)

and its gradient with respect to the weight W of a linear layer y = W a is a sum of outer products

    grad_W L_i = sum_t delta_{i,t} a_{i,t}^T,      delta_{i,t} = dL_i / dy_{i,t}.

One forward pass records the inputs a of every linear layer that holds a trainable weight (LoRA's A and B
factors); one ``autograd.grad`` of sum_i L_i with respect to those layers' outputs gives every delta. Rows do
not interact in a causal LM, so the delta of row i is the gradient of L_i alone, already scaled by
1/|R_i|; padding and prompt positions feed no loss term, so their deltas are exactly zero and contribute
nothing. Each per-example gradient is then one batched matrix product per layer, formed one parameter at a
time, so memory holds one parameter's B gradients, never the B full gradient vectors. The LM head runs
only from the batch's first response position on (:func:`slimtune.features.losses.response_logits`): with
a 49k vocabulary it is most of a small model's cost, and prompt positions predict nothing that is scored.

LESS's training-example feature is the update Adam would make from a checkpoint's moments (m, v),

    m' = b1 m + (1 - b1) g,    v' = b2 v + (1 - b2) g^2,    feature = m' / sqrt(v' + eps)

(the paper writes the bias-corrected form; after normalisation the two differ by a near-constant factor),
and its target feature is the plain gradient g. Either is projected (:mod:`slimtune.features.projection`)
one parameter at a time, L2-normalised per row, and written to a :class:`FeatureStore` in shards.

Trainer checkpoints save Adam's state keyed by integers: the position of each parameter in the optimizer's
parameter groups. :func:`load_adam_moments` maps them back to parameter names by rebuilding the groups the
Hugging Face Trainer makes (trainable parameters in model order, split into weight-decay and no-decay
groups by the installed Trainer's own rule) and checks every moment's shape against its parameter; a
name-keyed state (FSDP's ``optimizer.bin``, or a dict passed in) is read directly.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from slimtune.data.tokenize import Collator, TokenizedDataset
from slimtune.features.losses import example_losses, response_logits
from slimtune.features.projection import Projector
from slimtune.features.store import FeatureStore

FEATURES, NORMS = "features", "norms"


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters in ``named_parameters`` order: the coordinate order of every gradient vector."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def _linear_owners(model: nn.Module) -> dict[str, tuple[str, nn.Linear, str]]:
    """parameter name -> (module name, the nn.Linear that owns it, "weight" | "bias")."""
    owners = {}
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            for kind in ("weight", "bias"):
                param = getattr(module, kind)
                if param is not None and param.requires_grad:
                    owners[f"{module_name}.{kind}" if module_name else kind] = (module_name, module, kind)
    missing = [name for name, _ in trainable_parameters(model) if name not in owners]
    if missing:
        raise ValueError("per-example gradients are taken for trainable nn.Linear weights and biases (e.g. "
                         f"LoRA factors); these trainable parameters are not: {missing[:5]}")
    return owners


@dataclass
class PerExampleGradients:
    """The per-example gradients of one batch: ``grads()`` yields ``(name, (B, numel))`` in parameter order.

    ``losses`` and ``tokens`` are each row's response-token mean loss and response-token count.
    """

    losses: Tensor
    tokens: Tensor
    _order: list[str]
    _owners: dict[str, tuple[str, nn.Linear, str]]
    _inputs: dict[str, list[Tensor]]
    _deltas: dict[str, list[Tensor]]

    def grads(self) -> Iterator[tuple[str, Tensor]]:
        for name in self._order:
            module_name, _, kind = self._owners[name]
            deltas = self._deltas[module_name]
            batch = deltas[0].shape[0]
            if kind == "bias":
                grad = sum(d.reshape(batch, -1, d.shape[-1]).float().sum(1) for d in deltas)
            else:  # sum over calls of the layer (weight sharing) and over positions of delta a^T
                grad = sum(torch.bmm(d.reshape(batch, -1, d.shape[-1]).float().transpose(1, 2),
                                     a.reshape(batch, -1, a.shape[-1]).float())
                           for d, a in zip(deltas, self._inputs[module_name]))
            yield name, grad.reshape(batch, -1)


def per_example_gradients(model: nn.Module, batch: Mapping[str, Tensor]) -> PerExampleGradients:
    """Gradients of every row's response-token mean loss w.r.t. the trainable Linear parameters, from one
    forward and one backward pass over the whole batch (see the module docstring)."""
    owners = _linear_owners(model)
    modules = {module_name: module for module_name, module, _ in owners.values()}
    inputs: dict[str, list[Tensor]] = {name: [] for name in modules}
    outputs: dict[str, list[Tensor]] = {name: [] for name in modules}

    def recorder(name):
        def hook(_module, args, output):
            inputs[name].append(args[0].detach())
            outputs[name].append(output)
        return hook

    handles = [module.register_forward_hook(recorder(name)) for name, module in modules.items()]
    try:
        device = next(model.parameters()).device
        logits, labels = response_logits(model, batch["input_ids"].to(device),
                                         batch["attention_mask"].to(device), batch["labels"].to(device))
    finally:
        for handle in handles:
            handle.remove()
    losses, tokens = example_losses(logits, labels)
    names = list(modules)
    flat = [out for name in names for out in outputs[name]]
    grads = torch.autograd.grad(losses.sum(), flat, allow_unused=True)
    deltas: dict[str, list[Tensor]] = {name: [] for name in names}
    position = 0
    for name in names:
        for out in outputs[name]:
            grad = grads[position]
            deltas[name].append(torch.zeros_like(out) if grad is None else grad)
            position += 1
    order = [name for name, _ in trainable_parameters(model)]
    return PerExampleGradients(losses.detach(), tokens, order, owners, inputs, deltas)


# -- Adam moments -------------------------------------------------------------------------------------------
@dataclass
class AdamMoments:
    """Adam's first and second moments per parameter name, with the optimizer's betas and eps."""

    exp_avg: dict[str, Tensor]
    exp_avg_sq: dict[str, Tensor]
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    source: str = ""

    def direction(self, name: str, grad: Tensor) -> Tensor:
        """m' / sqrt(v' + eps) for per-example gradients ``grad`` (B, numel) of parameter ``name``."""
        m = self.exp_avg[name].reshape(1, -1).to(grad)
        v = self.exp_avg_sq[name].reshape(1, -1).to(grad)
        # B x numel is the largest thing in the loop: two allocations, the rest in place
        denominator = grad.square().mul_(1 - self.beta2).add_(v, alpha=self.beta2).add_(self.eps).sqrt_()
        return torch.lerp(grad, m.expand_as(grad), self.beta1).div_(denominator)

    def to(self, device: torch.device | str) -> AdamMoments:
        return AdamMoments({k: v.to(device) for k, v in self.exp_avg.items()},
                           {k: v.to(device) for k, v in self.exp_avg_sq.items()},
                           self.beta1, self.beta2, self.eps, self.source)


def _trainer_decay_names(model: nn.Module) -> set[str]:
    """The parameter names the installed Trainer puts in its weight-decay group. Its rule has changed across
    transformers versions (layer types, then name patterns), so ask the Trainer rather than copy the rule; the
    method reads nothing from the Trainer instance."""
    from transformers import Trainer

    return set(Trainer.get_decay_parameter_names(None, model))


def _integer_key_names(model: nn.Module, groups: list[dict[str, Any]]) -> dict[int, str]:
    """Optimizer state index -> parameter name, for a state dict saved from the Trainer's optimizer."""
    trainable = [name for name, _ in trainable_parameters(model)]
    decay = _trainer_decay_names(model)
    trainer_groups = [[n for n in trainable if n in decay], [n for n in trainable if n not in decay]]
    # the Trainer's two groups; the same without an empty group; one group (a custom optimizer)
    layouts = [trainer_groups, [g for g in trainer_groups if g], [trainable]]
    sizes = [len(group["params"]) for group in groups]
    for layout in layouts:
        if [len(g) for g in layout] == sizes:
            return {index: name for group, names in zip(groups, layout)
                    for index, name in zip(group["params"], names)}
    raise ValueError(f"the optimizer's parameter groups (sizes {sizes}) do not match this model's "
                     f"{len(trainable)} trainable parameters grouped as the Trainer groups them "
                     f"({[len(g) for g in trainer_groups]}); load the checkpoint into the same model "
                     "(same base model, LoRA settings and target modules) that was trained")


def _strip_wrappers(name: str) -> str:
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "").removeprefix(
        "module.")


def load_adam_moments(source: str | os.PathLike | Mapping[str, Any], model: nn.Module) -> AdamMoments:
    """Adam moments of ``model``'s trainable parameters from a Trainer checkpoint directory (``optimizer.pt``
    or ``optimizer.bin``), an optimizer state-dict file, or an already loaded state dict (integer- or
    name-keyed). Parameters without state (never stepped) get zero moments."""
    label = "state dict"
    if not isinstance(source, Mapping):
        path = Path(source)
        if path.is_dir():
            path = next((path / f for f in ("optimizer.pt", "optimizer.bin") if (path / f).exists()), path)
        if not path.is_file():
            raise FileNotFoundError(f"no optimizer state in {source} (the Trainer writes optimizer.pt "
                                    "when it saves checkpoints with save_only_model=False)")
        source, label = torch.load(path, map_location="cpu", weights_only=True), str(path)
    state, groups = source["state"], source.get("param_groups", [{}])
    params = dict(trainable_parameters(model))
    if all(isinstance(k, int) for k in state):
        names = _integer_key_names(model, groups)
        group_of = {names[i]: g for g in groups for i in g["params"]}
    else:
        canonical = {_strip_wrappers(k): k for k in state}
        names = {canonical[_strip_wrappers(n)]: n for n in params if _strip_wrappers(n) in canonical}
        group_of = dict.fromkeys(params, groups[0])
    exp_avg, exp_avg_sq = {}, {}
    for key, name in names.items():
        entry = state.get(key, {})
        for moments, field_name in ((exp_avg, "exp_avg"), (exp_avg_sq, "exp_avg_sq")):
            value = entry.get(field_name)
            value = torch.zeros_like(params[name], device="cpu") if value is None else value.float()
            if value.shape != params[name].shape:
                raise ValueError(f"{label}: moment '{field_name}' of {name} has shape {tuple(value.shape)}, "
                                 f"the parameter {tuple(params[name].shape)}: the state is another model's")
            moments[name] = value
    absent = [n for n in params if n not in exp_avg]
    if absent:
        raise ValueError(f"{label} holds no state for {len(absent)} trainable parameters, e.g. {absent[:3]}")
    group = group_of[next(iter(params))]
    beta1, beta2 = group.get("betas", (0.9, 0.999))
    return AdamMoments(exp_avg, exp_avg_sq, float(beta1), float(beta2), float(group.get("eps", 1e-8)), label)


# -- features ----------------------------------------------------------------------------------------------
def gradient_features(model: nn.Module, batch: Mapping[str, Tensor], projector: Projector,
                      moments: AdamMoments | None = None) -> tuple[Tensor, PerExampleGradients]:
    """Projected per-example gradient features (B, dim), unnormalised: Adam update directions when
    ``moments`` are given (LESS's training features), plain gradients otherwise (its target features)."""
    grads = per_example_gradients(model, batch)
    out = None
    offset = 0
    for name, grad in grads.grads():
        vector = moments.direction(name, grad) if moments is not None else grad
        out = projector.project(vector, offset, out)
        offset += grad.shape[1]
    return out, grads


@dataclass
class ExtractionStats:
    """What an extraction computed (shards found in the store cost nothing and count nowhere here)."""

    rows: int = 0
    tokens: int = 0
    seconds: float = 0.0
    shards: dict[str, int] = field(default_factory=dict)


def extract_gradient_features(model: nn.Module, dataset: TokenizedDataset, store: FeatureStore, *,
                              projector: Projector, moments: AdamMoments | None = None, batch_size: int = 8,
                              shard_rows: int = 256, dtype: str = "float16", pad_token_id: int = 0,
                              ) -> ExtractionStats:
    """Fill ``store`` with ``features`` (rows L2-normalised, ``dtype``) and ``norms`` (float32, each row's
    norm before normalisation) for every row of ``dataset``.

    Shards are computed independently (rows sorted by length inside a shard to keep padding small), so a
    resumed, repeated or rank-sharded run writes the same rows; the model is in eval mode (no dropout).
    """
    device = next(model.parameters()).device
    moments = moments.to(device) if moments is not None else None
    collate = Collator(pad_token_id)
    stats = ExtractionStats()
    was_training = model.training
    model.eval()

    def compute(lo: int, hi: int) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        rows = sorted(range(lo, hi), key=lambda i: -len(dataset.rows[i]["input_ids"]))
        features = torch.zeros(hi - lo, projector.dim)
        for first in range(0, len(rows), batch_size):
            chunk = rows[first:first + batch_size]
            batch = collate([dataset[i] for i in chunk])
            out, _ = gradient_features(model, batch, projector, moments)
            features[torch.tensor(chunk) - lo] = out.cpu()
            stats.tokens += int(batch["attention_mask"].sum())
        norms = features.norm(dim=1)
        stats.rows += hi - lo
        stats.seconds += time.perf_counter() - start
        normalised = features / norms.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
        return {FEATURES: normalised.numpy().astype(dtype), NORMS: norms.numpy()}

    try:
        stats.shards = store.fill((FEATURES, NORMS), len(dataset), shard_rows, compute)
    finally:
        model.train(was_training)
    return stats
