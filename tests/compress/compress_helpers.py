"""Tiny models shared by the compression tests."""
from __future__ import annotations

import torch


def tiny_llama(seed: int = 0, **overrides):
    """A 2-layer Llama (hidden 64, 4 heads of 16, 2 kv heads, intermediate 128) with seeded random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, tie_word_embeddings=False)
    settings.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**settings)).eval()


def lm_data(n: int = 32, length: int = 12, vocab: int = 300, seed: int = 0) -> list[dict]:
    """Causal-LM examples with a learnable pattern (each token is the previous plus one, mod 50)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = int(torch.randint(0, 50, (1,), generator=g))
        ids = (torch.arange(length) + start) % 50 + 10
        out.append({"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long), "labels": ids.clone()})
    return out
