"""LoRA through PEFT, with target modules chosen per architecture."""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Attention projections per ``config.model_type``: the modules the LoRA and LESS papers adapt.
ATTENTION_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "phi3": ["qkv_proj", "o_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense"],
    "gpt2": ["c_attn", "c_proj"],
    "gpt_neox": ["query_key_value", "dense"],
    "falcon": ["query_key_value", "dense"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "bloom": ["query_key_value", "dense"],
    "chatglm": ["query_key_value", "dense"],
}


@dataclass
class LoraSettings:
    """LoRA hyper-parameters; ``target_modules=None`` means the attention projections of the architecture."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | None = None


def lora_target_modules(model: torch.nn.Module) -> list[str]:
    """Attention projections for known architectures; otherwise every Linear layer but the output head."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ATTENTION_MODULES:
        return ATTENTION_MODULES[model_type]
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear)}
    names.discard("lm_head")
    if not names:
        raise ValueError(f"no Linear layers found to adapt in a '{model_type}' model; pass target_modules")
    return sorted(names)


def apply_lora(model: torch.nn.Module, settings: LoraSettings | None = None):
    from peft import LoraConfig, get_peft_model

    settings = settings or LoraSettings()
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=settings.target_modules or lora_target_modules(model),
                        task_type="CAUSAL_LM", bias="none")
    return get_peft_model(model, config)
