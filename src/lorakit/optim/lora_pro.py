"""LoRA-Pro: Are Low-Rank Adapters Properly Optimized? (Wang, Liang, Tan; arXiv:2407.18242).

A step on (A, B) moves W, to first order, by -lr·g̃ with the equivalent gradient g̃ = s(B g_A + g_B A).
LoRA-Pro adjusts (g_A, g_B) so that g̃ is the least-squares closest to the full gradient G. With the LoRA
gradients g_A = s BᵀG and g_B = s G Aᵀ (all it needs; G is never formed):
    g_A* = (1/s²)(BᵀB)⁻¹ g_A + X A,    g_B* = (1/s²)[I - B(BᵀB)⁻¹Bᵀ] g_B (AAᵀ)⁻¹ - B X,
which give g̃ = P_B G + (I - P_B) G P_A, the projection of G onto {B Y + Z A}; X (free in the optimum set) is the
solution of the Sylvester equation (BᵀB) X + X (AAᵀ) = -(1/s²)(BᵀB)⁻¹ g_A Aᵀ, which makes (g_A*, g_B*) the
closest to the plain LoRA gradients. The AdamW integration follows the official code
(mrflogs/LoRA-Pro, DeepSpeed ``lorapro_full_adjustment``): per layer, full-size [out, in] Adam moments of g̃
give g_adam = m̂/(sqrt(v̂)+eps); g_adam is treated as the full gradient, adjusted again (with X), and A, B take a
plain SGD step with it. Parameters outside LoRA pairs (heads, biases) take an ordinary AdamW step.

Memory: the moments cost 2·out·in floats per adapted layer, what full fine-tuning's AdamW state costs (the
paper's stated cost); ``state_bytes()`` reports it and bench/training_strategies.py measures it.
Deviations from the official code, each because it is more exact: s is the adapter's own scale (the release
hard-codes 2 even for rsLoRA); inverses are ``pinv`` without the +1e-8·I jitter (B = 0 at step 0 gives
P_B = 0, the paper's step-0 rule, without a special case); weight decay is decoupled (p ← p·(1 - lr·wd)), the
released scripts use 0.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import OPTIMIZERS, adam_direction, decay_groups, lora_pairs, split


def solve_sylvester(P: torch.Tensor, Q: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """X with P X + X Q = C for symmetric positive semi-definite P [r, r] and Q [r, r] (eigen-decompositions);
    entries whose eigenvalue sum is 0 (no unique solution) are set to 0."""
    lp, U = torch.linalg.eigh(P)
    lq, V = torch.linalg.eigh(Q)
    denom = lp[:, None] + lq[None, :]
    Y = U.T @ C @ V
    Y = torch.where(denom.abs() > 0, Y / torch.where(denom == 0, 1.0, denom), torch.zeros_like(Y))
    return U @ Y @ V.T


def adjust(A: torch.Tensor, B: torch.Tensor, gA: torch.Tensor, gB: torch.Tensor, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-Pro's optimal (g_A*, g_B*) from the LoRA gradients gA [r, in] and gB [out, r] (in fp32)."""
    A, B, gA, gB = A.float(), B.float(), gA.float(), gB.float()
    BtB_inv, AAt_inv = torch.linalg.pinv(B.T @ B), torch.linalg.pinv(A @ A.T)
    X = solve_sylvester(B.T @ B, A @ A.T, -(BtB_inv @ gA @ A.T) / s**2)
    gA_new = BtB_inv @ gA / s**2 + X @ A
    gB_proj = gB - B @ (BtB_inv @ (B.T @ gB))  # [I - B(BᵀB)⁻¹Bᵀ] g_B, without the [out, out] projector
    gB_new = gB_proj @ AAt_inv / s**2 - B @ X
    return gA_new, gB_new


def equivalent_gradient(A: torch.Tensor, B: torch.Tensor, gA: torch.Tensor, gB: torch.Tensor, s: float) -> torch.Tensor:
    """g̃ = s(B g_A + g_B A) [out, in]: the change of W that a step on (A, B) makes, per unit of lr."""
    return s * (B.float() @ gA.float() + gB.float() @ A.float())


@OPTIMIZERS.register()
class LoRAPro(torch.optim.Optimizer):
    """LoRA-Pro with full-size Adam moments per LoRA pair; AdamW on everything else."""

    name = "lora_pro"
    summary = "LoRA-Pro: equivalent gradient fit to the full one, Adam inside (full-size moments)"

    @classmethod
    def from_model(cls, model: nn.Module, lr: float, weight_decay: float = 0.0) -> "LoRAPro":
        """One group per LoRA pair (its scale recorded) and decay groups for the rest."""
        pairs = lora_pairs(model, plain_linear=True)
        if not pairs:
            raise ValueError("lora_pro: the model has no trainable LoRA pair; apply LoRAConfig first")
        for pair in pairs:
            if pair.A.dim() != 2:
                raise ValueError(f"lora_pro: module '{pair.path}' has a {pair.A.dim()}-d lora_A; only linear layers")
        _, _, rest = split(model, pairs)
        groups = [{"params": [p.A, p.B], "scale": p.scale, "weight_decay": weight_decay} for p in pairs]
        return cls(groups + decay_groups(rest, weight_decay, scale=None), lr=lr)

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, scale=None))

    def state_bytes(self) -> int:
        """Bytes held by the optimiser state (the full-size moments dominate)."""
        return sum(t.numel() * t.element_size() for st in self.state.values() for t in st.values() if torch.is_tensor(t))

    @torch.no_grad()
    def step(self, closure=None):
        """Adjust each pair's gradients through the full-size Adam moments and step; AdamW for the rest."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, betas, eps = group["lr"], group["weight_decay"], group["betas"], group["eps"]
            if group["scale"] is None:
                for p in group["params"]:
                    if p.grad is not None:
                        p.mul_(1 - lr * wd).add_(adam_direction(self.state[p], p.grad, betas, eps), alpha=-lr)
                continue
            A, B = group["params"]
            if A.grad is None or B.grad is None:
                continue
            s = group["scale"]
            gA, gB = adjust(A, B, A.grad, B.grad, s)
            g_adam = adam_direction(self.state[A], equivalent_gradient(A, B, gA, gB, s), betas, eps)
            gA, gB = adjust(A, B, s * (B.float().T @ g_adam), s * (g_adam @ A.float().T), s)
            for p, g in ((A, gA), (B, gB)):
                p.mul_(1 - lr * wd).add_(g.to(p.dtype), alpha=-lr)
        return loss
