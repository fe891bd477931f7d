"""LoRA-FA: Memory-efficient Low-rank Adaptation (Zhang et al., arXiv:2308.03303).

Update rule: A keeps its random initialisation; only B (and heads, biases) train, with AdamW. Freezing A is done
in the optimiser's construction: A's ``requires_grad`` is switched off, so no gradient of A is computed and the
full-width input activations A's gradient needs are not stored (the paper's activation-memory saving), and A is
left out of the optimiser. Deviation: none; ΔW = s·B·A stays a PEFT LoRA (A is saved with B).
"""
from __future__ import annotations

import torch
from torch import nn

from .base import OPTIMIZERS, decay_groups, lora_pairs, split


@OPTIMIZERS.register()
class LoRAFA(torch.optim.AdamW):
    """AdamW over everything but the A factors, which are frozen."""

    name = "lora_fa"
    summary = "LoRA-FA: A frozen at its initialisation, AdamW on B"

    @classmethod
    def from_model(cls, model: nn.Module, lr: float, weight_decay: float = 0.0) -> "LoRAFA":
        """Freeze every lora_A and build AdamW over what still trains."""
        pairs = lora_pairs(model)
        if not pairs:
            raise ValueError("lora_fa: the model has no trainable lora_A/lora_B pair; apply a LoRA-shaped adapter first")
        _, b, rest = split(model, pairs)
        for pair in pairs:
            pair.A.requires_grad_(False)
        return cls(decay_groups(b + rest, weight_decay), lr=lr)
