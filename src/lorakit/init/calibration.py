"""Calibration passes for the ``init_lora_weights`` initialisers: weight gradients and layer inputs over batches.

Both passes run the base model (adapters disabled), as LoRA-GA's and EVA's official code do before the adapters
exist. Gradients come from ``calibrate.weight_gradients``, the one gradient pass every data-driven start uses
(fp32, no ``.grad`` and no changed ``requires_grad`` left behind).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from ..core.apply import disabled
from .calibrate import default_loss, weight_gradients


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return type(batch)({k: to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for dicts, ``model(*batch)`` for tuples and lists, else ``model(batch)``."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


@dataclass
class Calibration:
    """Calibration batches and how to run the model on them."""

    batches: list
    forward_fn: Callable[[nn.Module, Any], Any] = default_forward
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] = default_loss

    @classmethod
    def of(cls, batches: Iterable, forward_fn: Optional[Callable] = None, loss_fn: Optional[Callable] = None) -> "Calibration":
        batches = list(batches)  # EVA cycles over them, so a one-shot iterator is materialised once
        if not batches:
            raise ValueError("no calibration batches: pass a non-empty list or DataLoader")
        return cls(batches, forward_fn or default_forward, loss_fn or default_loss)


def token_mask(batch: Any, label_mask_value: Optional[int]) -> Optional[torch.Tensor]:
    """Token positions [batch, seq] that count: attention mask, and labels != ``label_mask_value`` when given.

    Only token-level labels (the shape of ``input_ids``, as in causal LM batches) mask tokens; sequence-level
    labels ([batch], classification) say nothing about positions and are ignored here."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        return None
    mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
    labels = batch.get("labels")
    if label_mask_value is not None and torch.is_tensor(labels) and labels.shape == mask.shape:
        mask = mask & (labels != label_mask_value)
    return mask


def layer_inputs(model: nn.Module, layers: dict[str, nn.Module], batch: Any, calibration: Calibration,
                 label_mask_value: Optional[int] = None, per_call: bool = False) -> dict[str, Any]:
    """The inputs each of ``layers`` receives on ``batch`` as fp32 rows [tokens, in] (masked positions dropped).

    A layer called several times in one forward gets its calls' rows stacked, or, with ``per_call``, a list with
    one tensor per call."""
    device = next(model.parameters()).device
    batch = to_device(batch, device)
    mask = token_mask(batch, label_mask_value)
    rows: dict[str, torch.Tensor] = {}

    def hook(path):
        def capture(module, args, output):
            x = args[0].detach()
            x = x[mask] if mask is not None and x.shape[:2] == mask.shape else x.reshape(-1, x.shape[-1])
            if per_call:
                rows.setdefault(path, []).append(x.float())
            else:
                rows[path] = torch.cat([rows[path], x.float()]) if path in rows else x.float()  # layer called twice
        return capture

    handles = [m.register_forward_hook(hook(p)) for p, m in layers.items()]
    try:
        with torch.no_grad(), disabled(model):
            calibration.forward_fn(model, batch)
    finally:
        for h in handles:
            h.remove()
    return rows


def accumulate_gradients(model: nn.Module, layers: dict[str, nn.Module], calibration: Calibration) -> dict[str, torch.Tensor]:
    """dL/dW of each layer's ``weight`` averaged over the calibration batches: the model as it stands with its
    adapters disabled (so at the moved weight after a base-mutating init), in train mode."""
    device = next(model.parameters()).device
    names = {id(m): p for p, m in model.named_modules()}
    paths = {names[id(m)]: key for key, m in layers.items()}
    was_training = model.training
    model.train()  # as LoRA-GA's official code and PEFT estimate the gradient
    try:
        with torch.enable_grad(), disabled(model):
            sums = weight_gradients(model, list(paths), (to_device(b, device) for b in calibration.batches),
                                    calibration.loss_fn)
    finally:
        model.train(was_training)
    return {paths[p]: g / len(calibration.batches) for p, g in sums.items()}
