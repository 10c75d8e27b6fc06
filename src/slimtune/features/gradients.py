"""Per-example gradient features, a whole batch per backward pass, projected and streamed to the store.

For example i with response tokens R_i, the loss is the response-token mean

    L_i = (1 / |R_i|) sum_{t in R_i} -log p(y_t | y_<t)

and its gradient with respect to the weight W of a linear layer y = W a is a sum of outer products

    grad_W L_i = sum_t delta_{i,t} a_{i,t}^T,      delta_{i,t} = dL_i / dy_{i,t}.

One forward pass records the inputs a of every linear layer that holds a trainable weight (LoRA's A and B
factors) and hooks each output; one backward pass of sum_i L_i delivers each output's delta to its hook as
autograd reaches that layer. Rows do not interact in a causal LM, so the delta of row i is the gradient of
L_i alone, already scaled by 1/|R_i|; padding and prompt positions feed no loss term, so their deltas are
exactly zero and contribute nothing. The hook forms the layer's per-example gradients (one batched matrix
product per parameter), hands them on (Adam's preconditioning and the projection act on each parameter's
slice alone), and drops them with the layer's recorded inputs: memory holds one layer's B gradients at a
time, never the B full gradient vectors, and nothing recorded outlives its layer's backward step, so the
peak is that of a plain forward+backward (benchmarks/less_features.py measures both). The LM head runs
only from the batch's first response position on (:func:`slimtune.features.losses.response_logits`): with
a 49k vocabulary it is most of a small model's cost, and prompt positions predict nothing that is scored.

Optionally only the top N layers' LoRA parameters are taken: the hidden state entering them is detached,
so the backward pass covers N layers instead of all (and their activations are all it keeps).

LESS's training-example feature is the update Adam would make from a checkpoint's moments (m, v),

    m' = b1 m + (1 - b1) g,    v' = b2 v + (1 - b2) g^2,    feature = m' / sqrt(v' + eps)

(the paper writes the bias-corrected form; after normalisation the two differ by a near-constant factor),
and its target feature is the plain gradient g. Either is projected (:mod:`slimtune.features.projection`)
one parameter slice at a time (P x is the sum of P[:, slice] x_slice), L2-normalised per row, and written
to a :class:`FeatureStore` in shards.

Trainer checkpoints save Adam's state keyed by integers: the position of each parameter in the optimizer's
parameter groups. :func:`load_adam_moments` maps them back to parameter names by rebuilding the groups the
Hugging Face Trainer makes (trainable parameters in model order, split into weight-decay and no-decay
groups by the installed Trainer's own rule) and checks every moment's shape against its parameter; a
name-keyed state (FSDP's ``optimizer.bin``, or a dict passed in) is read directly.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping
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


def parameter_offsets(model: nn.Module) -> dict[str, int]:
    """Each trainable parameter's first coordinate in the concatenated gradient vector."""
    offsets, offset = {}, 0
    for name, param in trainable_parameters(model):
        offsets[name] = offset
        offset += param.numel()
    return offsets


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer's stack of layers: the decoder's ``layers`` where the model names it (Hugging Face
    models, through a PEFT wrapper), else the longest ModuleList that holds trainable parameters."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if isinstance(getattr(decoder, "layers", None), nn.ModuleList):
        return decoder.layers
    stacks = [m for m in model.modules()
              if isinstance(m, nn.ModuleList) and any(p.requires_grad for p in m.parameters())]
    if not stacks:
        raise ValueError("gradients of the top layers need the model's layer stack (an nn.ModuleList holding "
                         "the LoRA factors); none was found: take all layers (layers=None)")
    return max(stacks, key=len)


