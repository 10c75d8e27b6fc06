"""DELIFT's model-aware in-context utility kernel (Agarwal et al., ICLR 2025, section 3.1).

How much does showing example j = (x_j, y_j) in context help the model produce target i's own answer y_i?
With p(y_i | c) the vector of the model's probabilities of the T_i ground-truth response tokens of i under
teacher forcing, after prompt c:

    d_euclidean(i | c) = || 1 - p(y_i | c) ||_2 / sqrt(T_i)                 (the authors' default)
    d_kl(i | c)        = -(1 / T_i) * sum_t log p(y_i,t | c, y_i,<t)        (the KL to the one-hot answer)

    UF[i, j] = d(i | no example) - d(i | example j shown before x_i)

With d_kl, UF[i, j] = (1/T_i) * (log p(y_i | x_i, x_j, y_j) - log p(y_i | x_i)): the per-token pointwise
mutual information between j and y_i given x_i, the paper's Theorem 1. Rows are targets, columns candidates,
so UF is the similarity a facility-location objective reads (row i is covered by the columns in the set).

Prompts are the authors' wording, placed as the user turn of the model's chat template with y_i as the
assistant turn (the authors' code concatenates raw text with an EOS between prompt and answer; a chat model
is fine-tuned on its template, so its utilities should be measured there too). Scored tokens are y_i plus
the template's end-of-turn marker, as in training labels, and the answer is clipped to the same first
``max_text_tokens`` tokens in every context, so d(i | no example) and d(i | j) score exactly the same tokens.

Cost and how it is cut:
- every sequence is assembled from token pieces tokenised once (template text, each x, each y; they join
  exactly as the whole text tokenises, see :class:`_Pieces`), so building n^2 pairs costs no tokenisation
  and ``count_tokens`` is exact arithmetic, without running anything;
- sequences are sorted by length and batched under a token budget, which keeps padding small;
- the no-example pass runs once per target, inside the block that holds that target;
- the decoder's hidden states go through the LM head only at the positions that predict response tokens
  (with a 49k vocabulary the head costs more than the 135M-parameter body for short rows); a model whose
  logits are more than head(hidden) (soft-capping, scaling) is detected once and gets full logits instead,
  in batches of at most ``head_chunk`` tokens;
- sparse mode scores each target only against given neighbour columns (the k nearest candidates by sentence
  embedding): n * k pairs instead of n^2.

The kernel is computed in blocks of target rows, each written atomically to the feature store
(:mod:`slimtune.features.store`) under a key made of the two example lists, the neighbours, the model's
identity and the settings: a killed run resumes at the first missing block, and under ``torchrun`` each
rank computes its share of the blocks.

Scaling: the authors min-max scale the whole kernel to [0, 1]. In sparse mode only computed pairs enter the
minimum and maximum; pairs never computed stay at 0, i.e. they count as no more useful than the least useful
computed pair, which is what a sparse facility-location kernel means by a missing entry.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import string
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from slimtune.data.example import Example, pool_hash
from slimtune.features.store import FeatureStore

TEMPLATE_NO_EXAMPLE = "Instruction: Please generate a response to the following query.\n\n\nQuery: {query}\n"
TEMPLATE_WITH_EXAMPLE = (
    "Instruction:\nUse the following example as a guide to answer the query in the same format and style, "
    "providing a clear and concise response.\n\n\nExample:\n{example_prompt}\n{example_response}"
    "\n\n\nQuery:\n{query}\n"
)
DISTANCES = ("euclidean", "kl")
#: Bumped whenever the meaning of a cached block changes, so old blocks are never read as new ones.
_FORMAT_VERSION = 1
_ANSWER = "answer"


@dataclass
class TokenCount:
    """What a kernel costs in model forwards: ``sequences`` = pairs + one no-example pass per target."""

    pairs: int
    sequences: int
    tokens: int
    exact: bool = True


@dataclass
class UtilityMatrix:
    """UF for ``n_targets`` rows and ``n_columns`` candidates.

    Dense: ``values`` is (n_targets, n_columns) and ``columns`` is None. Sparse: ``values`` and ``columns``
    are (n_targets, k); row i holds UF[i, columns[i, m]] = values[i, m], every other entry is 0.
    """

    values: np.ndarray
    columns: np.ndarray | None
    n_columns: int
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def sparse(self) -> bool:
        return self.columns is not None

    def scaled(self) -> UtilityMatrix:
        """Min-max scaled to [0, 1] over the computed entries (see the module docstring for the zeros)."""
        lo, hi = float(self.values.min()), float(self.values.max())
        if hi > lo:
            values = (self.values - lo) / (hi - lo)
        else:  # no spread: every computed pair is equally useful, uncomputed ones still count as less
            values = np.ones_like(self.values)
        return UtilityMatrix(values.astype(np.float32), self.columns, self.n_columns, dict(self.stats))

    def to_dense(self) -> np.ndarray:
        if self.columns is None:
            return self.values
        dense = np.zeros((self.values.shape[0], self.n_columns), dtype=self.values.dtype)
        np.put_along_axis(dense, self.columns, self.values, axis=1)
        return dense

    def to_torch(self) -> torch.Tensor:
        """A dense tensor, or a sparse COO tensor holding the k stored entries of each row."""
        if self.columns is None:
            return torch.from_numpy(np.ascontiguousarray(self.values))
        n, k = self.columns.shape
        indices = torch.from_numpy(np.stack([np.repeat(np.arange(n), k), self.columns.reshape(-1)]))
        return torch.sparse_coo_tensor(indices, torch.from_numpy(self.values.reshape(-1)),
                                       size=(n, self.n_columns), check_invariants=True).coalesce()


class _Pieces:
    """A prompt template inside the chat template, as token lists around its fields.

    The sequence is ``lit[0] + field[0] + lit[1] + ... + field[-1] + lit[-1]`` where the last field is the
    answer y_i and ``lit[-1]`` closes the assistant turn; the scored tokens are the answer and that closer.
    Spaces that end a literal ("Query: {query}") are moved to the front of the next field's text, because
    byte-level BPE attaches a leading space to the word after it: so pieces tokenise as the whole text does.
    """

    def __init__(self, tokenizer, template: str):
        user, answer = "\x00USER\x00", "\x00ANSWER\x00"
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], tokenize=False)
        pre, rest = rendered.split(user)
        mid, post = rest.split(answer)
        parsed = list(string.Formatter().parse(template))
        literals = [lit for lit, _, _, _ in parsed]
        self.fields = [name for _, name, _, _ in parsed if name is not None] + [_ANSWER]
        if len(literals) == len(self.fields) - 1:  # the template ends with a field: empty closing literal
            literals.append("")
        literals[0] = pre + literals[0]
        literals[-1] = literals[-1] + mid
        literals.append(post)
        self.leads: dict[str, str] = {}
        for f, name in enumerate(self.fields):
            kept = literals[f].rstrip(" ")
            self.leads[name], literals[f] = literals[f][len(kept):], kept
        self.literals = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in literals]
        self.fixed_tokens = sum(len(lit) for lit in self.literals)
        self.scored_tail = len(self.literals[-1])

    def build(self, values: dict[str, list[int]]) -> list[int]:
        ids = list(self.literals[0])
        for name, lit in zip(self.fields, self.literals[1:]):
            ids += values[name]
            ids += lit
        return ids


class InContextUtility:
    """Computes UF (module docstring) for a model; one instance per model, reusable across example lists.

    ``model`` may be None for :meth:`count_tokens`, which needs only the tokenizer.

    ``max_text_tokens`` clips every prompt and response to its first tokens (the in-context example costs
    as much as the target, so one long row would otherwise dominate a dense kernel's n^2 pairs).
    ``batch_tokens`` bounds padded tokens per forward; ``block_pairs`` the pairs per stored block.
    ``cache``: True for the feature store under the slimtune cache, a folder for a store root elsewhere, or
    False to keep nothing.
    """

    def __init__(self, model, tokenizer, *, distance: str = "euclidean", max_text_tokens: int | None = 256,
                 batch_tokens: int = 8192, block_pairs: int = 2048, cache: bool | str | os.PathLike = True,
                 head_chunk: int = 1024):
        if distance not in DISTANCES:
            raise ValueError(f"unknown distance '{distance}'; known: {', '.join(DISTANCES)}")
        self.model, self.tokenizer = model, tokenizer
        self.distance, self.max_text_tokens = distance, max_text_tokens
        self.batch_tokens, self.block_pairs, self.head_chunk = batch_tokens, block_pairs, head_chunk
        self.cache = cache
        self.no_example = _Pieces(tokenizer, TEMPLATE_NO_EXAMPLE)
        self.with_example = _Pieces(tokenizer, TEMPLATE_WITH_EXAMPLE)
        self._token_memo: dict[tuple[str, str], list[int]] = {}

    # ---- tokens -------------------------------------------------------------------------------------
    def _field(self, pieces: _Pieces, name: str, text: str) -> list[int]:
        """A field's token ids, clipped; memoised by text, so a pool and its targets are tokenised once."""
        lead = pieces.leads[name]
        key = (lead, text)
        if key not in self._token_memo:
            self._token_memo[key] = self.tokenizer(lead + text, add_special_tokens=False)["input_ids"][
                : self.max_text_tokens]
        return self._token_memo[key]

    def _fields(self, pieces: _Pieces, target: Example, context: Example | None) -> dict[str, list[int]]:
        texts = {"query": target.prompt_text, _ANSWER: target.response}
        if context is not None:
            texts |= {"example_prompt": context.prompt_text, "example_response": context.response}
        return {name: self._field(pieces, name, texts[name]) for name in pieces.fields}

    def _sequence(self, target: Example, context: Example | None) -> tuple[list[int], int]:
        """Token ids of one forward and the number of scored tokens at its end."""
        pieces = self.no_example if context is None else self.with_example
        fields = self._fields(pieces, target, context)
        return pieces.build(fields), len(fields[_ANSWER]) + pieces.scored_tail

    def count_tokens(self, targets: Sequence[Example], contexts: Sequence[Example] | None = None, *,
                     neighbours: np.ndarray | None = None, k: int | None = None) -> TokenCount:
        """Model tokens the kernel would push through forwards, without running the model.

        Exact for the dense kernel and for given ``neighbours``. With only ``k`` (the neighbours are not known
        before embedding), each target's own tokens are exact and its k contexts are counted at the mean
        context length, so ``exact`` is False unless every context has the same length.
        """
        contexts = targets if contexts is None else contexts

        def lengths(pieces: _Pieces, examples: Sequence[Example], fields: tuple[str, ...]) -> np.ndarray:
            return np.array([sum(len(f) for name, f in self._fields(pieces, ex, ex).items() if name in fields)
                             for ex in examples], dtype=np.int64)

        alone = lengths(self.no_example, targets, ("query", _ANSWER))
        as_target = lengths(self.with_example, targets, ("query", _ANSWER))
        as_context = lengths(self.with_example, contexts, ("example_prompt", "example_response"))
        if neighbours is not None:
            width = neighbours.shape[1]
            context_tokens, exact = int(as_context[neighbours].sum()), True
        elif k is not None and k < len(contexts):
            width = k
            context_tokens = round(len(targets) * k * float(as_context.mean()))
            exact = bool((as_context == as_context[0]).all())
        else:
            width = len(contexts)
            context_tokens, exact = len(targets) * int(as_context.sum()), True
        pairs = len(targets) * width
        tokens = (int(alone.sum()) + len(targets) * self.no_example.fixed_tokens
                  + pairs * self.with_example.fixed_tokens + width * int(as_target.sum()) + context_tokens)
        return TokenCount(pairs=pairs, sequences=pairs + len(targets), tokens=tokens, exact=exact)

    # ---- the model ----------------------------------------------------------------------------------
    @functools.cached_property
    def _head_only(self) -> bool:
        """Whether decoder -> LM head reproduces the model's logits (no soft-capping or scaling after the
        head), so the head may run on response positions only; checked once on a short sequence."""
        decoder, head = self.model.get_decoder(), self.model.get_output_embeddings()
        if decoder is None or head is None:
            return False
        ids = torch.tensor([self.no_example.literals[0][:8]], device=self.model.device)
        with torch.no_grad():
            full = self.model(input_ids=ids).logits
            fast = head(decoder(input_ids=ids).last_hidden_state)
        return bool(torch.allclose(full.float(), fast.float(), rtol=1e-3, atol=1e-3))

    @torch.no_grad()
    def _distances(self, sequences: list[tuple[list[int], int]]) -> tuple[np.ndarray, int, int]:
        """d(i | c) for every (ids, n_scored) sequence; also the real and the padded tokens run."""
        out = np.empty(len(sequences), dtype=np.float64)
        real = padded = 0
        # full logits are batch x length x vocabulary floats: keep such batches as small as a head chunk
        budget = self.batch_tokens if self._head_only else min(self.batch_tokens, self.head_chunk)
        for rows in _length_batches([len(ids) for ids, _ in sequences], budget):
            longest = len(sequences[rows[0]][0])
            out[rows] = self._batch_distances([sequences[r] for r in rows], longest)
            real += sum(len(sequences[r][0]) for r in rows)
            padded += len(rows) * longest
        return out, real, padded

    def _batch_distances(self, batch: list[tuple[list[int], int]], longest: int) -> np.ndarray:
        device = self.model.device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(batch), longest), pad, dtype=torch.long)
        attention = torch.zeros((len(batch), longest), dtype=torch.long)
        rows, positions, row_of_token = [], [], []
        for b, (ids, n_scored) in enumerate(batch):
            input_ids[b, : len(ids)] = torch.tensor(ids)
            attention[b, : len(ids)] = 1
            # position t predicts token t + 1: the scored tokens are the last n_scored of the row
            pos = torch.arange(len(ids) - n_scored - 1, len(ids) - 1)
            positions.append(pos)
            rows.append(torch.full_like(pos, b))
            row_of_token.append(torch.full((n_scored,), b))
        rows_t, pos_t = torch.cat(rows).to(device), torch.cat(positions).to(device)
        labels = input_ids.to(device)[rows_t, pos_t + 1]
        input_ids, attention = input_ids.to(device), attention.to(device)
        if self._head_only:
            hidden = self.model.get_decoder()(input_ids=input_ids, attention_mask=attention,
                                              use_cache=False).last_hidden_state[rows_t, pos_t]
            head = self.model.get_output_embeddings()
        else:
            hidden = self.model(input_ids=input_ids, attention_mask=attention,
                                use_cache=False).logits[rows_t, pos_t]
            head = torch.nn.Identity()
        logp = torch.cat([self._log_prob(head(hidden[s: s + self.head_chunk]), labels[s: s + self.head_chunk])
                          for s in range(0, len(labels), self.head_chunk)])
        owner = torch.cat(row_of_token).to(device)
        counts = torch.bincount(owner, minlength=len(batch)).double()
        if self.distance == "euclidean":
            per_row = torch.zeros(len(batch), dtype=torch.float64, device=device).index_add_(
                0, owner, (1.0 - logp.exp()) ** 2)
            return (per_row.sqrt() / counts.sqrt()).cpu().numpy()
        per_row = torch.zeros(len(batch), dtype=torch.float64, device=device).index_add_(0, owner, -logp)
        return (per_row / counts).cpu().numpy()

    @staticmethod
    def _log_prob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels[:, None])[:, 0].double()

    def fingerprint(self) -> str:
        """The model's identity for cache keys: its name, dtype and a checksum of a few weights, so a model
        changed in memory (fine-tuned, merged adapter) never reads another's blocks."""
        h = hashlib.sha256(str(getattr(self.model, "name_or_path", type(self.model).__name__)).encode())
        params = list(self.model.parameters())
        h.update(str((len(params), sum(p.numel() for p in params), params[0].dtype)).encode())
        for p in (params[0], params[len(params) // 2], params[-1]):
            h.update(p.detach().reshape(-1)[:4096].float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    # ---- the kernel ---------------------------------------------------------------------------------
    def kernel(self, targets: Sequence[Example], contexts: Sequence[Example] | None = None, *,
               neighbours: np.ndarray | None = None,
               on_block: Callable[[int, int], None] | None = None) -> UtilityMatrix:
        """Raw UF (unscaled; call ``.scaled()``) of ``targets`` (rows) by ``contexts`` (columns, default the
        targets themselves). ``neighbours`` (n_targets, k) int: score only those columns (sparse mode).
        ``on_block(lo, hi)`` is called when the block of target rows lo..hi has been computed, before it is
        stored (a progress hook; an exception there loses only that block)."""
        contexts = targets if contexts is None else contexts
        if neighbours is not None:
            neighbours = np.asarray(neighbours, dtype=np.int64)
            if neighbours.ndim != 2 or neighbours.shape[0] != len(targets):
                raise ValueError("neighbours must have one row of column indices per target")
        width = len(contexts) if neighbours is None else neighbours.shape[1]
        rows_per_block = max(1, self.block_pairs // max(width, 1))
        stats = {"pairs_scored": 0, "model_tokens": 0, "padded_tokens": 0, "forward_sequences": 0}

        def compute(lo: int, hi: int) -> dict[str, np.ndarray]:
            cols = [range(width) if neighbours is None else neighbours[i] for i in range(lo, hi)]
            # the no-example pass of each target runs once, alongside its pairs
            seqs = [self._sequence(targets[i], None) for i in range(lo, hi)]
            seqs += [self._sequence(targets[i], contexts[j])
                     for i, row in zip(range(lo, hi), cols) for j in row]
            d, real, padded = self._distances(seqs)
            n = hi - lo
            stats["pairs_scored"] += n * width
            stats["forward_sequences"] += len(seqs)
            stats["model_tokens"] += real
            stats["padded_tokens"] += padded
            if on_block is not None:
                on_block(lo, hi)
            return {"utility": d[:n, None] - d[n:].reshape(n, width)}

        start = time.perf_counter()
        with self._store(targets, contexts, neighbours, rows_per_block) as store:
            shards = store.fill(["utility"], len(targets), rows_per_block, compute)
            values = np.asarray(store.open("utility", len(targets)))
        stats |= {"seconds": time.perf_counter() - start, "blocks": shards["computed"] + shards["reused"],
                  "blocks_from_cache": shards["reused"], "head_on_response_only": self._head_only}
        return UtilityMatrix(values, neighbours, len(contexts), stats)

    @contextlib.contextmanager
    def _store(self, targets, contexts, neighbours, rows_per_block) -> Iterator[FeatureStore]:
        """The feature store for this kernel: keyed by everything its values depend on; with ``cache=False``
        a temporary one, gone when the kernel is read."""
        if self.cache is False:
            with tempfile.TemporaryDirectory(prefix="slimtune-delift-") as tmp:
                yield FeatureStore(tmp)
            return
        key = {"kind": "delift-kernel", "version": _FORMAT_VERSION, "targets": pool_hash(list(targets)),
               "contexts": pool_hash(list(contexts)),
               "neighbours": None if neighbours is None else hashlib.sha256(neighbours.tobytes()).hexdigest(),
               "model": self.fingerprint(), "distance": self.distance,
               "max_text_tokens": self.max_text_tokens, "rows_per_block": rows_per_block}
        yield FeatureStore.keyed(key, None if self.cache is True else self.cache)


def _length_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices grouped longest first (an out-of-memory error shows at the first batch, and rows of a batch
    have similar lengths) so that rows * longest row <= budget; a row alone may exceed the budget."""
    batches: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= budget:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches
