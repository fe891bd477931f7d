"""Orthogonal initialisation: PEFT's ``init_lora_weights="orthogonal"`` (PEFT PR #2498; no paper, it follows the
blog post "Rethinking LoRA initialisation", datta0.github.io/posts/rethink-lora-init).

Init rule: Q from the QR decomposition of an r×r Gaussian; A = (G1 Q_odd)ᵀ / 10 and B = (G2ᵀ Q_even) / 10 with
Gaussian G1 [in, r/2] and G2 [r/2, out], Q_odd/Q_even the rows 0, 2, … and 1, 3, … of Q. The two row sets are
orthogonal, so B A = 0: the adapter starts as the identity with both factors non-zero, and the base weight is
untouched. r must be even. Random numbers come from torch's global generator, as in PEFT (seed it to repeat);
the draws are not PEFT's own sequence, since PEFT also draws its Kaiming init first.
"""
from __future__ import annotations

import torch

from ..core.registry import INITIALIZERS
from .initializer import Initializer, lora_pairs, rank_of, set_factors


def orthogonal_factors(r: int, in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) with B A = 0."""
    q, _ = torch.linalg.qr(torch.randn(r, r))
    a = (torch.randn(in_features, r // 2) @ q[0::2]).T / 10.0
    b = torch.randn(r // 2, out_features).T @ q[1::2] / 10.0
    return a, b


@INITIALIZERS.register()
class Orthogonal(Initializer):
    """Non-zero A and B whose product is zero."""

    name = "orthogonal"

    @classmethod
    def run(cls, model, calibration=None, settings=None):
        for path, adapter in lora_pairs(model, cls.name).items():
            r = rank_of(adapter, cls.name)
            if r % 2:
                raise ValueError(f"module '{path}': orthogonal initialisation needs an even r, found r={r}")
            tensors = adapter.adapter_tensors()
            a, b = orthogonal_factors(r, tensors["lora_A.weight"].shape[1], tensors["lora_B.weight"].shape[0])
            set_factors(adapter, a, b, subtract=False, init_name=cls.name)
        return model
