"""NOLA: Compressing LoRA using Linear Combination of Random Basis (first titled "Networks as Linear Combination
of Low Rank Random Basis"; Koohpayegani et al., arXiv:2310.02556).

Update rule: ΔW = (lora_alpha / r) · B A with A = A0 + Σ_{i≤k} α_i A_i and B = Σ_{j≤l} β_j B_j, where the
bases A_i [r, in], B_j [out, r] are U(-1, 1)/sqrt(k) (resp. sqrt(l)) drawn from a per-layer seed and never
stored; only α (``num_basis_A``) and β (``num_basis_B``) train, from zero, so ΔW = 0 at first. A0 is a frozen
Kaiming-uniform matrix (nn.Linear's default), also drawn from the seed: with A0 = 0 both gradients would be
zero at the start. As in the official ``GenerateParams``, the bases are drawn again in the backward pass
(dL/dα_i = <dL/dA, A_i>), so no k·r·in tensor is kept for backward.

Decisions: the official code keeps A0 as a trained-layer weight drawn from the global RNG (saved with the
checkpoint); here A0 comes from the layer seed, so a file holds only α, β and ``nola_key`` = (seed, out, in),
the layer's seed derived from ``nola_seed`` and its module path. Bases are drawn on the CPU in fp32 and
moved, so a file gives the same update on every device (the official code draws on the device). The
paper's 4-bit quantised bases and coefficient quantisation are not implemented. Defaults follow the
official code (1024 bases each; the paper's GPT-2 runs use 512 with r = 8, alpha = 8).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import Adapter
from ..core.capabilities import LOW_RANK
from ..core.config import AdapterConfig
from ..core.registry import METHODS
from .lora import Conv1D


@dataclass(frozen=True)
class NOLAConfig(AdapterConfig):
    """NOLA: LoRA factors as seeded random-basis combinations; ``num_basis_A + num_basis_B`` weights per layer."""

    peft_type: ClassVar[str] = "LORAKIT_NOLA"
    method: ClassVar[str] = "nola"

    lora_alpha: float = 8
    lora_dropout: float = 0.0
    num_basis_A: int = 1024
    num_basis_B: int = 1024
    nola_seed: int = 0

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r


def _draw(seed: int, stream: int, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """U(-1, 1) of ``shape`` from (seed, stream), on the CPU in fp32, then moved to ``like``."""
    g = torch.Generator().manual_seed(seed * 3 + stream)
    return (torch.rand(shape, generator=g) * 2 - 1).to(like)


class _Combination(torch.autograd.Function):
    """Σ_i c_i · basis_i, the bases drawn from the seed in forward and drawn again in backward."""

    @staticmethod
    def forward(ctx, coef: torch.Tensor, seed: int, stream: int, shape: tuple) -> torch.Tensor:
        ctx.save_for_backward(coef)
        ctx.key = (seed, stream, shape)
        bases = _draw(seed, stream, (coef.numel(), *shape), coef) / math.sqrt(coef.numel())
        return torch.einsum("k,k...->...", coef, bases)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (coef,) = ctx.saved_tensors
        seed, stream, shape = ctx.key
        bases = _draw(seed, stream, (coef.numel(), *shape), coef) / math.sqrt(coef.numel())
        return torch.einsum("...,k...->k", grad.to(coef.dtype), bases), None, None, None


def nola_factors(tensors: dict, config: NOLAConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) of one layer from its coefficients and ``nola_key``."""
    alpha, beta = tensors["nola_alpha"], tensors["nola_beta"]
    seed, out_f, in_f = (int(v) for v in tensors["nola_key"])
    r = config.r
    a0 = _draw(seed, 0, (r, in_f), alpha) / math.sqrt(in_f)  # nn.Linear's Kaiming-uniform bound 1/sqrt(in)
    a = a0 + _Combination.apply(alpha, seed, 1, (r, in_f))
    return a, _Combination.apply(beta, seed, 2, (out_f, r))


@METHODS.register()
class NOLALinear(Adapter):
    """NOLA on ``nn.Linear`` and transformers' ``Conv1D``."""

    name = "nola"
    capabilities = LOW_RANK
    config_class = NOLAConfig
    layer_types = (nn.Linear,) + ((Conv1D,) if isinstance(Conv1D, type) else ())
    tensor_names = ("nola_alpha", "nola_beta", "nola_key")
    param_formula = "num_basis_A + num_basis_B (any r, any width)"

    def __init__(self, base_layer: nn.Module, config: NOLAConfig, module_path: str = ""):
        super().__init__(base_layer, config, module_path)
        w = base_layer.weight
        out_f, in_f = self.features()
        seed = (config.nola_seed * 1_000_003 + zlib.crc32(module_path.encode())) % 2**40
        kw = dict(device=w.device, dtype=self.adapter_dtype())
        self.nola_alpha = nn.Parameter(torch.zeros(config.num_basis_A, **kw))
        self.nola_beta = nn.Parameter(torch.zeros(config.num_basis_B, **kw))
        self.register_buffer("nola_key", torch.tensor([seed, out_f, in_f], device=w.device))
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.nola_alpha.zero_()
            self.nola_beta.zero_()

    @classmethod
    def low_rank(cls, tensors, config):
        a, b = nola_factors(tensors, config)
        return a, b, config.scaling

    @classmethod
    def delta(cls, tensors, config, base_weight):
        a, b = nola_factors(tensors, config)
        delta = b @ a * config.scaling
        return delta.T if config.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        a, b = nola_factors(self.adapter_tensors(), self.config)
        h = self.lora_dropout(x.to(a.dtype))
        return result + (F.linear(F.linear(h, a), b) * self.config.scaling).to(result.dtype)
