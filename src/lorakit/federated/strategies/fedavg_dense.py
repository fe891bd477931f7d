"""Dense FedAvg of the updates: the reference every factor-level strategy is measured against.

Rule: ΔW = sum_k p_k s_k B_k A_k, formed densely ([out, in]), then written back as an exact factorisation
(SVD, keeping every singular value above float64 round-off: rank <= min(sum_k r_k, out, in), scaling 1).
Like FLoRA it is merged into the base, and clients start a fresh adapter each round. The factor form is only
how the result is stored; a dense implementation would ship ΔW itself (out * in numbers per module).
Secure form: each client contributes its dense s_k B_k A_k (out * in numbers per module, so the uplink grows
from r (in + out)); the server factors the weighted mean, truncated to rank sum_k r_k over the aggregated
clients. The plain aggregate has at most that rank, so by Eckart-Young the truncation moves the result by at most
twice the quantisation error of the mean (in Frobenius norm) and removes the full-rank quantisation noise.
"""
from __future__ import annotations

import torch

from ...core.state import AdapterState
from ..aggregation import exact_update, secure_form, strategy, update_of, with_factors, with_ranks


def exact_factors(delta: torch.Tensor, max_rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B @ A == delta, of the numerical rank of ``delta`` (at least 1; at most ``max_rank``)."""
    u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
    tol = sv.max() * max(delta.shape) * torch.finfo(delta.dtype).eps if sv.numel() else 0.0
    rank = max(1, min(int((sv > tol).sum()), max_rank or len(sv)))
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


def encode(state: AdapterState, config) -> AdapterState:
    """The client's dense update s_k B_k A_k per module (float64)."""
    tensors = {path: {"delta": update_of(state, path)} for path in state.tensors}
    return AdapterState(config, tensors, state.modules_to_save, state.base_tensors)


def decode(mean: AdapterState, reference: AdapterState, ranks) -> AdapterState:
    """The weighted mean of the dense updates as factors of rank <= sum of the clients' ranks."""
    tensors, out_ranks = {}, {}
    for path, ref in reference.tensors.items():
        a, b = exact_factors(mean.tensors[path]["delta"].double(), sum(ranks))
        tensors[path] = with_factors(ref, a, b)
        out_ranks[path] = a.shape[0]
    return AdapterState(with_ranks(reference.config, out_ranks), tensors, mean.modules_to_save, mean.base_tensors)


secure_form("fedavg_dense", encode, decode)
