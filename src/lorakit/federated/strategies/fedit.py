"""FedIT: federated instruction tuning with LoRA (Zhang et al., arXiv:2305.05644), the common baseline.

Rule: A_g = sum_k p_k A_k and B_g = sum_k p_k B_k, key-wise over every adapter tensor (what Flower's FedAvg does
to an adapter's state dict). Not exact: B_g A_g - sum_k p_k B_k A_k = -1/2 sum_{k,l} p_k p_l (B_k - B_l)(A_k - A_l).
Works for any method, since it never forms factors; clients must share one config (rank and scaling).
Secure form: the weighted mean of the tensors is the aggregate itself.
"""
from __future__ import annotations

from ...core.state import AdapterState
from ..aggregation import keep_mean, secure_form, strategy, weighted_sum


def same_config(states: list[AdapterState], name: str) -> None:
    """Raise unless every client trained with client 0's config (ranks, scaling, targets)."""
    first = states[0].config.to_dict()
    for k, s in enumerate(states[1:], 1):
        other = s.config.to_dict()
        diff = sorted(f for f in first if first[f] != other.get(f))
        if diff:
            raise ValueError(
                f"strategy '{name}' needs one adapter config for all clients; client {k} differs from client 0 in "
                f"{', '.join(f'{f}={other.get(f)!r} (client 0: {first[f]!r})' for f in diff[:4])}"
            )


@strategy("fedit")
def fedit(states: list[AdapterState], weights: list[float]) -> AdapterState:
    """Weighted average of A and B separately (FedAvg on the adapter's tensors)."""
    same_config(states, "fedit")
    return AdapterState(states[0].config, weighted_sum([s.tensors for s in states], weights))


secure_form("fedit", lambda state, config: state, keep_mean)
