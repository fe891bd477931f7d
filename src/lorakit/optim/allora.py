"""ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws (Huang, Balestriero; arXiv:2410.09692).

Update rule: LoRA with no dropout and no scaling factor (s = 1), trained with AdamW whose step for each row
θ_i of every A and B factor is multiplied by 1 / sqrt(||θ_i||² + 1/η²): a zero row (B at initialisation) moves
η times faster, a row of norm ρ ≫ 1/η about 1/ρ times as fast. Heads and biases take the plain AdamW step.

Decisions (no official code is public; the abstract says the per-parameter gradient is scaled by a coefficient
inversely proportional to the parameter's ℓ2 norm):
* granularity: one norm per row of A [r, in] and of B [out, r] (per output unit of each factor), computed on the
  parameter before the step;
* the coefficient scales the AdamW *update* (a norm-adaptive learning rate), not the gradient fed to Adam: Adam
  divides out a slowly varying gradient scale, which would leave the method a no-op; with SGD both are equal;
* dropout and scaling are refused rather than ignored: the adapter must have lora_dropout = 0 and s = 1
  (lora_alpha = r, no rsLoRA), as the paper defines the method.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import OPTIMIZERS, decay_groups, lora_pairs, split


@OPTIMIZERS.register()
class ALLoRA(torch.optim.AdamW):
    """AdamW whose step on each row of A and B is divided by sqrt(||row||² + 1/eta²)."""

    name = "allora"
    summary = "ALLoRA: per-row step x 1/sqrt(|row|^2 + 1/eta^2); needs s = 1 and no dropout"

    @classmethod
    def from_model(cls, model: nn.Module, lr: float, weight_decay: float = 0.0, eta: float = 4.0) -> "ALLoRA":
        """Check the adapter is dropout- and scaling-free, then group A/B (norm-adaptive) and the rest."""
        if eta <= 0:
            raise ValueError(f"allora: eta must be > 0, got {eta}")
        pairs = lora_pairs(model, plain_linear=True)
        if not pairs:
            raise ValueError("allora: the model has no trainable LoRA pair; apply LoRAConfig first")
        for pair in pairs:
            dropout = getattr(pair.adapter.lora_dropout, "p", 0.0)
            if pair.scale != 1.0 or dropout:
                raise ValueError(
                    f"allora: module '{pair.path}' has scaling {pair.scale:g} and dropout {dropout:g}; ALLoRA is "
                    "LoRA without both: use lora_alpha = r (no rsLoRA) and lora_dropout = 0"
                )
        a, b, rest = split(model, pairs)
        groups = decay_groups(a + b, weight_decay, norm_adaptive=True) + decay_groups(rest, weight_decay, norm_adaptive=False)
        return cls(groups, lr=lr, eta=eta)

    def __init__(self, params, lr: float = 1e-3, eta: float = 4.0, **kwargs):
        super().__init__(params, lr=lr, **kwargs)
        for group in self.param_groups:
            group.setdefault("eta", eta)
            group.setdefault("norm_adaptive", True)

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step, then each adaptive row's displacement scaled by its coefficient."""
        before, coeffs = [], []
        for group in self.param_groups:
            if not group["norm_adaptive"]:
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                rows = p.reshape(p.shape[0], -1)
                coeff = (rows.square().sum(1) + group["eta"] ** -2).rsqrt()
                before.append((p, p.detach().clone()))
                coeffs.append(coeff.view(-1, *([1] * (p.dim() - 1))))
        loss = super().step(closure)
        for (p, old), coeff in zip(before, coeffs):
            p.copy_(old + (p - old) * coeff)
        return loss
