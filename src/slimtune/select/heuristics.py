"""Single-score baselines users compare every method against: random, length, loss / perplexity and IFD.

Length, loss and IFD record the raw quantity (tokens, loss, IFD) as each example's manifest score and return
their own keep order, so ``keep="shortest"`` or ``"lowest"`` needs no negated scores. Rows longer than
``max_length`` lose the start of their prompt, as in training; a row that still cannot be scored gets no
score and goes last (and :meth:`Selector.select` refuses to keep it unless told to).

The response y is an example's last assistant turn and its prompt x is everything before it, as in the
papers' (x, y) notation; earlier assistant turns of a dialogue are context, not scored.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from slimtune.data.example import Example
from slimtune.data.tokenize import IGNORE_INDEX, EncodeStats, encode_example, last_turn_only
from slimtune.features.losses import score_rows
from slimtune.features.store import FeatureStore
from slimtune.select.base import Cost, Selector, StoredFeatures


def _check(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _keep_order(values: np.ndarray, first: str, *, demoted: np.ndarray | None = None) -> list[int]:
    """Pool indices with the ``"highest"`` or ``"lowest"`` values ``first``; ``demoted`` rows come after all
    others (lowest value first), unscored (NaN) rows last. Ties keep pool order."""
    demoted = np.zeros(len(values), dtype=bool) if demoted is None else demoted
    key = np.where(demoted, values, -values if first == "highest" else values)
    group = np.where(np.isnan(values), 2, demoted.astype(int))
    return np.lexsort((np.nan_to_num(key, nan=0.0), group)).tolist()


@dataclass
class RandomSelector(Selector):
    """Uniform random subset: every example gets a seeded uniform score and the top ``k`` are kept.

    The same seed gives the same ranking, so a smaller budget keeps a prefix of a larger one.
    """

    name: ClassVar[str] = "random"
    seed: int = 0

    def score(self, pool, *, target=None, existing=None, cost: Cost) -> np.ndarray:
        return np.random.default_rng(self.seed).random(len(pool))


@dataclass
class DomainOracleSelector(Selector):
    """The "domain oracle" of a targeted benchmark: rows of the target's own task first, then rows of its
    source data set, then the rest, each group in seeded random order. It knows what no real selector is told
    (the pool's ``source`` and ``task`` labels), so its gain over random is the most that knowing the target's
    domain can buy, and a targeted method is judged by the share of that gain it recovers.

    score = 2 [task and source of a target] + 1 [source of a target, task of none] + u,  u ~ U[0, 1) seeded.
    """

    name: ClassVar[str] = "oracle"
    needs_target: ClassVar[bool] = True
    seed: int = 0

    def score(self, pool, *, target=None, existing=None, cost: Cost) -> np.ndarray:
        tasks = {(ex.metadata.get("source"), ex.task) for ex in target}
        sources = {source for source, _ in tasks}
        level = np.array([2.0 if (ex.metadata.get("source"), ex.task) in tasks else
                          1.0 if ex.metadata.get("source") in sources else 0.0 for ex in pool])
        return level + np.random.default_rng(self.seed).random(len(pool))


@dataclass
class LengthSelector(Selector):
    """Keep the longest (or shortest) responses: score = len(y) in the model's tokens or in characters.

    Longest-first is the strong simple baseline of Zhao et al., "Long Is More for Alignment" (ICML 2024).
    ``model`` only supplies the tokenizer for ``unit="tokens"``; no forward pass runs.
    """

    name: ClassVar[str] = "length"
    keep: str = "longest"
    unit: str = "tokens"
    model: str = "smollm2"

    def __post_init__(self):
        _check("keep", self.keep, ("longest", "shortest"))
        _check("unit", self.unit, ("tokens", "chars"))

    def score(self, pool, *, target=None, existing=None, cost: Cost) -> tuple[np.ndarray, list[int]]:
        responses = [ex.response for ex in pool]
        if self.unit == "chars":
            lengths = np.array([len(r) for r in responses], dtype=np.float64)
        else:
            from slimtune.models import load_tokenizer

            ids = load_tokenizer(self.model)(responses, add_special_tokens=False)["input_ids"]
            lengths = np.array([len(row) for row in ids], dtype=np.float64)
        return lengths, _keep_order(lengths, "highest" if self.keep == "longest" else "lowest")


@dataclass
class _ResponseLossSelector(StoredFeatures, Selector):
    """What loss and IFD share: the model, and one batched pass scoring each row's mean response loss.

    Losses are computed ``shard_rows`` rows at a time through a keyed feature store (:class:`StoredFeatures`):
    under ``accelerate launch`` / ``torchrun`` each process scores its share of the shards and every process
    reads them all, and a repeated or interrupted run reuses the shards already stored.
    """

    model: str = "smollm2"
    batch_size: int = 8
    max_length: int = 512
    shard_rows: int = 1024
    device: str | None = None
    device_map: str | None = None

    def _load(self):
        from slimtune.models import load_model

        return load_model(self.model, device=self.device, device_map=self.device_map)

    def _score_rows(self, model, tokenizer, rows: list[dict[str, list[int]]], cost: Cost) -> np.ndarray:
        """Mean loss over each row's labelled tokens (NaN for rows with none)."""
        losses = np.full(len(rows), np.nan)
        scored = [i for i, r in enumerate(rows) if any(t != IGNORE_INDEX for t in r["labels"])]
        for i in sorted(set(range(len(rows))) - set(scored)):
            cost.unscored[i] = f"no response token within max_length={self.max_length}"
        if not scored:
            return losses
        loss, _ = score_rows(model, [rows[i] for i in scored], pad_token_id=tokenizer.pad_token_id,
                             batch_size=self.batch_size)
        losses[scored] = loss.double().numpy()
        cost.forward_tokens += sum(len(rows[i]["input_ids"]) for i in scored)
        return losses

    def _stored_losses(self, model, tokenizer, named_rows: dict[str, list[dict[str, list[int]]]],
                       cost: Cost) -> dict[str, np.ndarray]:
        """:meth:`_score_rows` of each list of rows (all of one length), shard by shard through the store."""
        from slimtune.models import weights_fingerprint

        n = len(next(iter(named_rows.values())))
        key = {"kind": "response-losses", "version": 1, "model": weights_fingerprint(model),
               "rows": _rows_digest(named_rows), "batch_size": self.batch_size, "shard_rows": self.shard_rows}
        with FeatureStore.cached(key, self._store_root()) as store:
            store.fill(list(named_rows), n, self.shard_rows, lambda lo, hi: {
                name: self._score_rows(model, tokenizer, rows[lo:hi], cost)[:, None]
                for name, rows in named_rows.items()})
            return {name: np.asarray(store.open(name, n))[:, 0] for name in named_rows}

    def _conditioned_rows(self, pool: Sequence[Example], tokenizer, cost: Cost) -> list[dict[str, list[int]]]:
        """Each example as trained (chat template, cut from the left to ``max_length``), labels on y only."""
        stats = EncodeStats()
        rows = [encode_example(ex, tokenizer, self.max_length, stats) for ex in pool]
        cost.details["encode"] = stats.summary()
        return [{"input_ids": row["input_ids"], "labels": last_turn_only(row["labels"])} for row in rows]


@dataclass
class LossSelector(_ResponseLossSelector):
    """Keep the examples the model finds hardest (or easiest): score = the mean cross-entropy of y given x
    under ``model``, L(y | x) = -1/|y| sum_t log p(y_t | x, y_<t), or its perplexity exp(L) (same order).

    The loss / perplexity baseline of the data-pruning literature (e.g. Marion et al., 2023, "When Less is
    More: Investigating Data Pruning for Pretraining LLMs at Scale"): ``"highest"`` keeps informative or
    noisy rows, ``"lowest"`` clean, easy ones.
    """

    name: ClassVar[str] = "loss"
    keep: str = "highest"
    metric: str = "loss"

    def __post_init__(self):
        _check("keep", self.keep, ("highest", "lowest"))
        _check("metric", self.metric, ("loss", "perplexity"))

    def score(self, pool, *, target=None, existing=None, cost: Cost) -> tuple[np.ndarray, list[int]]:
        model, tokenizer = self._load()
        losses = self._stored_losses(model, tokenizer, {"conditioned": self._conditioned_rows(pool, tokenizer, cost)},
                                     cost)["conditioned"]
        values = np.exp(losses) if self.metric == "perplexity" else losses
        return values, _keep_order(values, self.keep)


@dataclass
class IFDSelector(_ResponseLossSelector):
    """Instruction-Following Difficulty (Li et al., NAACL 2024, "From Quantity to Quality: Boosting LLM
    Performance with Self-Guided Data Selection for Instruction Tuning"):

        IFD(x, y) = L(y | x) / L(y)

    with L the mean response-token cross-entropy under ``model``. A high IFD means the instruction helps the
    model little, so the pair is hard and worth learning; the paper keeps the highest. IFD > 1 means the
    instruction makes the response *less* likely, which the paper reads as a misaligned pair and filters out:
    with ``drop_above_one`` those rows are ranked after every other (closest to 1 first), so they are kept
    only when the budget exceeds the rest.

    L(y) is scored on y after an empty user turn rather than on bare text as in the paper's code, so that in a
    chat template both losses average over exactly the same response tokens. When ``max_length`` cuts a
    response short, L(y) is taken over the same surviving tokens as L(y | x).
    """

    name: ClassVar[str] = "ifd"
    keep: str = "highest"
    drop_above_one: bool = True

    def __post_init__(self):
        _check("keep", self.keep, ("highest", "lowest"))

    def score(self, pool, *, target=None, existing=None, cost: Cost) -> tuple[np.ndarray, list[int]]:
        model, tokenizer = self._load()
        conditioned = self._conditioned_rows(pool, tokenizer, cost)
        alone = [_response_alone(ex, tokenizer, sum(t != IGNORE_INDEX for t in row["labels"]))
                 for ex, row in zip(pool, conditioned)]
        losses = self._stored_losses(model, tokenizer, {"conditioned": conditioned, "alone": alone}, cost)
        ifd = losses["conditioned"] / losses["alone"]
        above = ifd > 1
        cost.details["ifd_above_one"] = int(above.sum())
        return ifd, _keep_order(ifd, self.keep, demoted=above if self.drop_above_one else None)


def _rows_digest(named_rows: dict[str, list[dict[str, list[int]]]]) -> str:
    """A hash of tokenised rows (names, ids and labels in order): the rows part of a loss store's key."""
    h = hashlib.sha256()
    for name, rows in named_rows.items():
        h.update(name.encode())
        for row in rows:
            for field in ("input_ids", "labels"):
                h.update(np.asarray(row[field], dtype=np.int64).tobytes())
                h.update(b"|")
    return h.hexdigest()[:20]


def _response_alone(example: Example, tokenizer, n_tokens: int) -> dict[str, list[int]]:
    """y after an empty user turn, labelled on its first ``n_tokens`` tokens and cut right after them."""
    alone = Example(id=example.id, messages=({"role": "user", "content": ""},
                                             {"role": "assistant", "content": example.response}))
    row = encode_example(alone, tokenizer)
    labelled = [t for t, label in enumerate(row["labels"]) if label != IGNORE_INDEX][:n_tokens]
    if not labelled:
        return {"input_ids": row["input_ids"][:1], "labels": [IGNORE_INDEX]}
    end = labelled[-1] + 1
    return {"input_ids": row["input_ids"][:end], "labels": row["labels"][:end]}


__all__ = ["IFDSelector", "LengthSelector", "LossSelector", "RandomSelector"]
