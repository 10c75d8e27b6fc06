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
- prefix reuse: a pair's sequence is a prefix that depends only on the in-context example j (system prompt,
  instruction, x_j, y_j) and a suffix that depends only on the target i (x_i, y_i). Pairs are processed
  context by context: the prefix runs once, its key/value cache is shared by every target's suffix, so a
  pair costs the suffix's tokens instead of the whole sequence's (about a third for short rows). The
  no-example pass shares its template prefix the same way. A model for which a cached prefix does not
  reproduce the plain forward is detected once and run on whole sequences;
- suffixes are sorted by length and batched under a token budget, which keeps padding small;
- the no-example pass runs once per target, stored apart from the pairs: a pool's pool kernel and its kernel
  against a task's examples (FLMI, FLCG) share it;
- the decoder's hidden states go through the LM head only at the positions that predict response tokens
  (with a 49k vocabulary the head costs more than the 135M-parameter body for short rows); a model whose
  logits are more than head(hidden) (soft-capping, scaling) is detected once and gets full logits instead,
  in batches of at most ``head_chunk`` tokens;
- sparse mode scores each target only against given neighbour columns (the k nearest candidates by sentence
  embedding): n * k pairs instead of n^2.

Pairs are ordered context by context and computed in blocks of ``block_pairs``, each written atomically to the
feature store (:mod:`slimtune.features.store`) under a key made of the two example lists, the neighbours, the
model's identity and the settings: a killed run resumes at the first missing block, and under ``torchrun``
each rank computes its share of the blocks.

