"""LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for Parameter-Efficient Fine-Tuning
(Shi et al., arXiv:2410.13618).

Update rule: the pivoted LU of the base weight gives W = P L diag(D) U (L unit lower, U unit upper
triangular). With the first r components, L_r = (P L)[:, :r] [out, r], D_r, U_r [r, in], the adapted weight is
W − σ₀ L_r diag(D_r) U_r + σ L_r diag(z) U_r, i.e. ΔW = L_r diag(σ z − σ₀ D_r) U_r, where the diagonal z (r
values, initialised to D_r) is the only trained tensor: the model starts at W exactly.

Tensors: ``loldu_L`` = P L_r and ``loldu_U`` = U_r (frozen buffers), ``loldu_offset`` = σ₀ D_r (buffer),
``loldu_z`` (trained) and ``loldu_scale`` = σ, initialised to σ₀ = lora_alpha / r.

[UNVERIFIED] sigma: the official code makes σ a parameter but its optimiser filter (``get_loldu_params``) returns
only ``vector_z``, the σ variant being commented out; we follow the code: ``train_scale=False`` (default) keeps σ
a buffer, ``True`` trains it (r + 1 parameters). ``lora_alpha`` defaults to 1, as ``LoLDUParametrization.from_linear``.

Deviations: W is never edited (the official code stores the residual W − σ₀ P L_r diag(D_r) U_r as the base
weight); the same function is computed as W + ΔW, in activation space, with P folded into L_r as a row
permutation instead of a dense m x m matrix. Pivots below 1e-8 in magnitude are clamped before U is divided by
them (rank-deficient weights). z initialisations: ``init_method`` "lu" (default), "ones", "zeros", "constant"
(the mean of D_r); only "lu" starts at W. No dropout; Linear and Conv1D layers only.
"""
from __future__ import annotations

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
from .lora_xs import oriented

INIT_METHODS = ("lu", "ones", "zeros", "constant")


@dataclass(frozen=True)
class LoLDUConfig(AdapterConfig):
    """LoLDU: train only the diagonal of the first r LDU components of each weight."""

    peft_type: ClassVar[str] = "LORAKIT_LOLDU"
    method: ClassVar[str] = "loldu"

    lora_alpha: float = 1.0
    train_scale: bool = False
    init_method: str = "lu"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_method not in INIT_METHODS:
            raise ValueError(f"LoLDUConfig.init_method must be one of {INIT_METHODS}, found {self.init_method!r}")


def ldu(weight: torch.Tensor, r: int, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P L [:, :r], D[:r], U[:r] / D[:r]) of an [out, in] weight from its pivoted LU, in fp32."""
    p, lower, upper = torch.linalg.lu(weight.float())
    d = torch.diagonal(upper)[:r]
    safe = torch.where(d.abs() < eps, torch.where(d < 0, -eps, eps), d)
    rows = p.argmax(dim=1)  # (P L)[i] = L[rows[i]]: P is a permutation
    return lower[:, :r][rows], d, upper[:r] / safe[:, None]


@METHODS.register()
class LoLDULinear(Adapter):
    """LoLDU on ``nn.Linear`` and ``Conv1D``."""

    name = "loldu"
    capabilities = LOW_RANK
    config_class = LoLDUConfig
    layer_types = (nn.Linear,) + ((Conv1D,) if isinstance(Conv1D, type) else ())
    tensor_names = ("loldu_L", "loldu_U", "loldu_offset", "loldu_z", "loldu_scale")
    param_formula = "r (r + 1 with train_scale)"

    def __init__(self, base_layer: nn.Module, config: LoLDUConfig, module_path: str = ""):
        super().__init__(base_layer, config, module_path)
        self.r = config.r
        self.reset_parameters()

    def reset_parameters(self) -> None:
        w = oriented(self.base_layer.weight.detach(), self.config)
        if self.r > min(w.shape):
            raise ValueError(f"module '{self.module_path}': rank r={self.r} exceeds min(out, in)={min(w.shape)}")
        lower, d, upper = ldu(w, self.r)
        sigma = torch.tensor(self.config.lora_alpha / self.r)
        z = {"lu": d, "ones": torch.ones_like(d), "zeros": torch.zeros_like(d), "constant": d.mean().expand_as(d)}
        kw = dict(device=w.device, dtype=self.adapter_dtype())
        for name, value in (("loldu_L", lower), ("loldu_U", upper), ("loldu_offset", sigma * d)):
            self.register_buffer(name, value.to(**kw))
        self.loldu_z = nn.Parameter(z[self.config.init_method].clone().to(**kw))
        if self.config.train_scale:
            self.loldu_scale = nn.Parameter(sigma.to(**kw))
        else:
            self.register_buffer("loldu_scale", sigma.to(**kw))

    @staticmethod
    def diagonal(scale: torch.Tensor, z: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """σ z − σ₀ D_r: the diagonal of the update."""
        return scale * z - offset

    @classmethod
    def low_rank(cls, tensors, config):
        diagonal = cls.diagonal(tensors["loldu_scale"], tensors["loldu_z"], tensors["loldu_offset"])
        return diagonal[:, None] * tensors["loldu_U"], tensors["loldu_L"], 1.0

    @classmethod
    def delta(cls, tensors, config, base_weight):
        a, b, _ = cls.low_rank(tensors, config)
        delta = b @ a
        return delta.T if config.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled or self.r == 0:
            return result
        diagonal = self.diagonal(self.loldu_scale, self.loldu_z, self.loldu_offset)
        x = F.linear(x.to(self.loldu_U.dtype), self.loldu_U) * diagonal
        return result + F.linear(x, self.loldu_L).to(result.dtype)
