"""LoRA-GA: Low-Rank Adaptation with Gradient Approximation (Wang et al., arXiv:2407.05000).

Init rule: G = dL/dW averaged over calibration batches; G ≈ U S Vᵀ; A = c·V[:, :r]ᵀ, B = c·U[:, r:2r] with
c = m^(1/4)/√γ (m = out features, γ = ``stable_gamma``); the base weight keeps W_res = W − s·B A. With
orthonormal A and B the first SGD step of LoRA moves W by −η s² c² (G AᵀA + B BᵀG) = −η s² c² G_2r: the best
rank-2r approximation of the full fine-tuning step (the paper's section 3.2).

Scaling: we follow the official code (Outsider565/LoRA-GA, ``LoraLayer.lora_ga_init``): raw singular vectors,
the stable factor c on both A and B. PEFT's port (``peft/tuners/lora/layer.py::lora_ga_init``, 0.21.2) instead
multiplies B by diag(S[r:2r]) and applies c to B only; then B BᵀG weighs component i by σ_i³ instead of σ_i
and the first step no longer approximates G_2r, which is the property the paper's derivation (and its
stability analysis, which scales both factors) rests on. tests/init/test_lora_ga.py measures both.
Other choices: directions ArB2r (default), A2rBr, ArBr and random (disjoint index sets for A and B, as the
official code; PEFT's port reuses one set). Scales: stable, gd_scale (official "gd": both / s), unit, and
weight_svd (official "weightS": both × mean √(σ_i(W)/s) over the top r; PEFT's weight_svd rescales B by
σ_1(W)/σ_B,1 instead). The SVD is ``svd_lowrank(q=min(4r, m, n), niter=4)`` as both codes, under a fixed
seed (deviation: deterministic). ``norm_clip`` (official, off by default) is not offered. The gradient is the
mean over calibration batches of the base model's loss gradient (adapters disabled), in fp32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.registry import INITIALIZERS
from .calibration import accumulate_gradients
from .initializer import Initializer, base_matrix, lora_pairs, rank_of, scaling_of, seeded, set_factors

SEED = 0
DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
SCALES = {"stable": "stable", "gd_scale": "gd_scale", "gd": "gd_scale", "unit": "unit", "weight_svd": "weight_svd",
          "weightS": "weight_svd"}


@dataclass(frozen=True)
class LoraGAConfig:
    """LoRA-GA settings, with PEFT's field names and the official defaults."""

    direction: str = "ArB2r"
    scale: str = "stable"
    stable_gamma: float = 16

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"LoraGAConfig.direction must be one of {DIRECTIONS}, found {self.direction!r}")
        if self.scale not in SCALES:
            raise ValueError(f"LoraGAConfig.scale must be one of {sorted(SCALES)}, found {self.scale!r}")


def _lowrank(matrix: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with seeded(SEED, matrix.device):
        return torch.svd_lowrank(matrix, q=q, niter=4)


def lora_ga_factors(grad: torch.Tensor, r: int, scaling: float, settings: LoraGAConfig,
                    weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) from the gradient ``grad`` [out, in] (fp32) and the base ``weight`` [out, in]."""
    m, n = grad.shape
    u, _, v = _lowrank(grad, min(4 * r, m, n))
    vh = v.T
    if settings.direction == "ArB2r":
        a_idx, b_idx = torch.arange(r), torch.arange(r, 2 * r)
    elif settings.direction == "A2rBr":
        a_idx, b_idx = torch.arange(r, 2 * r), torch.arange(r)
    elif settings.direction == "ArBr":
        a_idx, b_idx = torch.arange(1, 2 * r, 2), torch.arange(0, 2 * r, 2)
    else:
        perm = torch.randperm(2 * r, generator=torch.Generator().manual_seed(SEED))
        a_idx, b_idx = perm[:r], perm[r:]
    a, b = vh[a_idx.to(vh.device)], u[:, b_idx.to(u.device)]
    scale = SCALES[settings.scale]
    if scale == "stable":
        factor = m ** 0.25 / settings.stable_gamma ** 0.5
    elif scale == "gd_scale":
        factor = 1 / scaling
    elif scale == "weight_svd":
        _, s_w, _ = _lowrank(weight, min(4 * r, m, n))
        factor = torch.sqrt(s_w[:r] / scaling).mean().item()
    else:
        factor = 1.0
    return a * factor, b * factor


@INITIALIZERS.register()
class LoRAGA(Initializer):
    """A and B from the SVD of the full gradient on calibration batches; the offset leaves the base weight."""

    name = "lora_ga"
    needs_data = True
    mutates_base = True
    settings_class = LoraGAConfig

    @classmethod
    def run(cls, model, calibration=None, settings=None):
        settings = settings or LoraGAConfig()
        pairs = lora_pairs(model, cls.name)
        ranks = {p: rank_of(a, cls.name, needs=2) for p, a in pairs.items()}
        grads = accumulate_gradients(model, {p: a.base_layer for p, a in pairs.items()}, calibration)
        for path, adapter in pairs.items():
            grad = grads[path].T if adapter.config.fan_in_fan_out else grads[path]
            a, b = lora_ga_factors(grad, ranks[path], scaling_of(adapter), settings, base_matrix(adapter))
            set_factors(adapter, a, b, subtract=True, init_name=cls.name)
        return model
