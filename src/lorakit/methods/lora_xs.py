"""LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters (Bałazy et al., arXiv:2405.17604).

Update rule: h = W x + s · B R A x with s = lora_alpha / r; B [out, r] and A [r, in] are frozen at the truncated
SVD of the base weight (W ≈ U_r S_r V_r^T, B = U_r, A = S_r V_r^T, as the official code after converting its
W^T convention) and only R [r, r] trains: r² parameters per module, whatever the layer's width. R starts at
N(0, 1e-5²) as in the official code, so the output moves by ~1e-5 at initialisation (``identity_at_init`` is
False); ``init_lora_weights=False`` leaves R at nn.Linear's random initialisation.

Deviations: the SVD is exact (``torch.linalg.svd`` in fp32) rather than sklearn's randomized TruncatedSVD
(n_iter=10): deterministic, and the same factors up to the signs of singular-vector pairs. The frozen factors
are buffers. Files are lorakit files (``LORAKIT_LORA_XS``); ``lora_R`` has no PEFT equivalent. This module also
holds the three-factor layer that LoRA-SB and NLoRA reuse (``middle`` names the r x r tensor).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core.adapter import Adapter, linear_factor
from ..core.capabilities import LOW_RANK
from ..core.config import LoRAConfig
from ..core.registry import METHODS
from .lora import Conv1D

Factors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # A [r, in], middle [r, r], B [out, r]


@dataclass(frozen=True)
class LoRAXSConfig(LoRAConfig):
    """LoRA-XS: frozen SVD factors of the base weight around a trainable r x r matrix."""

    peft_type: ClassVar[str] = "LORAKIT_LORA_XS"
    method: ClassVar[str] = "lora_xs"


def oriented(weight: torch.Tensor, config: LoRAConfig) -> torch.Tensor:
    """A base weight as [out, in]."""
    return weight.T if config.fan_in_fan_out else weight


def top_svd(matrix: torch.Tensor, r: int, where: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r, S_r, V_r^T) of an [out, in] matrix, in fp32."""
    if r > min(matrix.shape):
        raise ValueError(f"module '{where}': rank r={r} exceeds min(out, in)={min(matrix.shape)} of the weight")
    u, s, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    return u[:, :r], s[:r], vh[:r]


@METHODS.register()
class LoRAXSLinear(Adapter):
    """LoRA-XS on ``nn.Linear`` and ``Conv1D``: h = W x + s · B M A x with a trainable r x r middle M."""

    name = "lora_xs"
    capabilities = LOW_RANK
    config_class = LoRAXSConfig
    layer_types = (nn.Linear,) + ((Conv1D,) if isinstance(Conv1D, type) else ())
    identity_at_init = False
    middle: ClassVar[str] = "lora_R"
    tensor_names = ("lora_A.weight", "lora_B.weight", "lora_R.weight")
    param_formula = "r²"

    def __init__(self, base_layer: nn.Module, config: LoRAConfig, module_path: str = ""):
        super().__init__(base_layer, config, module_path)
        self.r, self.scaling = config.r, config.scaling
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.reset_parameters()

    # -- what variants change ---------------------------------------------------------------------
    def factors_trainable(self) -> bool:
        """Whether A and B train along with the middle matrix."""
        return False

    def initial_factors(self, weight: torch.Tensor) -> Factors:
        """(A, middle, B) in fp32 from the base weight [out, in]."""
        u, s, vh = top_svd(weight, self.r, self.module_path)
        middle = torch.randn(self.r, self.r) * 1e-5 if self.config.init_lora_weights is not False else None
        return s[:, None] * vh, middle, u

    # -- shared machinery -------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        w = self.base_layer.weight
        a, middle, b = self.initial_factors(oriented(w.detach(), self.config).float())
        if middle is None:
            middle = nn.Linear(self.r, self.r, bias=False).weight.detach()
        kw = dict(device=w.device, dtype=self.adapter_dtype())
        trainable = self.factors_trainable()
        self.lora_A = linear_factor(a.to(**kw), trainable)
        self.lora_B = linear_factor(b.to(**kw), trainable)
        setattr(self, self.middle, linear_factor(middle.to(**kw), True))

    def set_factors(self, a: torch.Tensor, middle: torch.Tensor, b: torch.Tensor) -> None:
        """Overwrite the three factors in place (shapes unchanged)."""
        with torch.no_grad():
            for module, value in ((self.lora_A, a), (getattr(self, self.middle), middle), (self.lora_B, b)):
                module.weight.copy_(value)

    @classmethod
    def factors(cls, tensors, config):
        """(M A [r, in], B [out, r], s): the update as a LoRA pair."""
        return tensors[f"{cls.middle}.weight"] @ tensors["lora_A.weight"], tensors["lora_B.weight"], config.scaling

    @classmethod
    def delta(cls, tensors, config, base_weight):
        a, b, s = cls.factors(tensors, config)
        delta = b @ a * s
        return delta.T if config.fan_in_fan_out else delta

    @classmethod
    def low_rank(cls, tensors, config):
        return cls.factors(tensors, config)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """The unscaled update B M A x for an input already in the adapter's dtype (after dropout)."""
        return self.lora_B(getattr(self, self.middle)(self.lora_A(x)))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled or self.r == 0:
            return result
        x = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        return result + (self.update(x) * self.scaling).to(result.dtype)