class _Cut:
    """Makes the hidden state entering the lowest part taken a fresh leaf, so the backward pass stops there
    (nothing below is differentiated) and has one small tensor to aim at: a forward hook on the input
    embeddings (all layers) or a forward pre-hook on the lowest layer taken."""

    def __init__(self):
        self.leaves: list[Tensor] = []

    def _leaf(self, hidden: Tensor) -> Tensor:
        self.leaves.append(hidden.detach().requires_grad_())
        return self.leaves[-1]

    def output(self, _module, _args, output):
        return self._leaf(output)

    def layer_input(self, _module, args, kwargs):
        if args:
            return (self._leaf(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self._leaf(kwargs["hidden_states"])}


def stream_per_example_gradients(model: nn.Module, batch: Mapping[str, Tensor],
                                 consume: Callable[[str, Tensor], None], *, layers: int | None = None,
                                 ) -> tuple[Tensor, Tensor]:
    """Call ``consume(name, grad)`` with every trainable parameter's per-example gradients (B, numel) as the
    backward pass reaches its layer (top layer first), and drop them, and that layer's recorded inputs,
    as soon as it returns: memory holds one layer's gradients at a time, never the B gradient vectors.

    ``layers``: take only the LoRA parameters of the top ``layers`` layers of the stack (and any outside it,
    e.g. on the LM head); the hidden state entering them is detached, so autograd never goes lower.
    Returns each row's response-token mean loss and response-token count.
    """
    owners = _linear_owners(model)
    cut = _Cut()
    below: set[int] = set()
    if layers is None:
        handles = [model.get_input_embeddings().register_forward_hook(cut.output)]
    else:
        stack = decoder_layers(model)
        first = max(len(stack) - layers, 0)
        below = {id(m) for layer in stack[:first] for m in layer.modules()}
        handles = [stack[first].register_forward_pre_hook(cut.layer_input, with_kwargs=True)]
    params: dict[str, list[tuple[str, str]]] = {}  # module name -> its (parameter name, kind), in model order
    modules: dict[str, nn.Linear] = {}
    for name, (module_name, module, kind) in owners.items():
        if id(module) not in below:
            params.setdefault(module_name, []).append((name, kind))
            modules[module_name] = module
    inputs: dict[tuple[str, int], Tensor] = {}  # (module, call) -> input, until that call's gradient arrives
    calls_made: dict[str, int] = dict.fromkeys(modules, 0)
    calls_left: dict[str, int] = dict.fromkeys(modules, 0)  # recorded calls whose gradient has not arrived
    sums: dict[str, Tensor] = {}  # per-example gradients of a module called more than once, until complete

    def finish(module_name: str) -> None:
        for name, kind in params[module_name]:
            grad = sums.pop(name, None)
            if grad is None:  # no call of the module reached the loss
                grad = torch.zeros(batch_size, getattr(modules[module_name], kind).numel(), device=device)
            consume(name, grad)

    def arrive(module_name: str, call: int, delta: Tensor) -> None:
        a = inputs.pop((module_name, call))
        d = delta.reshape(batch_size, -1, delta.shape[-1]).float()
        for name, kind in params[module_name]:
            if kind == "bias":
                grad = d.sum(1)
            else:  # sum over positions of delta a^T, per row
                grad = torch.bmm(d.transpose(1, 2), a.reshape(batch_size, -1, a.shape[-1]).float())
            grad = grad.reshape(batch_size, -1)
            sums[name] = sums[name] + grad if name in sums else grad
        calls_left[module_name] -= 1
        if calls_left[module_name] == 0:
            finish(module_name)

    def recorder(module_name: str):
        def hook(_module, args, output):
            if not output.requires_grad:
                return
            call = calls_made[module_name]
            inputs[(module_name, call)] = args[0].detach()
            calls_made[module_name] += 1
            calls_left[module_name] += 1
            # the hook holds names, not tensors: a tensor it closed over would live as long as the graph
            output.register_hook(lambda delta: arrive(module_name, call, delta))
        return hook

    handles += [module.register_forward_hook(recorder(name)) for name, module in modules.items()]
    device = next(model.parameters()).device
    batch_size = batch["input_ids"].shape[0]
    try:
        logits, labels = response_logits(model, batch["input_ids"].to(device),
                                          batch["attention_mask"].to(device), batch["labels"].to(device))
    finally:
        for handle in handles:
            handle.remove()
    losses, tokens = example_losses(logits, labels)
    del logits
    torch.autograd.grad(losses.sum(), cut.leaves)
    inputs.clear()
    for module_name, left in calls_left.items():
        if left or not calls_made[module_name]:  # some call never reached the loss, or none was made
            finish(module_name)
    return losses.detach(), tokens


@dataclass
class PerExampleGradients:
    """The per-example gradients of one batch, all held at once (for tests and inspection; extraction streams
    them): ``grads()`` yields ``(name, (B, numel))`` in parameter order. ``losses`` and ``tokens`` are each
    row's response-token mean loss and response-token count."""

    losses: Tensor
    tokens: Tensor
    _grads: dict[str, Tensor]
    _order: list[str]

    def grads(self) -> Iterator[tuple[str, Tensor]]:
        for name in self._order:
            if name in self._grads:
                yield name, self._grads[name]


def per_example_gradients(model: nn.Module, batch: Mapping[str, Tensor], *,
                          layers: int | None = None) -> PerExampleGradients:
    """Gradients of every row's response-token mean loss w.r.t. the trainable Linear parameters (those of the
    top ``layers`` layers), from one forward and one backward pass over the whole batch."""
    grads: dict[str, Tensor] = {}
    losses, tokens = stream_per_example_gradients(model, batch, grads.__setitem__, layers=layers)
    return PerExampleGradients(losses, tokens, grads, [name for name, _ in trainable_parameters(model)])


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
                      moments: AdamMoments | None = None, *, layers: int | None = None) -> Tensor:
    """Projected per-example gradient features (B, dim), unnormalised: Adam update directions when
    ``moments`` are given (LESS's training features), plain gradients otherwise (its target features).

    Each parameter's slice is preconditioned and projected inside the backward pass, the moment its layer's
    gradient exists: P is linear, so the sum of P[:, slice] x_slice over the slices, in any order, is P x.
    With ``layers``, only the top layers' slices are summed (the others count as zero)."""
    offsets = parameter_offsets(model)
    device = next(model.parameters()).device
    out = torch.zeros(batch["input_ids"].shape[0], projector.dim, dtype=torch.float32, device=device)

    def consume(name: str, grad: Tensor) -> None:
        vector = moments.direction(name, grad) if moments is not None else grad
        projector.project(vector, offsets[name], out)

    stream_per_example_gradients(model, batch, consume, layers=layers)
    return out


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
                              layers: int | None = None) -> ExtractionStats:
    """Fill ``store`` with ``features`` (rows L2-normalised, ``dtype``) and ``norms`` (float32, each row's
    norm before normalisation) for every row of ``dataset``.

    ``layers``: features of the top ``layers`` layers' LoRA gradients only (see
    :func:`stream_per_example_gradients`); all layers when None.

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
            out = gradient_features(model, batch, projector, moments, layers=layers)
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
