"""OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models (Büyükakyüz, arXiv:2406.01775).

Init rule: with the QR decomposition W = Q R, B = Q[:, :r] (orthonormal columns) and A = R[:r]; the base
weight keeps W_res = W − s·B A (output unchanged at step 0). As PEFT's ``olora_init``. Deviation from PEFT:
for ``Conv1D`` layers (weight stored [in, out]) we decompose W in the [out, in] layout; PEFT decomposes the
stored matrix, which gives factors of the wrong shape unless in == out.
"""
from __future__ import annotations

import torch

from ..core.registry import INITIALIZERS
from .initializer import Initializer, base_matrix, lora_pairs, rank_of, set_factors


def olora_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) from the reduced QR decomposition of ``weight`` [out, in] (fp32)."""
    q, upper = torch.linalg.qr(weight)
    return upper[:r], q[:, :r]


@INITIALIZERS.register()
class OLoRA(Initializer):
    """Orthonormal B and the matching rows of R as the adapter, the rest as the frozen residual."""

    name = "olora"
    mutates_base = True

    @classmethod
    def run(cls, model, calibration=None, settings=None):
        for adapter in lora_pairs(model, cls.name).values():
            weight, r = base_matrix(adapter), rank_of(adapter, cls.name)
            a, b = olora_factors(weight, r)
            set_factors(adapter, a, b, subtract=True, init_name=cls.name)
        return model
