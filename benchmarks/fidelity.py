"""Agreement with the authors' own code: LESS, DELIFT and UDS scored by slimtune and by the seed papers'
repositories on identical inputs.

    python benchmarks/fidelity.py --less-repo PATH --delift-repo PATH --uds-repo PATH [--rows 30]
        [--model smollm2] [--max-length 256] [--delift-rows 16] [--out benchmarks/results/fidelity.json]

PATHs are clones of princeton-nlp/LESS, agarwalishika/DELIFT and gfyddha/UDS; their functions are imported from
there (``sys.path``), nothing of theirs is copied into slimtune. Inputs shared by both sides: the embedded model
in float32 on the CPU, one short slimtune LoRA warm-up (its checkpoints' adapters and ``optimizer.pt``), and
rows drawn with a fixed seed from the shared data (/work/shared/data, else the bundled samples), tokenised once
by slimtune and fed to both sides.

What is patched on the authors' side, and why (nothing else is touched):
- LESS ``collect_grad_reps``: ``trak`` is not installed and its CUDA projector cannot run here. A stub module
  ``trak.projectors`` is put in ``sys.modules`` whose ``BasicProjector`` applies slimtune's seeded sparse JL
  projection, the matrix slimtune's LESS uses (``projector="sparse"``, d = 8192, seed 0): the *same
  projection on both sides*, so only the gradients and the matching are compared. ``prepare_batch`` moves
  batches to the CPU instead of ``cuda:0``. Their ``get_info.py`` (an argparse script) is not run; its
  three model-loading lines are repeated here (``PeftModel.from_pretrained`` + LoRA weights trainable) in
  float32. Their code reads FSDP's name-keyed ``optimizer.bin``; a Trainer writes an integer-keyed
  ``optimizer.pt``, so its states are keyed by parameter name here, in the optimizer's parameter order
  (shapes checked). ``matching.py`` (also a script) runs unmodified with ``runpy`` on the gradient files
  ``collect_grads`` wrote; its subtask reshape is fixed to the paper's target tasks, so the targets are
  9 subtasks x 2 examples passed as "tydiqa" (9 subtasks).
- DELIFT: the no-vllm utility kernel (``get_icl_utility_kernel_no_vllm.ModelDependentICLUtility``) on the
  CPU, ``scaling="none"`` to read the unscaled utilities. No stub is needed.
- UDS: ``UDSamplingTrainer.compute_top_index`` is called on an instance built without ``Trainer.__init__``
  (its positional call no longer fits transformers 5's signature), with the attributes that method reads;
  its ``FastJLProjector`` is built on the CPU and given slimtune's seeded signs and frequencies (the same
  sketch on both sides). The combined scores are read where the method passes them to ``torch.topk``, by
  a proxy of ``torch`` in that module. The model scores in eval mode on both sides (the authors' scripts
  train with LoRA dropout 0, so their scoring forward is deterministic too).

Metrics per comparison: Spearman and Pearson of the two score vectors, and the overlap of their top 10% and
30%. Results go to ``--out`` as JSON; benchmarks/README.md ("Agreement with the authors' code") reads them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import runpy
import sys
import tempfile
import time
import types
from collections import defaultdict
from pathlib import Path

import numpy as np

SEED = 0
PROJ_DIM = 8192
N_SUBTASKS = 9  # matching.py's "tydiqa": 9 subtasks
PER_SUBTASK = 2


# -- pure helpers (tested in tests/test_fidelity_script.py) --------------------------------------------------
def ranks(values) -> np.ndarray:
    """Ranks from 1, ties sharing their average rank (as Spearman's rho needs)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    result = np.empty(len(values))
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        result[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return result


def pearson(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / denominator if denominator > 0 else float("nan")


def spearman(a, b) -> float:
    return pearson(ranks(a), ranks(b))


def top_k_overlap(a, b, share: float) -> float:
    """|top-k of a & top-k of b| / k with k = round(share * n), at least 1 (ties broken by position)."""
    a, b = np.asarray(a), np.asarray(b)
    k = max(1, round(share * len(a)))
    top_a = set(np.argsort(-a, kind="mergesort")[:k].tolist())
    top_b = set(np.argsort(-b, kind="mergesort")[:k].tolist())
    return len(top_a & top_b) / k


def agreement(ours, theirs) -> dict:
    ours, theirs = np.asarray(ours, dtype=np.float64).ravel(), np.asarray(theirs, dtype=np.float64).ravel()
    return {"n": int(len(ours)), "spearman": round(spearman(ours, theirs), 5),
            "pearson": round(pearson(ours, theirs), 5),
            "top10_overlap": round(top_k_overlap(ours, theirs, 0.1), 4),
            "top30_overlap": round(top_k_overlap(ours, theirs, 0.3), 4),
            "max_abs_diff": float(np.abs(ours - theirs).max())}


def subtask_order(tasks: list[str], per_subtask: int, n_subtasks: int) -> list[int]:
    """Indices of ``n_subtasks`` tasks x ``per_subtask`` rows, each task's rows consecutive (the layout
    matching.py's reshape(n, subtasks, -1) reads), tasks taken in order of first appearance."""
    rows: dict[str, list[int]] = defaultdict(list)
    for i, task in enumerate(tasks):
        rows[task].append(i)
    chosen = [r[:per_subtask] for r in rows.values() if len(r) >= per_subtask][:n_subtasks]
    if len(chosen) < n_subtasks:
        raise ValueError(f"need {n_subtasks} tasks with {per_subtask} rows each; found {len(chosen)}")
    return [i for r in chosen for i in r]


# -- inputs ----------------------------------------------------------------------------------------------------
def load_rows(tokenizer, rows: int, max_length: int):
    """(warm-up rows, pool rows, target rows), disjoint, each under ``max_length`` tokens, drawn with SEED."""
    from slimtune.data.recipes import load_recipe
    from slimtune.data.tokenize import encode_example

    def fits(ex, limit=max_length):
        return len(encode_example(ex, tokenizer, None)["input_ids"]) <= limit

    sources = {name: [ex for ex in load_recipe(name, limit=400, seed=SEED) if fits(ex)]
               for name in ("gsm8k", "p3", "tatoeba", "taskmaster4")}
    # targets: 9 subtasks x 2 rows, subtasks spread over the sources
    interleaved = [ex for group in zip(*sources.values()) for ex in group]
    order = subtask_order([ex.task for ex in interleaved], PER_SUBTASK, N_SUBTASKS)
    targets = [interleaved[i] for i in order]
    used = {ex.id for ex in targets}
    rest = [ex for ex in interleaved if ex.id not in used]
    return rest[-16:], rest[:rows], targets


def warm_up(examples, model_name: str, out: Path, max_length: int) -> Path:
    """One short slimtune LoRA warm-up with a checkpoint (adapter + optimizer.pt) per epoch."""
    from slimtune.models import LoraSettings
    from slimtune.train import TrainSettings, train

    if not list(out.glob("checkpoint-*/optimizer.pt")):
        settings = TrainSettings(output_dir=str(out), epochs=2, learning_rate=2e-4, batch_size=4, grad_accum=1,
                                 max_length=max_length, warmup_ratio=0.0, lr_scheduler="linear", seed=SEED,
                                 lora=LoraSettings(r=8, alpha=32, dropout=0.1), save_checkpoints=True,
                                 logging_steps=1, device="cpu", progress=False)
        train(examples, model=model_name, settings=settings)
    return out


# -- LESS ------------------------------------------------------------------------------------------------------
def stub_trak() -> None:
    """``trak.projectors`` whose BasicProjector is slimtune's sparse JL projection (module docstring)."""
    from slimtune.features.projection import make_projector

    class BasicProjector:
        def __init__(self, grad_dim, proj_dim, seed, proj_type, device, dtype, block_size, max_batch_size):
            self.projector = make_projector("sparse", proj_dim, seed)

        def project(self, grads, model_id):
            return self.projector.project(grads.float())

    projectors = types.ModuleType("trak.projectors")
    projectors.BasicProjector = projectors.CudaProjector = BasicProjector
    projectors.ProjectionType = types.SimpleNamespace(rademacher="rademacher", normal="normal")
    trak = types.ModuleType("trak")
    trak.projectors = projectors
    sys.modules.setdefault("trak", trak)
    sys.modules.setdefault("trak.projectors", projectors)


def name_keyed_adam_state(model, optimizer_file: Path) -> dict:
    """A Trainer's integer-keyed optimizer state keyed by parameter name, as the authors' code reads it."""
    import torch

    saved = torch.load(optimizer_file, map_location="cpu", weights_only=True)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    order = [i for group in saved["param_groups"] for i in group["params"]]
    if len(order) != len(trainable):
        raise ValueError(f"{optimizer_file}: {len(order)} optimizer parameters, {len(trainable)} trainable")
    state = {}
    for index, (name, param) in zip(order, trainable, strict=True):
        entry = saved["state"][index]
        if entry["exp_avg"].shape != param.shape:
            raise ValueError(f"{optimizer_file}: state {index} has shape {tuple(entry['exp_avg'].shape)}, "
                             f"{name} {tuple(param.shape)}")
        state[name] = entry
    return state


def authors_less(less_repo: Path, model_name: str, checkpoints, pool_data, target_data, work: Path) -> np.ndarray:
    import torch
    from peft import PeftModel
    from torch.utils.data import DataLoader

    from slimtune.models import load_model

    stub_trak()
    sys.path.insert(0, str(less_repo))
    from less.data_selection import collect_grad_reps as cgr

    to_device = cgr.prepare_batch
    cgr.prepare_batch = lambda batch: to_device(batch, torch.device("cpu"))

    def loader(data):
        rows = [{"input_ids": torch.tensor([row["input_ids"]]), "labels": torch.tensor([row["labels"]]),
                 "attention_mask": torch.ones(1, len(row["input_ids"]), dtype=torch.long)} for row in data.rows]
        return DataLoader(rows, batch_size=None)

    root = work / "less-authors"
    for checkpoint in checkpoints:
        step = checkpoint.path.name.rsplit("-", 1)[1]
        base, _ = load_model(model_name, device="cpu", dtype="float32")
        model = PeftModel.from_pretrained(base, str(checkpoint.path))  # their get_info.load_model, in fp32
        for name, param in model.named_parameters():
            if "lora" in name or "Lora" in name:
                param.requires_grad = True
        state = name_keyed_adam_state(model, checkpoint.path / "optimizer.pt")
        with contextlib.redirect_stdout(io.StringIO()):
            cgr.collect_grads(loader(pool_data), model, str(root / step / "pool"), proj_dim=[PROJ_DIM],
                              adam_optimizer_state=state, gradient_type="adam")
            cgr.collect_grads(loader(target_data), model, str(root / step / "tydiqa"), proj_dim=[PROJ_DIM],
                              gradient_type="sgd")
    steps = [c.path.name.rsplit("-", 1)[1] for c in checkpoints]
    argv = sys.argv
    sys.argv = ["matching.py", "--gradient_path", str(root / "{}" / "{}" / f"dim{PROJ_DIM}"),
                "--validation_gradient_path", str(root / "{}" / "{}" / f"dim{PROJ_DIM}"),
                "--train_file_names", "pool", "--target_task_names", "tydiqa", "--ckpts", *steps,
                "--checkpoint_weights", *[repr(c.weight) for c in checkpoints],
                "--output_path", str(root / "selected")]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(str(less_repo / "less" / "data_selection" / "matching.py"), run_name="__main__")
    finally:
        sys.argv = argv
    return torch.load(root / "selected" / "tydiqa" / "pool_influence_score.pt").numpy()


def compare_less(args, run: Path, pool, targets, work: Path) -> dict:
    from slimtune.data.tokenize import TokenizedDataset
    from slimtune.models import load_tokenizer
    from slimtune.select.base import Cost
    from slimtune.select.less import LessSelector, run_checkpoints

    tokenizer = load_tokenizer(args.model)
    pool_data = TokenizedDataset(pool, tokenizer, args.max_length)
    target_data = TokenizedDataset(targets, tokenizer, args.max_length)
    checkpoints = run_checkpoints(run)
    start = time.perf_counter()
    theirs = authors_less(args.less_repo, args.model, checkpoints, pool_data, target_data, work)
    their_seconds = time.perf_counter() - start
    result = {"checkpoints": [{"path": c.path.name, "weight": c.weight} for c in checkpoints],
              "pool_rows": len(pool), "target_rows": len(targets),
              "subtasks": f"{N_SUBTASKS} x {PER_SUBTASK}", "projection": f"sparse JL d={PROJ_DIM} seed {SEED}, "
              "both sides", "authors_seconds": round(their_seconds, 1), "slimtune": {}}
    for aggregate in ("mean-cosine", "mean-gradient"):
        selector = LessSelector(model=args.model, checkpoints=str(run), max_length=args.max_length,
                                projector="sparse", proj_dim=PROJ_DIM, aggregate=aggregate, grad_batch_size=4,
                                cache_dir=str(work / "less-slimtune"), device="cpu", seed=SEED)
        start = time.perf_counter()
        ours = selector.score(pool, target=targets, cost=Cost())
        result["slimtune"][aggregate] = {"seconds": round(time.perf_counter() - start, 1),
                                         **agreement(ours, theirs)}
    return result


# -- DELIFT ----------------------------------------------------------------------------------------------------
PLAIN_TEMPLATE = "{{ messages[0]['content'] }}{{ eos_token }}{{ messages[1]['content'] }}{{ eos_token }}"


def strip_text(example):
    """The example with every turn's trailing whitespace removed (see compare_delift)."""
    import dataclasses

    messages = tuple({**m, "content": m["content"].rstrip()} for m in example.messages)
    return dataclasses.replace(example, messages=messages)


def shortest_per_source(pool, tokenizer, count: int) -> list:
    """About ``count`` rows, the shortest of each source in turn (n^2 forwards: short rows keep it cheap,
    every source keeps it varied)."""
    by_source: dict[str, list] = defaultdict(list)
    for ex in pool:
        by_source[ex.metadata.get("source", "default")].append(ex)
    queues = [sorted(group, key=lambda ex: len(tokenizer(ex.prompt_text + ex.response)["input_ids"]))
              for group in by_source.values()]
    chosen = [ex for layer in zip(*queues) for ex in layer][:count]
    return [ex for ex in pool if ex in chosen]


def compare_delift(args, model, tokenizer, rows) -> dict:
    """UF entries (targets = contexts = ``rows``, unscaled) from both codes: slimtune with the authors' plain
    layout (prompt EOS response EOS) as its chat template, on the rows as they are and with trailing whitespace
    stripped from every turn (a prompt ending in a newline tokenises differently when slimtune assembles the
    sequence from separately tokenised pieces), and slimtune as shipped (the model's chat template)."""
    import copy

    from slimtune.features.utility import InContextUtility

    sys.path.insert(0, str(args.delift_repo / "visualization"))
    sys.path.insert(0, str(args.delift_repo / "subset_selection" / "src" / "utils" / "dist_utils"))
    from get_icl_utility_kernel_no_vllm import ModelDependentICLUtility

    def theirs(examples):
        prompts, responses = [ex.prompt_text for ex in examples], [ex.response for ex in examples]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            utility = ModelDependentICLUtility(model, copy.deepcopy(tokenizer), device="cpu")
            return utility.calculate_icl_utility(prompts, responses, prompts, responses,
                                                 kernel_type="euclidean", scaling="none")

    def ours(examples, tok):
        return InContextUtility(model, tok, distance="euclidean", max_text_tokens=None, cache=False).kernel(
            examples, examples).values

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = PLAIN_TEMPLATE
    stripped = [strip_text(ex) for ex in rows]
    off_diagonal = ~np.eye(len(rows), dtype=bool)
    result = {"rows": len(rows), "entries": len(rows) ** 2,
              "rows_with_trailing_whitespace": sum(ex != s for ex, s in zip(rows, stripped, strict=True)),
              "slimtune": {}}
    start = time.perf_counter()
    kernels = {"as-is": theirs(rows)}
    result["authors_seconds"] = round(time.perf_counter() - start, 1)
    kernels["stripped"] = theirs(stripped)
    for label, examples, tok, reference in (
            ("authors-layout, trailing whitespace stripped", stripped, plain, "stripped"),
            ("authors-layout, rows as they are", rows, plain, "as-is"),
            ("chat template (shipped), rows as they are", rows, tokenizer, "as-is")):
        start = time.perf_counter()
        values = ours(examples, tok)
        result["slimtune"][label] = {"seconds": round(time.perf_counter() - start, 1),
                                     **agreement(values, kernels[reference]),
                                     "off_diagonal": agreement(values[off_diagonal],
                                                               kernels[reference][off_diagonal])}
    return result


# -- UDS -------------------------------------------------------------------------------------------------------
def authors_uds(uds_repo: Path, vocab: int, alpha: float, keep: int, max_length: int):
    """The authors' trainer (not initialised as a Trainer, module docstring) and the list its top-k reads."""
    import torch

    sys.path.insert(0, str(uds_repo))
    import UDSamplingTrainer as uds

    seen: list = []

    class TorchSpy:  # the scores compute_top_index ranks, read where it ranks them
        def __getattr__(self, name):
            return getattr(torch, name)

        def topk(self, scores, *args, **kwargs):
            seen.append(scores.detach().clone())
            return torch.topk(scores, *args, **kwargs)

    uds.torch = TorchSpy()
    trainer = object.__new__(uds.UDSamplingTrainer)
    trainer.accelerator = types.SimpleNamespace(unwrap_model=lambda m: m)
    trainer.args = types.SimpleNamespace(past_index=-1)
    trainer.alpha, trainer.K_base, trainer.max_seq_len = alpha, keep, max_length
    trainer.queue_size, trainer.projection_dim1, trainer.projection_dim2 = 1024, 128, 8
    trainer.repr_queue, trainer.queue_ptr, trainer.queue_count, trainer.history_count = None, 0, 0, 0
    trainer.output_file = os.devnull
    projector = uds.FastJLProjector(max_length, vocab, 8, 128, device="cpu")
    # slimtune's draws (UDSPolicy._projections -> srft_matrix): vocab side, then sequence side
    generator = torch.Generator().manual_seed(SEED)
    projector.d2 = (torch.randint(0, 2, (vocab,), generator=generator) * 2 - 1).float()
    projector.idx2 = torch.randperm(vocab, generator=generator)[:128]
    projector.d1 = (torch.randint(0, 2, (max_length,), generator=generator) * 2 - 1).float()
    projector.idx1 = torch.randperm(max_length, generator=generator)[:8]
    trainer.projector = projector
    return trainer, seen


def compare_uds(args, model, tokenizer, rows, batch_size: int = 8, keep: int = 2) -> dict:
    import torch

    from slimtune.data.tokenize import Collator, TokenizedDataset
    from slimtune.online.base import CandidateBatch
    from slimtune.online.policies.uds import UDSPolicy
    from slimtune.online.trainer import accepts_logits_to_keep, forward_signals, logits_are_linear

    data = TokenizedDataset(rows, tokenizer, args.max_length)
    collate = Collator(tokenizer.pad_token_id)
    batches = [collate([data[i] for i in range(lo, min(lo + batch_size, len(data)))])
               for lo in range(0, len(data) - batch_size + 1, batch_size)]
    vocab = model.config.vocab_size
    trim = accepts_logits_to_keep(model)
    linear = logits_are_linear(model, batches[0])
    max_length = 512  # the authors' default max_seq_len, and UDSPolicy's

    def slimtune_scores(policy) -> tuple[list, list]:
        scores, picks = [], []
        for b, batch in enumerate(batches):
            signals = forward_signals(model, batch, logits=not linear, hidden=linear, trim_logits=trim)
            candidates = CandidateBatch(
                index=torch.arange(b * batch_size, b * batch_size + len(batch["input_ids"])),
                ids=[str(i) for i in range(len(batch["input_ids"]))], tasks=["default"] * len(batch["input_ids"]),
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                token_count=(batch["labels"][:, 1:] != -100).sum(1),
                extras={"head": model.get_output_embeddings().weight} if linear else {}, **signals)
            chosen = policy.choose(candidates, keep)
            policy.observe(candidates.subset(chosen))
            scores.append(policy._last_scores.detach().clone())
            picks.append(sorted(chosen.tolist()))
        return scores, picks

    def authors_scores(alpha) -> tuple[list, list]:
        trainer, seen = authors_uds(args.uds_repo, vocab, alpha, keep, max_length)
        picks = []
        with contextlib.redirect_stdout(io.StringIO()):
            for batch in batches:
                inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
                picks.append(sorted(trainer.compute_top_index(model, inputs).tolist()))
        return seen, picks

    result = {"rows": len(batches) * batch_size, "candidate_batches": len(batches), "B": batch_size, "K": keep,
              "factored_head": linear, "slimtune": {}}
    for alpha in (1.5e-3, 1.0):
        start = time.perf_counter()
        theirs, their_picks = authors_scores(alpha)
        their_seconds = time.perf_counter() - start
        variants = {f"unmasked_raw alpha={alpha:g}": UDSPolicy(alpha=alpha, unmasked_raw=True,
                                                               max_length=max_length, seed=SEED)}
        if alpha == 1.0:
            variants["default (padding masked, z-scored) alpha=1"] = UDSPolicy(max_length=max_length, seed=SEED)
        for label, policy in variants.items():
            ours, our_picks = slimtune_scores(policy)
            within = [spearman(o.numpy(), t.numpy()) for o, t in zip(ours, theirs, strict=True)]
            result["slimtune"][label] = {
                "authors_alpha": alpha, "authors_seconds": round(their_seconds, 1),
                **agreement(torch.cat(ours).numpy(), torch.cat(theirs).numpy()),
                "spearman_within_batch_mean": round(float(np.mean(within)), 5),
                "same_picks": sum(a == b for a, b in zip(our_picks, their_picks, strict=True)),
                "picks": {"slimtune": our_picks, "authors": their_picks}}
    return result


# -- main ------------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--less-repo", type=Path, required=True)
    parser.add_argument("--delift-repo", type=Path, required=True)
    parser.add_argument("--uds-repo", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=30, help="pool rows scored by LESS and UDS")
    parser.add_argument("--delift-rows", type=int, default=12, help="rows of the DELIFT kernel (n x n pairs)")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--methods", default="less,delift,uds")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fidelity.json"))
    args = parser.parse_args(argv)
    for flag in ("less_repo", "delift_repo", "uds_repo"):
        if not getattr(args, flag).is_dir():
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)} is not a directory: pass a clone "
                         "of the authors' repository")

    import torch
    import transformers

    from slimtune import __version__
    from slimtune.models import load_model

    torch.manual_seed(SEED)
    work = args.work or Path(tempfile.mkdtemp(prefix="slimtune-fidelity-"))
    model, tokenizer = load_model(args.model, device="cpu", dtype="float32")
    warmup_rows, pool, targets = load_rows(tokenizer, args.rows, args.max_length)
    report = {"slimtune": __version__, "date": time.strftime("%Y-%m-%d"), "machine": {
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__},
        "model": args.model, "max_length": args.max_length, "seed": SEED,
        "repos": {name: _head(getattr(args, f"{name}_repo")) for name in ("less", "delift", "uds")}}
    methods = args.methods.split(",")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}

    def save(method: str) -> None:  # after each method, so a stopped run keeps what it finished
        print(json.dumps(report[method], indent=1), flush=True)
        args.out.write_text(json.dumps({**previous, **report}, indent=1) + "\n")

    if "less" in methods:
        run = warm_up(warmup_rows, args.model, work / "warmup", args.max_length)
        report["less"] = compare_less(args, run, pool, targets, work)
        save("less")
    if "delift" in methods:
        rows = shortest_per_source(pool, tokenizer, args.delift_rows)
        report["delift"] = compare_delift(args, model, tokenizer, rows)
        save("delift")
    if "uds" in methods:
        run = warm_up(warmup_rows, args.model, work / "warmup", args.max_length)
        from peft import PeftModel

        last = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))[-1]
        tuned = PeftModel.from_pretrained(load_model(args.model, device="cpu", dtype="float32")[0], str(last))
        tuned.eval()
        report["uds"] = compare_uds(args, tuned, tokenizer, pool)
        report["uds"]["checkpoint"] = last.name
        save("uds")
    return report


def _head(repo: Path) -> str | None:
    head = repo / ".git" / "HEAD"
    if not head.exists():
        return None
    ref = head.read_text().strip()
    if ref.startswith("ref: "):
        target = repo / ".git" / ref[5:]
        return target.read_text().strip() if target.exists() else ref[5:]
    return ref


if __name__ == "__main__":
    main()
