"""FLoRA: Federated fine-tuning of LLMs with heterogeneous low-rank adaptations (Wang et al., arXiv:2409.05976).

Rule (stacking): A_s = [p_1 s_1 A_1; ...; p_K s_K A_K] (rows), B_s = [B_1, ..., B_K] (columns), so
B_s A_s = sum_k p_k s_k B_k A_k exactly, for any mix of client ranks. The stacked adapter (rank sum_k r_k,
scaling 1) is merged into the base weights and every client starts a fresh LoRA the next round.
Deviation from the official code (ATP-1010/FederatedLLM, ``fed_utils/model_aggregation.py``): it multiplies
p_k into A_k and keeps alpha/r by setting r = K r, alpha = K alpha, which is only right when all clients share
one scaling; we fold each client's own s_k into its A rows and give the stack scaling 1, which is exact always.
"""
from __future__ import annotations

import torch

from ...core.state import AdapterState
from ..aggregation import factors, strategy, with_factors, with_ranks


@strategy("flora", restart=True, mixed_ranks=True)
def flora(states: list[AdapterState], weights: list[float]) -> AdapterState:
    """Stack the clients' factors (A rows weighted by p_k s_k): the exact weighted sum of updates."""
    tensors, ranks = {}, {}
    for path in states[0].tensors:
        parts = [factors(s, path) for s in states]
        a = torch.cat([w * s * a for (a, _, s), w in zip(parts, weights)], dim=0)
        b = torch.cat([b for _, b, _ in parts], dim=1)
        tensors[path] = with_factors(states[0].tensors[path], a, b)
        ranks[path] = a.shape[0]
    return AdapterState(with_ranks(states[0].config, ranks), tensors)
