"""Trans-LoRA for causal-LM adapters, the paper's own route: the teacher (source base + source adapter) completes
the kept synthetic prompts greedily, and the target adapter is trained with the language-modelling loss on
(prompt, teacher completion) pairs, the completion alone being the target (`lorakit.data.encode`).

Teacher and student exchange text, not token distributions, so their tokenizers may differ (the soft-label KL of
the classification path needs a shared label space; token-level KL would need a shared vocabulary, not built).
The discriminator is the same as for classifiers: the teacher's mean-pooled last hidden states of the prompts.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data.encode import encode
from .distill import pooled


@torch.no_grad()
def prompt_features(model, tokenizer, prompts: Sequence[str], max_length: int = 64, batch_size: int = 32):
    """Mean-pooled, L2-normalised last hidden states of `model` over each prompt."""
    feats = []
    model.eval()
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(list(prompts[start:start + batch_size]), return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length)
        feats.append(pooled(model(**enc, output_hidden_states=True).hidden_states[-1], enc["attention_mask"]))
    return torch.cat(feats)


@torch.no_grad()
def complete(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32, batch_size: int = 16) -> list[str]:
    """Greedy completions of `prompts` by `model` (text after the prompt, special tokens removed)."""
    out, side = [], getattr(tokenizer, "padding_side", "right")
    tokenizer.padding_side = "left"
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(list(prompts[start:start + batch_size]), return_tensors="pt", padding=True)
            gen = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id)
            out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return out


def completion_data(prompts: Sequence[str], completions: Sequence[str], tokenizer, max_length: int):
    """(prompt, completion) pairs tokenised for the LM loss on the completion."""
    examples = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]
    return encode(examples, tokenizer, kind="causal_lm", max_length=max_length)
