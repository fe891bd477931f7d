"""Shared by claim tests: train an adapter on one frozen layer to add a known update ``x @ target.T``."""
from __future__ import annotations

import copy

import torch
from torch import nn

import lorakit


def fit_to_target(base: nn.Module, config, target: torch.Tensor, seed: int, steps: int, lr: float) -> lorakit.AdapterState:
    """AdamW on the MSE to ``base(x) + x @ target.T`` over fresh N(0, I) batches of 64; the trained adapter's state."""
    g = torch.Generator().manual_seed(1000 + seed)
    torch.manual_seed(seed)
    model = lorakit.apply(copy.deepcopy(base), config)
    opt = torch.optim.AdamW(lorakit.trainable_parameters(model).values(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        x = torch.randn(64, target.shape[1], generator=g)
        (model(x) - base(x) - x @ target.T).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return lorakit.AdapterState.from_model(model.eval())
