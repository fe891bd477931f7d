"""Zero-padding: the heterogeneous-rank FedIT baseline that FLoRA (arXiv:2409.05976) compares against.

Rule: pad every client's A_k with zero rows and B_k with zero columns up to r_max, fold s_k / s into B_k, and
average A and B separately (FedIT on the padded factors, so not exact). A client of rank r_k < r_max then
continues from the leading r_k components of the global adapter (``client_app.receive``).
Deviation: the FLoRA repository pads and averages but scales the global adapter by alpha * r_max; we keep the
clients' common scaling s (or scaling 1 when they differ), so a client's truncated start is consistent.
Secure form: each client pads to the run's largest rank (not the round's) and folds s_k / s with s the reference
scaling, so the weighted mean of the padded factors is the aggregate; it equals the plain one whenever the
round's clients include one of the largest rank (always the same update s B A).
"""
from __future__ import annotations

from ...core.state import AdapterState
from ..aggregation import encode_padded, factors, keep_mean, padded, secure_form, strategy, with_factors, with_ranks


@strategy("zero_pad", mixed_ranks=True)
def zero_pad(states: list[AdapterState], weights: list[float]) -> AdapterState:
    """Pad all clients to the largest rank, then average A and B separately."""
    tensors, ranks, scales = {}, {}, {}
    for path in states[0].tensors:
        a_pad, b_pad, scale = padded([factors(s, path) for s in states])
        a = sum(w * a for a, w in zip(a_pad, weights))
        b = sum(w * b for b, w in zip(b_pad, weights))
        widest = max(states, key=lambda s: s.module_config(path).r)
        tensors[path] = with_factors(widest.tensors[path], a, b)
        ranks[path], scales[path] = a.shape[0], scale
    return AdapterState(with_ranks(states[0].config, ranks, scales), tensors)


secure_form("zero_pad", encode_padded, keep_mean)
