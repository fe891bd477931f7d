"""Devices, mixed precision and gradient checkpointing for `fit` and `lorakit train`.

* ``device``: "cpu", "cuda", "mps" or "auto" (CUDA, else MPS, else CPU); a device that is not there is an error.
* ``precision``: "fp32"; "bf16" (autocast to bfloat16 on CPU and CUDA; parameters and optimiser state stay
  fp32); "fp16" (CUDA only: autocast to float16 with a dynamic loss scale, ``torch.amp.GradScaler``). fp16 on
  CPU is refused: autocast has no float16 CPU path worth training with and no loss scaling there.
* gradient checkpointing: ``checkpointing.py`` (re-exported here).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from ..core.devices import resolve_device  # noqa: F401  (train's --device)
from .checkpointing import enable_gradient_checkpointing  # noqa: F401

PRECISIONS = ("fp32", "bf16", "fp16")


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a precision the device cannot train in."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"fp16 training needs a CUDA device (found {device.type}); use bf16 or fp32")


def autocast(precision: str, device: torch.device):
    """The autocast context of one forward and loss computation."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device):
    """A GradScaler for fp16 on CUDA, else None."""
    return torch.amp.GradScaler("cuda") if precision == "fp16" and device.type == "cuda" else None