Scaling: the authors min-max scale the whole kernel to [0, 1] (:meth:`UtilityMatrix.scaled`). Two rules of
ours, both so that a scaled entry still means what its utility means:
- a pair never computed (sparse mode) means "no effect": utility 0, the value it would have in the dense
  kernel if the example did nothing for the target. It scales like every other 0 and enters the range,
  so a harmful neighbour (negative utility) scales *below* a pair never computed, and facility location is
  not rewarded for covering a target through it. The scaled kernel of a sparse matrix is exactly the scaled
  kernel of its dense form with zeros in the gaps; the scaled value of a missing entry is carried as
  ``background`` (what :mod:`slimtune.select.submodular` reads for a sparse kernel's missing entries).
- self-pairs (the target shown as its own example: the same prompt and response, usually the diagonal)
  are left out of the minimum and maximum and clipped to 1. Copying the answer verbatim makes their
  utility several times that of any real pair; in the range, it would squeeze every real pair into a
  narrow band near the scaled 0. Clipped to 1, a row is still represented best by itself.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import string
import tempfile
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from slimtune.data.example import Example, pool_hash
from slimtune.features.losses import length_batches
from slimtune.features.store import FeatureStore

TEMPLATE_NO_EXAMPLE = "Instruction: Please generate a response to the following query.\n\n\nQuery: {query}\n"
TEMPLATE_WITH_EXAMPLE = (
    "Instruction:\nUse the following example as a guide to answer the query in the same format and style, "
    "providing a clear and concise response.\n\n\nExample:\n{example_prompt}\n{example_response}"
    "\n\n\nQuery:\n{query}\n"
)
DISTANCES = ("euclidean", "kl")
#: Bumped whenever the meaning of a cached block changes, so old blocks are never read as new ones.
_FORMAT_VERSION = 2
_ANSWER = "answer"


@dataclass
class TokenCount:
    """What a kernel costs in model forwards: ``pairs`` (one suffix each), ``sequences`` (suffixes run: the
    pairs plus one no-example pass per target), ``prefixes`` (shared prefixes run once for many suffixes;
    0 without prefix reuse, where every sequence is whole) and ``tokens`` (all of them)."""

    pairs: int
    sequences: int
    prefixes: int
    tokens: int
    exact: bool = True


@dataclass
class UtilityMatrix:
    """UF for ``n_targets`` rows and ``n_columns`` candidates.

    Dense: ``values`` is (n_targets, n_columns) and ``columns`` is None. Sparse: ``values`` and ``columns``
    are (n_targets, k); row i holds UF[i, columns[i, m]] = values[i, m], every other entry is ``background``
    (0, "no effect", before scaling). ``self_pairs`` (the shape of ``values``) marks the stored entries whose
    context is the target itself, which scaling leaves out of its range (module docstring).
    """

    values: np.ndarray
    columns: np.ndarray | None
    n_columns: int
    stats: dict[str, Any] = field(default_factory=dict)
    self_pairs: np.ndarray | None = None
    background: float = 0.0

    @property
    def sparse(self) -> bool:
        return self.columns is not None

    def _has_missing(self) -> bool:
        """Whether some row of a sparse matrix does not store every column."""
        if self.columns is None:
            return False
        distinct = (np.diff(np.sort(self.columns, axis=1), axis=1) != 0).sum(1) + (self.columns.shape[1] > 0)
        return bool((distinct < self.n_columns).any())

    def scaled(self) -> UtilityMatrix:
        """Min-max scaled to [0, 1], the range taken over every entry of the dense form (missing ones are
        ``background``) except the self-pairs, which are clipped into [0, 1] (module docstring)."""
        ranged = self.values if self.self_pairs is None else self.values[~self.self_pairs]
        missing = self._has_missing()
        if missing:
            ranged = np.append(ranged, self.background)
        lo, hi = (float(ranged.min()), float(ranged.max())) if ranged.size else (0.0, 0.0)
        if hi > lo:
            values = np.clip((self.values - lo) / (hi - lo), 0.0, 1.0)
            background = (self.background - lo) / (hi - lo) if missing else 0.0  # 0: nothing is missing
        else:  # no spread: every pair is equally useful
            values, background = np.ones_like(self.values), 1.0 if missing else 0.0
        return UtilityMatrix(values.astype(np.float32), self.columns, self.n_columns, dict(self.stats),
                             self.self_pairs, float(background))

    def to_dense(self) -> np.ndarray:
        if self.columns is None:
            return self.values
        dense = np.full((self.values.shape[0], self.n_columns), self.background, dtype=self.values.dtype)
        np.put_along_axis(dense, self.columns, self.values, axis=1)
        return dense

    def to_torch(self) -> torch.Tensor:
        """A dense tensor, or a sparse COO tensor holding the k stored entries of each row (the others are
        ``background``, which the tensor does not carry)."""
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
    It splits into a *prefix*, everything before the target's query (the in-context example's fields and
    the template around them), and a *suffix*, the query onwards. Spaces that end a literal ("Query:
    {query}") are moved to the front of the next field's text, because byte-level BPE attaches a leading
    space to the word after it: so pieces tokenise as the whole text does.
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
        self.split = self.fields.index("query")
        self.prefix_fixed = sum(len(lit) for lit in self.literals[: self.split + 1])
        self.suffix_fixed = sum(len(lit) for lit in self.literals[self.split + 1:])
        self.scored_tail = len(self.literals[-1])

    def build(self, values: dict[str, list[int]]) -> tuple[list[int], list[int]]:
        """(prefix, suffix) token ids."""
        prefix = list(self.literals[0])
        for name, lit in zip(self.fields[: self.split], self.literals[1:]):
            prefix += values[name] + lit
        suffix: list[int] = []
        for name, lit in zip(self.fields[self.split:], self.literals[self.split + 1:]):
            suffix += values[name] + lit
        return prefix, suffix


#: A prefix's keys and values, one (keys, values) pair per layer, each (1, heads, prefix length, head dim).
_State = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class _Group:
    """Sequences sharing one prefix: ``suffixes[s]`` ends with ``scored[s]`` scored tokens."""

    prefix: list[int]
    suffixes: list[list[int]]
    scored: list[int]


class InContextUtility:
    """Computes UF (module docstring) for a model; one instance per model, reusable across example lists.

    ``model`` may be None for :meth:`count_tokens`, which needs only the tokenizer.

    ``max_text_tokens`` clips every prompt and response to its first tokens (the in-context example costs
    as much as the target, so one long row would otherwise dominate a dense kernel's n^2 pairs).
    ``batch_tokens`` bounds the tokens a forward attends over (rows x (prefix + longest suffix));
    ``block_pairs`` is the number of pairs per stored block; ``prefix_reuse`` shares each in-context
    example's key/value cache across its targets. ``cache``: True for the feature store under the slimtune
    cache, a folder for a store root elsewhere, or False to keep nothing.
    """

    def __init__(self, model, tokenizer, *, distance: str = "euclidean", max_text_tokens: int | None = 256,
                 batch_tokens: int = 8192, block_pairs: int = 4096, prefix_reuse: bool = True,
                 cache: bool | str | os.PathLike = True, head_chunk: int = 1024):
        if distance not in DISTANCES:
            raise ValueError(f"unknown distance '{distance}'; known: {', '.join(DISTANCES)}")
        self.model, self.tokenizer = model, tokenizer
        self.distance, self.max_text_tokens = distance, max_text_tokens
        self.batch_tokens, self.block_pairs, self.head_chunk = batch_tokens, block_pairs, head_chunk
        self.prefix_reuse, self.cache = prefix_reuse, cache
        self.no_example = _Pieces(tokenizer, TEMPLATE_NO_EXAMPLE)
        self.with_example = _Pieces(tokenizer, TEMPLATE_WITH_EXAMPLE)
        self._token_memo: dict[tuple[str, str], array] = {}

    # ---- tokens -------------------------------------------------------------------------------------
    def _field(self, pieces: _Pieces, name: str, text: str) -> list[int]:
        """A field's token ids, clipped; memoised by text, so a pool and its targets are tokenised once. The memo
        holds every row's fields for the whole run, so it keeps them as int32 arrays: as lists of Python ints
        they cost about 2.3 KB a row (2.3 GB at a million rows)."""
        lead = pieces.leads[name]
        key = (lead, text)
        if key not in self._token_memo:
            self._token_memo[key] = array("i", self.tokenizer(lead + text, add_special_tokens=False)["input_ids"][
                : self.max_text_tokens])
        return self._token_memo[key].tolist()

    def _fields(self, pieces: _Pieces, target: Example, context: Example | None) -> dict[str, list[int]]:
        texts = {"query": target.prompt_text, _ANSWER: target.response}
        if context is not None:
            texts |= {"example_prompt": context.prompt_text, "example_response": context.response}
        return {name: self._field(pieces, name, texts[name]) for name in pieces.fields}

    def _sequence(self, target: Example, context: Example | None) -> tuple[list[int], list[int], int]:
        """(prefix, suffix, number of scored tokens at the suffix's end) of one forward."""
        pieces = self.no_example if context is None else self.with_example
        fields = self._fields(pieces, target, context)
        prefix, suffix = pieces.build(fields)
        return prefix, suffix, len(fields[_ANSWER]) + pieces.scored_tail

    def _lengths(self, pieces: _Pieces, examples: Sequence[Example], part: str) -> np.ndarray:
        """Prefix lengths (``part="prefix"``: each example in context) or suffix lengths (as the target)."""
        fields = pieces.fields[: pieces.split] if part == "prefix" else pieces.fields[pieces.split:]
        fixed = pieces.prefix_fixed if part == "prefix" else pieces.suffix_fixed
        return np.array([fixed + sum(len(self._fields(pieces, ex, ex)[name]) for name in fields)
                         for ex in examples], dtype=np.int64)

    def count_tokens(self, targets: Sequence[Example], contexts: Sequence[Example] | None = None, *,
                     neighbours: np.ndarray | None = None, k: int | None = None) -> TokenCount:
        """Model tokens the kernel would push through forwards, without running the model.

        Exact for the dense kernel and for given ``neighbours`` (it replays the blocks and prefix groups of
        :meth:`kernel`). With only ``k`` (neighbours are not known before embedding) the suffixes are exact
        and the shared prefixes are estimated as if the k contexts of each target were drawn at random.
        """
        contexts = targets if contexts is None else contexts
        n_t, n_c = len(targets), len(contexts)
        alone = self._lengths(self.no_example, targets, "suffix")
        as_target = self._lengths(self.with_example, targets, "suffix")
        as_context = self._lengths(self.with_example, contexts, "prefix")
        if neighbours is not None:
            width = neighbours.shape[1]
        else:
            width = n_c if k is None else min(k, n_c)
        pairs = n_t * width
        # a prefix (the template's, or an in-context example with the template) runs once per block and
        # context when shared, else inside every sequence
        alone_prefixes = -(-n_t // self.block_pairs) if self.prefix_reuse else n_t
        if neighbours is not None or width == n_c:
            pair_context = _Pairs(n_t, n_c, neighbours).block(0, pairs)[1]
            if self.prefix_reuse:
                pair_context = np.unique(np.arange(pairs) // self.block_pairs * n_c + pair_context) % n_c
            prefix_runs, prefix_tokens, exact = len(pair_context), int(as_context[pair_context].sum()), True
        else:
            per_block = min(self.block_pairs, pairs)
            distinct = n_c * (1 - (1 - 1 / n_c) ** per_block) if self.prefix_reuse else per_block
            prefix_runs = round(distinct * pairs / per_block)
            prefix_tokens, exact = round(prefix_runs * float(as_context.mean())), False
        tokens = (int(alone.sum()) + alone_prefixes * self.no_example.prefix_fixed
                  + width * int(as_target.sum()) + prefix_tokens)
        return TokenCount(pairs=pairs, sequences=pairs + n_t,
                          prefixes=prefix_runs + alone_prefixes if self.prefix_reuse else 0,
                          tokens=tokens, exact=exact)

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

    @functools.cached_property
    def _reuse(self) -> bool:
        """Whether cached prefixes give the same token log-probabilities as whole sequences (models without
        a standard key/value cache or ``position_ids`` do not); checked once, on two rows of the template's
        own tokens whose prefixes differ in length."""
        if not self.prefix_reuse:
            return False
        prefixes = [self.no_example.literals[0][:6], self.with_example.literals[0][:4]]
        suffixes, scored = [self.with_example.literals[0][4:10], self.no_example.literals[0][6:10]], [3, 2]
        try:
            with torch.no_grad():
                shared = self._log_probs(self._prefix_states(prefixes), suffixes, scored)[0]
                whole = self._log_probs(None, [p + s for p, s in zip(prefixes, suffixes)], scored)[0]
        except (TypeError, ValueError, RuntimeError, AttributeError):
            return False
        return bool(torch.allclose(shared, whole, rtol=1e-3, atol=1e-3))

    @torch.no_grad()
    def _distances(self, groups: list[_Group]) -> tuple[np.ndarray, dict[str, int]]:
        """d(i | c) for every suffix of every group, in order; and the tokens run (real and padded).

        Groups go a chunk at a time (at most ``batch_tokens`` prefix tokens, which bounds the prefix states
        held): the chunk's prefixes run batched, then all its suffixes run in length-sorted batches that mix
        groups, each row on its own prefix's keys and values."""
        if not self._reuse:  # whole sequences, batched across groups
            groups = [_Group([], [g.prefix + s for g in groups for s in g.suffixes],
                             [n for g in groups for n in g.scored])]
        # full logits are batch x length x vocabulary floats: keep such batches as small as a head chunk
        budget = self.batch_tokens if self._head_only else min(self.batch_tokens, self.head_chunk)
        out = [np.empty(len(g.suffixes)) for g in groups]
        spent = {"model_tokens": 0, "padded_tokens": 0, "prefixes": 0}
        for chunk in _chunks([len(g.prefix) for g in groups], budget):
            states: dict[int, list] = {}
            for batch in (length_batches([len(groups[g].prefix) for g in chunk], budget)
                          if groups[chunk[0]].prefix else []):
                prefixes = [groups[chunk[b]].prefix for b in batch]
                states |= dict(zip((chunk[b] for b in batch), self._prefix_states(prefixes)))
                spent["prefixes"] += len(batch)
                spent["model_tokens"] += sum(map(len, prefixes))
                spent["padded_tokens"] += len(batch) * len(prefixes[0])
            rows = [(g, s) for g in chunk for s in range(len(groups[g].suffixes))]
            total = [len(groups[g].prefix) + len(groups[g].suffixes[s]) for g, s in rows]
            for batch in length_batches(total, budget):
                picked = [rows[b] for b in batch]
                suffixes = [groups[g].suffixes[s] for g, s in picked]
                logp, owner = self._log_probs([states[g] for g, _ in picked] if states else None, suffixes,
                                              [groups[g].scored[s] for g, s in picked])
                for (g, s), d in zip(picked, self._distance(logp, owner, len(picked))):
                    out[g][s] = d
                spent["model_tokens"] += sum(map(len, suffixes))
                spent["padded_tokens"] += len(suffixes) * max(map(len, suffixes))
        return np.concatenate(out), spent

    def _prefix_states(self, prefixes: list[list[int]]) -> list[_State]:
        """Each prefix's per-layer (keys, values), from one right-padded forward (causal attention: padding
        after a row's last token never reaches its states)."""
        device, longest = self.model.device, max(map(len, prefixes))
        input_ids = torch.zeros((len(prefixes), longest), dtype=torch.long)
        attention = torch.zeros((len(prefixes), longest), dtype=torch.long)
        for b, ids in enumerate(prefixes):
            input_ids[b, : len(ids)] = torch.tensor(ids)
            attention[b, : len(ids)] = 1
        cache = self.model.get_decoder()(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                         use_cache=True).past_key_values
        return [[(layer.keys[b: b + 1, :, : len(ids)], layer.values[b: b + 1, :, : len(ids)])
                 for layer in cache.layers] for b, ids in enumerate(prefixes)]

    def _log_probs(self, states: list[_State] | None, suffixes: list[list[int]],
                   scored: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """log p of every scored token, and the row each belongs to; position t of a suffix predicts its
        token t + 1. With ``states``, row b continues the prefix whose keys and values are ``states[b]``:
        prefixes are left-padded to a common length (masked out; their rotary positions are already in
        the keys), suffixes right-padded after them, and each suffix's positions continue its own prefix."""
        from transformers import DynamicCache

        device, n = self.model.device, len(suffixes)
        kept = [0] * n if states is None else [state[0][0].shape[-2] for state in states]
        p, longest = max(kept), max(map(len, suffixes))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((n, longest), pad, dtype=torch.long)
        attention = torch.zeros((n, p + longest), dtype=torch.long)
        rows, positions = [], []
        for b, (ids, n_scored) in enumerate(zip(suffixes, scored)):
            if n_scored >= len(ids):
                raise ValueError("the scored tokens must follow at least one suffix token")
            input_ids[b, : len(ids)] = torch.tensor(ids)
            attention[b, p - kept[b]: p + len(ids)] = 1
            pos = torch.arange(len(ids) - n_scored - 1, len(ids) - 1)
            positions.append(pos)
            rows.append(torch.full_like(pos, b))
        rows_t, pos_t = torch.cat(rows).to(device), torch.cat(positions).to(device)
        input_ids, attention = input_ids.to(device), attention.to(device)
        labels = input_ids[rows_t, pos_t + 1]
        kwargs = {"input_ids": input_ids, "attention_mask": attention, "use_cache": states is not None}
        if states is not None:
            def left_padded(tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
                return torch.cat([F.pad(t, (0, 0, p - t.shape[-2], 0)) for t in tensors])

            kwargs["past_key_values"] = DynamicCache(ddp_cache_data=[
                (left_padded(keys), left_padded(values))
                for keys, values in (zip(*layer) for layer in zip(*states))])  # per layer, every row's
            kwargs["position_ids"] = (torch.tensor(kept, device=device)[:, None]
                                      + torch.arange(longest, device=device))
        if self._head_only:
            hidden = self.model.get_decoder()(**kwargs).last_hidden_state[rows_t, pos_t]
            head = self.model.get_output_embeddings()
        else:
            hidden, head = self.model(**kwargs).logits[rows_t, pos_t], torch.nn.Identity()
        logp = torch.cat([
            torch.log_softmax(head(hidden[s: s + self.head_chunk]).float(), dim=-1)
            .gather(-1, labels[s: s + self.head_chunk, None])[:, 0]
            for s in range(0, len(labels), self.head_chunk)])
        return logp.double(), rows_t

    def _distance(self, logp: torch.Tensor, owner: torch.Tensor, n_rows: int) -> np.ndarray:
        counts = torch.bincount(owner, minlength=n_rows).double()
        total = torch.zeros(n_rows, dtype=torch.float64, device=logp.device)
        if self.distance == "euclidean":
            return (total.index_add_(0, owner, (1.0 - logp.exp()) ** 2).sqrt() / counts.sqrt()).cpu().numpy()
        return (total.index_add_(0, owner, -logp) / counts).cpu().numpy()

    def fingerprint(self) -> str:
        """The model's identity for cache keys (:func:`slimtune.models.weights_fingerprint`)."""
        from slimtune.models import weights_fingerprint

        return weights_fingerprint(self.model)

    # ---- the kernel ---------------------------------------------------------------------------------
    def kernel(self, targets: Sequence[Example], contexts: Sequence[Example] | None = None, *,
               neighbours: np.ndarray | None = None,
               on_block: Callable[[str, int, int], None] | None = None) -> UtilityMatrix:
        """Raw UF (unscaled; call ``.scaled()``) of ``targets`` (rows) by ``contexts`` (columns, default the
        targets themselves). ``neighbours`` (n_targets, k) int: score only those columns (sparse mode).
        ``on_block(name, lo, hi)`` is called when block lo..hi of array ``name`` ("alone": no-example
        distances by target, "with": pair distances, context by context) has been computed, before it is
        stored (a progress hook; an exception there loses only that block)."""
        contexts = targets if contexts is None else contexts
        if neighbours is not None:
            neighbours = np.asarray(neighbours, dtype=np.int64)
            if neighbours.ndim != 2 or neighbours.shape[0] != len(targets):
                raise ValueError("neighbours must have one row of column indices per target")
        pairs = _Pairs(len(targets), len(contexts), neighbours)
        stats = dict.fromkeys(
            ("pairs_scored", "forward_sequences", "prefixes", "model_tokens", "padded_tokens"), 0)

        def run(name: str, lo: int, hi: int, groups: list[_Group]) -> dict[str, np.ndarray]:
            d, spent = self._distances(groups)
            for key, value in spent.items():
                stats[key] += value
            stats["forward_sequences"] += hi - lo
            if on_block is not None:
                on_block(name, lo, hi)
            return {name: d[:, None]}

        def alone(lo: int, hi: int) -> dict[str, np.ndarray]:
            return run("alone", lo, hi, [_group([self._sequence(targets[i], None) for i in range(lo, hi)])])

        def paired(lo: int, hi: int) -> dict[str, np.ndarray]:
            groups = []
            pair_target, pair_context = pairs.block(lo, hi)
            for j in np.unique(pair_context):  # sorted, and pairs are sorted by context: same order
                groups.append(_group([self._sequence(targets[i], contexts[j])
                                      for i in pair_target[pair_context == j]]))
            stats["pairs_scored"] += hi - lo
            return run("with", lo, hi, groups)

        start = time.perf_counter()
        with self._store(targets, contexts, neighbours) as (alone_store, store):
            done = [alone_store.fill(["alone"], len(targets), self.block_pairs, alone),
                    store.fill(["with"], pairs.n, self.block_pairs, paired)]
            d_alone = np.asarray(alone_store.open("alone", len(targets)))[:, 0]
            d_with = np.asarray(store.open("with", pairs.n))[:, 0]
        values = pairs.kernel(d_alone, d_with)
        target_key, context_key = _content_keys(targets, contexts)
        self_pairs = target_key[:, None] == (context_key[None, :] if neighbours is None
                                             else context_key[neighbours])
        stats |= {"seconds": time.perf_counter() - start, "blocks": sum(sum(d.values()) for d in done),
                  "blocks_from_cache": sum(d["reused"] for d in done),
                  "head_on_response_only": self._head_only, "prefix_reuse": self._reuse}
        return UtilityMatrix(values, neighbours, len(contexts), stats, self_pairs)

    @contextlib.contextmanager
    def _store(self, targets, contexts, neighbours) -> Iterator[tuple[FeatureStore, FeatureStore]]:
        """The feature stores of this kernel, keyed by everything their values depend on: the no-example
        distances by the targets alone (a pool's pool kernel and its kernel against a task's examples share
        them), the pair distances by targets, contexts and neighbours too. With ``cache=False`` temporary
        ones, gone when the kernel is read."""
        if self.cache is False:
            with tempfile.TemporaryDirectory(prefix="slimtune-delift-") as tmp:
                yield FeatureStore(Path(tmp) / "alone"), FeatureStore(Path(tmp) / "with")
            return
        root = None if self.cache is True else self.cache
        alone = {"kind": "delift-alone", "version": _FORMAT_VERSION, "targets": pool_hash(targets),
                 "model": self.fingerprint(), "distance": self.distance,
                 "max_text_tokens": self.max_text_tokens, "block_pairs": self.block_pairs}
        paired = {**alone, "kind": "delift-kernel", "contexts": pool_hash(contexts),
                  "neighbours": None if neighbours is None else hashlib.sha256(neighbours.tobytes()).hexdigest()}
        yield FeatureStore.keyed(alone, root), FeatureStore.keyed(paired, root)


class _Pairs:
    """The (target, context) pairs of a kernel, context by context so that each context's pairs share a
    prefix. Dense pairs are derived block by block from their position (pair p is context p // n_t, target
    p % n_t), never listed all at once: n^2 of them would fill memory before the first block ran."""

    def __init__(self, n_t: int, n_c: int, neighbours: np.ndarray | None):
        self.n_t = n_t
        self.order: np.ndarray | None = None
        if neighbours is None:
            self.n = n_t * n_c
        else:
            target, context = np.repeat(np.arange(n_t), neighbours.shape[1]), neighbours.reshape(-1)
            self.order = np.lexsort((target, context))  # from the kernel's row-major layout to this one
            self.target, self.context = target[self.order], context[self.order]
            self.n = len(self.order)

    def block(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """(targets, contexts) of pairs lo..hi."""
        if self.order is None:
            position = np.arange(lo, hi)
            return position % self.n_t, position // self.n_t
        return self.target[lo:hi], self.context[lo:hi]

    def kernel(self, d_alone: np.ndarray, d_with: np.ndarray) -> np.ndarray:
        """UF in the kernel's row-major layout, from the per-target and per-pair distances."""
        if self.order is None:
            return np.subtract(d_alone[:, None], d_with.reshape(-1, self.n_t).T, order="C")
        values = np.empty(self.n)
        values[self.order] = d_alone[self.target] - d_with
        return values.reshape(self.n_t, -1)


def _content_keys(targets: Sequence[Example], contexts: Sequence[Example]) -> tuple[np.ndarray, np.ndarray]:
    """A 64-bit digest of each row's (prompt, response), so that equal keys mark a self-pair. Digests, not the
    texts, so that a million-row pool holds 8 bytes a row here (a chance collision, about n^2 / 2^65, would
    only clip one pair to 1)."""

    def keys(examples: Sequence[Example]) -> np.ndarray:
        return np.fromiter((int.from_bytes(hashlib.blake2b(f"{ex.prompt_text}\0{ex.response}".encode(),
                                                            digest_size=8).digest(), "little", signed=True)
                            for ex in examples), dtype=np.int64, count=len(examples))

    target_keys = keys(targets)
    return target_keys, target_keys if contexts is targets else keys(contexts)


def _group(sequences: list[tuple[list[int], list[int], int]]) -> _Group:
    """Sequences built with one prefix, as a group."""
    return _Group(sequences[0][0], [suffix for _, suffix, _ in sequences], [n for _, _, n in sequences])


def _chunks(sizes: list[int], budget: int) -> list[list[int]]:
    """Consecutive indices grouped so that each group's sizes sum to at most ``budget`` (or one index)."""
    chunks: list[list[int]] = []
    total = 0
    for index, size in enumerate(sizes):
        if chunks and total + size <= budget:
            chunks[-1].append(index)
            total += size
        else:
            chunks.append([index])
            total = size
    return chunks
