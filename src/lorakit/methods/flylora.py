"""FlyLoRA: Boosting Task Decoupling and Parameter Efficiency via Implicit Rank-Wise Mixture-of-Experts
(Zou et al., NeurIPS 2025, arXiv:2510.08396).

Update rule: z = A x with A [r, in] frozen, sparse and random (the implicit router); each token keeps the
top-k ranks by z + d (d: a frozen per-rank balancing bias), h = W x + (lora_alpha / r) · B (mask_k ⊙ z),
B [out, r] trained from zero. Each row of A has p = in·k/r non-zeros at random places, drawn N(0, 1/r²).
After each training forward, d_i += bias_u · sign(mean(c) − c_i), c_i = tokens that chose rank i.

Decisions, against the official repository (gfyddha/FlyLoRA, whose PEFT fork ran the paper's experiments):
the routing key is the fork's signed z + d by default. Its reference ``flylora.py`` ranks |z + d| instead,
but with the additive balancing rule that key diverges: a rank chosen too often is pushed to negative d,
which raises |z + d| and gets it chosen more (the claim tests show it; |d| grows without bound). For a
sign-free key, ``route_by="magnitude"`` ranks |z| + d, which keeps the rule stable. The balancing bias
moves in training mode only (the fork also moves it in eval), by the mean-count rule of ``flylora.py``;
``bias_u`` defaults to 1e-3, the authors' MMLU script and reference file (the fork's default is 0.01);
``top_k`` defaults to r/4, the paper's 8 of 32. The gradient reaches the layer input through A (the fork
computes z under ``no_grad``, which cuts that path). The fork's merge folds s·B·A with all ranks on into the
weight, which differs from the forward pass whenever top_k < r; here the update is input-dependent, so FlyLoRA
declares no capabilities: merging, LoRA export, serving and factor-wise aggregation refuse (``delta`` raises).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import Adapter, NotMergeableError
from ..core.capabilities import NONE
from ..core.config import AdapterConfig
from ..core.registry import METHODS
from .lora import Conv1D


@dataclass(frozen=True)
class FlyLoRAConfig(AdapterConfig):
    """FlyLoRA: frozen sparse random A as router, the top_k of r ranks active per token, B trained."""

    peft_type: ClassVar[str] = "LORAKIT_FLYLORA"
    method: ClassVar[str] = "flylora"

    r: int = 32
    lora_alpha: float = 64
    lora_dropout: float = 0.0
    top_k: Optional[int] = None  # active ranks per token; None: r // 4
    bias_u: float = 1e-3
    route_by: str = "signed"  # or "magnitude": |z| + d

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.route_by not in ("magnitude", "signed"):
            raise ValueError(f"FlyLoRAConfig.route_by must be 'magnitude' or 'signed', found {self.route_by!r}")

    @property
    def k(self) -> int:
        """Active ranks per token for this (per-module) rank."""
        k = self.top_k if self.top_k is not None else max(1, self.r // 4)
        if not 1 <= k <= self.r:
            raise ValueError(f"FlyLoRAConfig.top_k must be between 1 and r={self.r}, found {k}")
        return k

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r


@METHODS.register()
class FlyLoRALinear(Adapter):
    """FlyLoRA on ``nn.Linear`` and transformers' ``Conv1D``."""

    name = "flylora"
    capabilities = NONE
    config_class = FlyLoRAConfig
    layer_types = (nn.Linear,) + ((Conv1D,) if isinstance(Conv1D, type) else ())
    tensor_names = ("lora_A.weight", "lora_B.weight", "lora_topk_bias")
    param_formula = "r·out (B; A is frozen and sparse)"

    def __init__(self, base_layer: nn.Module, config: FlyLoRAConfig, module_path: str = ""):
        super().__init__(base_layer, config, module_path)
        w = base_layer.weight
        self.out_features, self.in_features = self.features()
        self.k = config.k
        kw = dict(device=w.device, dtype=self.adapter_dtype())
        self.lora_A = nn.Module()  # a buffer, not a parameter: no optimiser or set_trainable can unfreeze it
        self.lora_A.register_buffer("weight", torch.zeros(config.r, self.in_features, **kw))
        self.lora_B = nn.Linear(config.r, self.out_features, bias=False, **kw)
        self.register_buffer("lora_topk_bias", torch.zeros(config.r, **kw))
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        r, n = self.lora_A.weight.shape
        p = max(1, n * self.k // r)  # non-zeros per row: density k/r
        a = self.lora_A.weight
        with torch.no_grad():
            places = torch.rand(r, n, device=a.device).argsort(dim=1)[:, :p]
            a.zero_().scatter_(1, places, torch.randn(r, p, device=a.device, dtype=a.dtype) / r)
            self.lora_B.weight.zero_()
            self.lora_topk_bias.zero_()

    @classmethod
    def delta(cls, tensors, config, base_weight):
        raise NotMergeableError(f"'{cls.name}' keeps the top-{config.k} of {config.r} ranks per token: its update has no single ΔW")

    def route(self, z: torch.Tensor) -> torch.Tensor:
        """Indices [..., k] of the ranks each token keeps."""
        with torch.no_grad():
            key = z if self.config.route_by == "signed" else z.abs()
            return (key + self.lora_topk_bias).topk(self.k, dim=-1).indices

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        z = F.linear(self.lora_dropout(x.to(self.lora_B.weight.dtype)), self.lora_A.weight)
        chosen = self.route(z)
        if self.training:  # assignment balancing without an auxiliary loss
            with torch.no_grad():
                counts = torch.bincount(chosen.flatten(), minlength=z.shape[-1]).to(z.dtype)
                self.lora_topk_bias.add_(self.config.bias_u * torch.sign(counts.mean() - counts))
        gate = torch.zeros_like(z).scatter_(-1, chosen, 1.0)
        return result + (self.lora_B(z * gate) * self.config.scaling).to(result.dtype)
