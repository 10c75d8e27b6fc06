"""Model loading: any Hugging Face causal LM by id or path, the embedded SmolLM2 default, a tiny test model,
and LoRA set-up with per-architecture target modules."""

from slimtune.models.loading import (
    DEFAULT_MODEL,
    TINY_MODEL,
    cache_dir,
    choose_device,
    choose_dtype,
    device_for_rank,
    embedded_gguf_path,
    load_model,
    load_tokenizer,
    resolve_model,
    weights_fingerprint,
)
from slimtune.models.lora import LoraSettings, apply_lora, lora_target_modules

__all__ = [
    "DEFAULT_MODEL", "TINY_MODEL", "LoraSettings", "apply_lora", "cache_dir", "choose_device", "choose_dtype",
    "device_for_rank", "embedded_gguf_path", "load_model", "load_tokenizer", "lora_target_modules", "resolve_model",
    "weights_fingerprint",
]
