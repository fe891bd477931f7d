"""Dense FedAvg of the updates: the reference every factor-level strategy is measured against.

Rule: ΔW = sum_k p_k s_k B_k A_k, formed densely ([out, in]), then written back as an exact factorisation
(SVD, keeping every singular value above float64 round-off: rank <= min(sum_k r_k, out, in), scaling 1).
Like FLoRA it is merged into the base, and clients start a fresh adapter each round. The factor form is only
how the result is stored; a dense implementation would ship ΔW itself (out * in numbers per module).
"""
from __future__ import annotations

import torch

from ...core.state import AdapterState
from ..aggregation import exact_update, strategy, with_factors, with_ranks


def exact_factors(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B @ A == delta, of the numerical rank of ``delta`` (at least 1)."""
    u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
    tol = sv.max() * max(delta.shape) * torch.finfo(delta.dtype).eps if sv.numel() else 0.0
    rank = max(1, int((sv > tol).sum()))
    return vh[:rank], u[:, :rank] * sv[:rank]


@strategy("fedavg_dense", restart=True, mixed_ranks=True)
def fedavg_dense(states: list[AdapterState], weights: list[float]) -> AdapterState:
    """Average the dense updates s_k B_k A_k; store the result as its exact SVD factors."""
    tensors, ranks = {}, {}
    for path in states[0].tensors:
        a, b = exact_factors(exact_update(states, weights, path))
        tensors[path] = with_factors(states[0].tensors[path], a, b)
        ranks[path] = a.shape[0]
    return AdapterState(with_ranks(states[0].config, ranks), tensors)
