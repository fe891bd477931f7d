"""LoRA-SB: Initialization using Update Approximation is a Silver Bullet for Extremely Efficient Low-Rank
Fine-Tuning (Ponkshe, Singhal et al., arXiv:2411.19557).

Update rule: LoRA-XS's h = W x + s · B R A x, B [out, r] and A [r, in] frozen, only R [r, r] trained (r² per
module), initialised from the first update of full fine-tuning: ΔW₁ = −η₁ · sign(Σ_batches dL/dW) (Adam's first
step at learning rate η₁ = ``first_step_lr``). Its truncated SVD U_r S_r V_r^T gives B = U_r, A = V_r^T
(orthonormal) and R = S_r / s, so the model starts at W + (best rank-r approximation of ΔW₁); W is not offset,
as in the official code. Initialise with ``lorakit.init.calibrate(model, config, batches, loss_fn)``.

``apply`` alone (as when a file is loaded, which then overwrites the factors) starts from the orthonormal SVD
factors of W (B = U_r, A = V_r^T) with R = 0, and warns at the first training forward that calibration is missing.

Deviations: R = S_r / s rather than S_r, so every lora_alpha gives the same start (identical to the official
code, which sets lora_alpha = r); exact SVD in fp32 rather than torch.svd_lowrank(niter=10) followed by a cast
to bf16. The official code sums per-sample gradients of 50 examples; any batching gives the same sign up to
the batch-mean scaling, so ``calibrate`` sums the per-batch gradients of the batches it is given.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.capabilities import LOW_RANK
from ..core.config import LoRAConfig
from ..core.registry import METHODS
from .lora_xs import LoRAXSLinear, oriented, top_svd


@dataclass(frozen=True)
class LoRASBConfig(LoRAConfig):
    """LoRA-SB: LoRA-XS factors initialised from the truncated SVD of the first full fine-tuning step."""

    peft_type: ClassVar[str] = "LORAKIT_LORA_SB"
    method: ClassVar[str] = "lora_sb"

    first_step_lr: float = 1e-4  # η₁; the official scripts use lr / warmup steps


@METHODS.register()
class LoRASBLinear(LoRAXSLinear):
    """LoRA-SB on ``nn.Linear`` and ``Conv1D``; ``calibrate_(gradient)`` sets the factors from dL/dW."""

    name = "lora_sb"
    capabilities = LOW_RANK
    config_class = LoRASBConfig
    calibration: ClassVar[str] = "gradient"
    param_formula = "r²"

    def __init__(self, base_layer, config, module_path=""):
        super().__init__(base_layer, config, module_path)
        self.calibrated = False
        self._warned = False

    def initial_factors(self, weight):
        u, _, vh = top_svd(weight, self.r, self.module_path)
        return vh, torch.zeros(self.r, self.r), u

    def calibrate_(self, gradient: torch.Tensor) -> None:
        """Set B, R, A from the summed gradient dL/dW of the base weight (in the weight's layout)."""
        step = -self.config.first_step_lr * torch.sign(oriented(gradient, self.config).float())
        u, s, vh = top_svd(step, self.r, self.module_path)
        self.set_factors(vh, torch.diag(s) / self.scaling, u)
        self.calibrated = True

    def load_adapter_tensors(self, tensors):
        super().load_adapter_tensors(tensors)
        self.calibrated = True

    def forward(self, x, *args, **kwargs):
        if self.training and not (self.calibrated or self._warned):
            warnings.warn(
                f"LoRA-SB module '{self.module_path}' is training without calibration; build the model with "
                "lorakit.init.calibrate(model, config, batches, loss_fn) to start from the first-gradient update",
                stacklevel=2,
            )
            self._warned = True
        return super().forward(x, *args, **kwargs)
