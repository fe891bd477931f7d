"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., arXiv:2402.09353).

Update rule: W' = m · (W + s·BA) / ||W + s·BA||_c, with the column norm taken per output unit and, as in the
paper's section 4.3 and PEFT, detached from the graph. m starts as ||W + s·BA||_c, so the adapter starts as
the identity. Forward follows PEFT's ``DoraLinearLayer``: h = W x + (m/n − 1) · W x + (m/n) · s · B A x
(bias added once). Stored as PEFT's LoRA with ``use_dora=True`` and a ``lora_magnitude_vector`` [out].
Layers: ``nn.Linear`` and ``Conv1D``; embeddings and convolutions are refused with a clear error.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import dense_weight
from ..core.capabilities import MERGE_ONLY
from ..core.config import DoRAConfig, LoRAConfig
from ..core.registry import METHODS
from .lora import LoRALinear, lora_delta


def _oriented(weight: torch.Tensor, config: LoRAConfig) -> torch.Tensor:
    """The base weight as [out, in]."""
    return weight.T if config.fan_in_fan_out else weight


def dora_delta(tensors: dict[str, torch.Tensor], config: LoRAConfig, base_weight: Optional[torch.Tensor]) -> torch.Tensor:
    """W' − W for a DoRA layer, in the base weight's layout."""
    if base_weight is None:
        raise ValueError("DoRA's update depends on the base weight: pass base_weight")
    w = _oriented(base_weight, config).to(tensors["lora_A.weight"].dtype)
    lora = _oriented(lora_delta(tensors, config, base_weight), config)
    combined = w + lora
    scale = tensors["lora_magnitude_vector"] / combined.norm(p=2, dim=1)
    delta = scale[:, None] * combined - w
    return delta.T if config.fan_in_fan_out else delta


@METHODS.register()
class DoRALinear(LoRALinear):
    """DoRA on ``nn.Linear`` and ``Conv1D``: LoRA's direction update plus a learned magnitude per output."""

    name = "dora"
    capabilities = MERGE_ONLY
    config_class = DoRAConfig
    tensor_names = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
    param_formula = "r·(in+out) + out"

    def reset_parameters(self) -> None:
        super().reset_parameters()
        with torch.no_grad():
            norm = self._weight_norm()
        if "lora_magnitude_vector" in self._parameters:
            self.lora_magnitude_vector.data.copy_(norm)
        else:
            self.lora_magnitude_vector = nn.Parameter(norm.clone())

    @classmethod
    def delta(cls, tensors, config, base_weight):
        return dora_delta(tensors, config, base_weight)

    @classmethod
    def low_rank(cls, tensors, config):
        return None  # the magnitude rescales W itself: the update is not low-rank

    def _weight_norm(self) -> torch.Tensor:
        w = _oriented(dense_weight(self.base_layer), self.config).to(self.lora_A.weight.dtype)
        lora = self.lora_B.weight @ self.lora_A.weight
        return (w + self.scaling * lora).norm(p=2, dim=1)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled or self.r == 0:
            return result
        x = x.to(self.lora_A.weight.dtype)
        bias = self.base_layer.bias
        mag_scale = self.lora_magnitude_vector / self._weight_norm().detach()
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            # with result = W x + b, the output m/|W + sBA| (W x + s B A x) + b is g (result + s B A x) + (1 - g) b
            # for g = m/|.|: no second base product, and one [.., out] tensor kept for backward (PEFT's form keeps two)
            out = mag_scale * (result.to(x.dtype) + self.lora_B(self.lora_A(x) * self.scaling))
            return (out + (1 - mag_scale) * bias.to(x.dtype) if bias is not None else out).to(result.dtype)
        # dropout: the update sees the dropped-out input, the base output the full one (as PEFT)
        x = self.lora_dropout(x)
        base_result = F.linear(x, _oriented(dense_weight(self.base_layer), self.config).to(x.dtype))
        lora_out = self.lora_B(self.lora_A(x) * self.scaling)
        return result + (mag_scale * (base_result + lora_out) - base_result).to(result.dtype)
