"""Data-driven SHiRA supports (arXiv:2406.13175): SHiRA-Grad and SHiRA-SNIP from calibration batches.

``calibrate(model, config, batches, loss_fn)`` sums dL/dW of every targeted weight over ``batches`` (in fp32,
leaving no ``.grad`` behind), applies ``config`` and gives each SHiRA layer the top-nnz support of |G|
(``mask_type="gradient"``) or |W ⊙ G| (``mask_type="snip"``). ``loss_fn(model, batch)`` returns a scalar.
The paper accumulates over a calibration subset whose size it leaves open: pass as many batches as you like.
"""
from __future__ import annotations

from typing import Iterable

from torch import nn

from ..core.apply import adapters, apply, resolve
from ..core.targets import is_target
from ..methods.shira import SHiRAConfig, top_support
from .calibrate import LossFn, weight_gradients


def calibrate(model: nn.Module, config: SHiRAConfig, batches: Iterable, loss_fn: LossFn) -> nn.Module:
    """Apply a SHiRA ``config`` with a gradient or SNIP support scored on ``batches``; returns ``model``."""
    if not isinstance(config, SHiRAConfig) or config.mask_type not in ("gradient", "snip"):
        raise ValueError(
            f"calibrate needs a SHiRAConfig with mask_type 'gradient' or 'snip'; found {type(config).__name__}"
            f"(mask_type={getattr(config, 'mask_type', None)!r}). Other supports need no data: use lorakit.apply"
        )
    resolved = resolve(model, config)
    paths = [p for p, _ in model.named_modules() if p and is_target(p, resolved)]
    grads = weight_gradients(model, paths, batches, loss_fn)
    apply(model, config)
    for path, layer in adapters(model).items():
        score = grads[path].abs()
        if config.mask_type == "snip":
            score = score * layer.base_layer.weight.detach().float().abs()
        layer.set_support(top_support(score.T if layer.config.fan_in_fan_out else score, layer.nnz))
        layer.placeholder = False
    return model
