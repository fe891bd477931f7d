"""Tiny seeded Hugging Face models built from configs (no download), for tests and examples.

``tiny_moe(kind)`` builds a two-layer Mixtral, Qwen3-MoE or GPT-OSS whose fused expert weights are what PEFT's
``target_parameters`` adapts: Mixtral and Qwen3-MoE store experts as [E, out, in], GPT-OSS as [E, in, out] with
biases. The same ``seed`` gives the same weights, and the caller's random state is left as it was.
"""
from __future__ import annotations

import torch
from torch import nn

MOE_KINDS = ("mixtral", "qwen3_moe", "gpt_oss")
MOE_EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]  # the fused expert parameters of every kind


def _config(kind: str, vocab_size: int):
    import transformers as tf

    common = dict(vocab_size=vocab_size, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, num_experts_per_tok=2, max_position_embeddings=64)
    if kind == "mixtral":
        return tf.MixtralForCausalLM, tf.MixtralConfig(num_local_experts=4, **common)
    if kind == "qwen3_moe":
        return tf.Qwen3MoeForCausalLM, tf.Qwen3MoeConfig(moe_intermediate_size=12, head_dim=8, num_experts=4, **common)
    if kind == "gpt_oss":
        return tf.GptOssForCausalLM, tf.GptOssConfig(head_dim=8, num_local_experts=4, **common,
                                                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    raise ValueError(f"tiny_moe: unknown kind '{kind}'; expected one of {', '.join(MOE_KINDS)}")


def tiny_moe(kind: str, vocab_size: int = 64, seed: int = 0) -> nn.Module:
    """A seeded two-layer MoE causal LM of ``kind`` (mixtral, qwen3_moe, gpt_oss) in eval mode."""
    cls, config = _config(kind, vocab_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(config).eval()
