"""LoRA+: Efficient Low Rank Adaptation of Large Models (Hayou, Ghosh, Yu; arXiv:2402.12354).

Update rule: AdamW in which every B factor (lora_B, the zero-initialised up-projection) has learning rate
``lr_ratio · lr`` and everything else ``lr``; the paper recommends a ratio of about 16 (default here).
Deviation: none in the update; parameters other than A and B (heads, biases) keep the base ``lr``, as in the
paper's reference implementation, where only B gets the larger rate. Schedules multiply every group's rate.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import OPTIMIZERS, decay_groups, lora_pairs, split


@OPTIMIZERS.register()
class LoRAPlus(torch.optim.AdamW):
    """AdamW with the B factors learning ``lr_ratio`` times faster than the rest."""

    name = "lora_plus"
    summary = "LoRA+: B factors learn lr_ratio (16) times faster than A"

    @classmethod
    def from_model(cls, model: nn.Module, lr: float, weight_decay: float = 0.0, lr_ratio: float = 16.0) -> "LoRAPlus":
        """Groups: B factors at lr·lr_ratio, the rest at lr."""
        if lr_ratio <= 0:
            raise ValueError(f"lora_plus: lr_ratio must be > 0, got {lr_ratio}")
        pairs = lora_pairs(model)
        if not pairs:
            raise ValueError("lora_plus: the model has no trainable lora_A/lora_B pair; apply a LoRA-shaped adapter first")
        a, b, rest = split(model, pairs)
        groups = decay_groups(a + rest, weight_decay) + decay_groups(b, weight_decay, lr=lr * lr_ratio)
        return cls(groups, lr=lr)
