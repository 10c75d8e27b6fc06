"""Batched greedy generation from chat-template prompts, left-padded, returned in the input order."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from slimtune.data.example import Example
from slimtune.data.tokenize import Collator, ensure_chat_template, render_prompt
from slimtune.progress import track

#: End-of-turn markers of common chat templates; generation also stops on any of them the vocabulary has,
#: because some models' generation configs name only the end-of-text token.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


def stop_token_ids(model, tokenizer) -> list[int]:
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in END_OF_TURN if token in vocab)
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate(model, tokenizer, examples: Sequence[Example], max_new_tokens: int = 256, batch_size: int = 8,
             *, progress: bool = True) -> list[str]:
    """Greedy completions of each example's prompt (``prompt_messages`` through the chat template).

    Prompts are batched longest first with left padding, so rows of a batch pad little and every row's
    new tokens start at the same column; each text ends before its first end-of-turn or end-of-text token.
    """
    ensure_chat_template(tokenizer)
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    stops = stop_token_ids(model, tokenizer)
    # A fresh config, so a model's own sampling defaults (temperature, top_p) cannot make this random.
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
    prompts = [tokenizer(render_prompt(tokenizer, ex.prompt_messages), add_special_tokens=False)["input_ids"]
               for ex in examples]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    collate = Collator(pad_token_id=tokenizer.pad_token_id, padding_side="left")
    texts: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        starts = range(0, len(order), batch_size)
        for s in track(starts, "generating", unit="batches") if progress else starts:
            rows = order[s:s + batch_size]
            batch = collate([{"input_ids": prompts[i], "labels": prompts[i]} for i in rows])
            width = batch["input_ids"].shape[1]
            out = model.generate(input_ids=batch["input_ids"].to(device),
                                 attention_mask=batch["attention_mask"].to(device), generation_config=config)
            for i, new in zip(rows, out[:, width:].tolist()):
                end = next((t for t, token in enumerate(new) if token in stops), len(new))
                texts[i] = tokenizer.decode(new[:end], skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return texts
