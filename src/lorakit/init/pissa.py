"""PiSSA: Principal Singular Values and Singular Vectors Adaptation (Meng et al., arXiv:2404.02948).

Init rule: with W = U S Vᵀ, A = diag(√(S_r/s)) V_rᵀ and B = U_r diag(√(S_r/s)), so s·B A is the best rank-r
approximation of W; the base weight keeps the residual W_res = W − s·B A (output unchanged at step 0).
``init_lora_weights="pissa"`` uses the exact SVD, ``"pissa_niter_<k>"`` torch's randomised ``svd_lowrank``
with k power iterations (the paper's fast SVD), as PEFT does. Deviation from PEFT: the randomised SVD runs
under a fixed seed, so the same base weight always gives the same factors (and re-applying an unconverted
PiSSA adapter on load reproduces W_res exactly).
"""
from __future__ import annotations

import re
from typing import Optional

import torch

from ..core.apply import config_of
from ..core.registry import INITIALIZERS
from .initializer import Initializer, base_matrix, lora_pairs, rank_of, scaling_of, seeded, set_factors

SEED = 0


def pissa_factors(weight: torch.Tensor, r: int, scaling: float, niter: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) from the top-r singular triplets of ``weight`` [out, in] (fp32)."""
    if niter is None:
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        with seeded(SEED, weight.device):
            u, s, v = torch.svd_lowrank(weight, q=r, niter=niter)
        vh = v.T
    root = torch.sqrt(s / scaling)
    return root[:, None] * vh, u * root[None, :]


@INITIALIZERS.register()
class PiSSA(Initializer):
    """Principal singular components of W as the adapter, the rest as the frozen residual."""

    name = "pissa"
    mutates_base = True

    @classmethod
    def accepts(cls, value: str) -> bool:
        return value == "pissa" or re.fullmatch(r"pissa_niter_\d+", value) is not None

    @classmethod
    def run(cls, model, calibration=None, settings=None):
        value = config_of(model).init_lora_weights
        niter = int(value.rsplit("_", 1)[1]) if value != "pissa" else None
        for adapter in lora_pairs(model, value).values():
            weight, r = base_matrix(adapter), rank_of(adapter, value)
            a, b = pissa_factors(weight, r, scaling_of(adapter), niter)
            set_factors(adapter, a, b, subtract=True, init_name=value)
        return model
