"""Devices and dtypes of the serving engine: where the model, pool, KV cache and operator tensors live.

Everything the engine creates goes on the model's device (``model_device``) in the dtype of what it meets
(the model's for activations, masks and the KV cache; ``EngineConfig.lora_dtype`` for the adapter tables).
The host tier stays on the CPU: packed adapters are pinned when the device is a CUDA GPU (``host_copy``), so
``ShapeClass.put`` copies them in asynchronously, as S-LoRA's swapping does. Logits are sampled on the CPU
(``features.RequestFeatures._sample``): seeded sampling then draws the same tokens on every device.

``--device`` values resolve through ``lorakit.core.devices.resolve_device``: a device that is absent is one error
that names it and what this machine has. ``check_dtype`` refuses a dtype the device cannot compute in.
"""
from __future__ import annotations

import torch
from torch import nn

from ..core.devices import resolve_device

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for a model without tensors."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def host_copy(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` as the host copy of a tensor bound for ``device``: pinned (page-locked) for a CUDA GPU."""
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        return t.pin_memory()
    return t


def check_dtype(device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a base-model dtype the device cannot run (ValueError, one line)."""
    if device.type == "mps" and dtype == torch.bfloat16 and not _mps_bf16():
        raise ValueError("--dtype bfloat16 on mps needs macOS 14 or later (this torch reports no MPS bfloat16); "
                         "use --dtype float16 or float32")


def _mps_bf16() -> bool:
    try:
        torch.zeros(1, dtype=torch.bfloat16, device="mps")
        return True
    except (RuntimeError, TypeError):
        return False


def resolve(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) for ``--device`` and ``--dtype`` values; ValueError names what is not available."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    where = resolve_device(device)
    check_dtype(where, DTYPES[dtype])
    return where, DTYPES[dtype]
