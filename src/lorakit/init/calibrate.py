"""Calibration: adapters initialised from data rather than from the weights alone.

An adapter class that needs data declares ``calibration = "gradient"`` and implements ``calibrate_(gradient)``,
where ``gradient`` is the sum over the calibration batches of dL/dW for its base weight (fp32, in the weight's
own layout). ``calibrate(model, config, batches)`` computes those sums on the base model, applies ``config``
and hands each adapter its gradient; for methods that need no data it is just ``apply``.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import nn

from ..core.apply import adapters, apply, resolve
from ..core.config import AdapterConfig
from ..core.registry import METHODS
from ..core.targets import is_target

LossFn = Callable[[nn.Module, object], torch.Tensor]


def default_loss(model: nn.Module, batch) -> torch.Tensor:
    """``model(**batch).loss``: Hugging Face models given a batch dict with labels."""
    return model(**batch).loss


def weight_gradients(model: nn.Module, paths: list[str], batches: Iterable, loss_fn: Optional[LossFn] = None) -> dict[str, torch.Tensor]:
    """Σ over ``batches`` of dL/dW (fp32, on the weight's device, in its layout) for each module in ``paths``.

    Uses ``torch.autograd.grad``, so no ``.grad`` is written; ``requires_grad`` flags are restored. The model's
    train/eval mode is left as the caller set it.
    """
    loss_fn = loss_fn or default_loss
    weights = {p: model.get_submodule(p).weight for p in paths}
    before = {p: w.requires_grad for p, w in weights.items()}
    sums = {p: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for p, w in weights.items()}
    seen = 0
    try:
        for w in weights.values():
            w.requires_grad_(True)
        for batch in batches:
            grads = torch.autograd.grad(loss_fn(model, batch), list(weights.values()), allow_unused=True)
            for p, g in zip(weights, grads):
                if g is not None:
                    sums[p] += g.float()
            seen += 1
    finally:
        for p, w in weights.items():
            w.requires_grad_(before[p])
    if not seen:
        raise ValueError("no calibration batches: pass an iterable with at least one batch")
    return sums


def calibrate(model: nn.Module, config: AdapterConfig, batches: Iterable, loss_fn: Optional[LossFn] = None) -> nn.Module:
    """``apply(model, config)``, initialising data-driven adapters (e.g. LoRA-SB) from ``batches``."""
    method = METHODS.get(config.method_name)
    resolved = resolve(model, config)
    targets = {p: m for p, m in model.named_modules() if p and is_target(p, resolved)}
    needs = {p for p, m in targets.items() if getattr(method.adapter_class_for(m), "calibration", None) == "gradient"}
    grads = weight_gradients(model, sorted(needs), batches, loss_fn) if needs else {}
    apply(model, config)
    for path, adapter in adapters(model).items():
        if path in grads:
            adapter.calibrate_(grads[path])
    return model
