"""FFA-LoRA: Improving LoRA in privacy-preserving federated learning (Sun et al., arXiv:2403.12313).

Rule: every client keeps A frozen at one shared random init A0 and trains B only (from zero); the server sends
and receives B alone and computes B_g = sum_k p_k B_k. Exact, because the update is linear in B:
sum_k p_k s B_k A0 = s B_g A0. We check that the clients' A agree (to ``atol``) instead of trusting it, and
copy A rather than averaging it, so A stays bit-identical across rounds.
Extension beyond the paper (equal ranks there): a client of rank r_k uses the leading r_k rows of the shared
A0; B_k is zero-padded to r_max (s_k / s folded in), which keeps the aggregate exact for mixed ranks.
Secure form: B_k padded to the run's largest rank, s_k / s folded in (s: the reference scaling); the weighted
mean of those is B_g, and A is the shared A0 the server holds.
"""
from __future__ import annotations

from ...core.state import AdapterState
from ..aggregation import A_KEYS, encode_padded, factors, padded, secure_form, strategy, with_factors, with_ranks


@strategy("ffa_lora", mixed_ranks=True, shared=A_KEYS)
def ffa_lora(states: list[AdapterState], weights: list[float], atol: float = 0.0) -> AdapterState:
    """Average B; A is the shared frozen init (checked identical across clients)."""
    tensors, ranks, scales = {}, {}, {}
    for path in states[0].tensors:
        parts = [factors(s, path) for s in states]
        widest = max(range(len(parts)), key=lambda k: parts[k][0].shape[0])
        a0 = parts[widest][0]
        for k, (a, _, _) in enumerate(parts):
            diff = (a - a0[: a.shape[0]]).abs().max().item()
            if diff > atol:
                raise ValueError(
                    f"ffa_lora: client {k} has another A on module '{path}' than client {widest} (max difference "
                    f"{diff:.3g}); FFA-LoRA needs every client to freeze A at the same seeded init"
                )
        _, b_pad, scale = padded(parts)
        b = sum(w * b for b, w in zip(b_pad, weights))
        tensors[path] = with_factors(states[widest].tensors[path], a0, b)
        ranks[path], scales[path] = a0.shape[0], scale
    return AdapterState(with_ranks(states[0].config, ranks, scales), tensors)


def decode(mean: AdapterState, reference: AdapterState, ranks=()) -> AdapterState:
    """B_g from the weighted mean of the padded B_k; A the shared init at the largest rank."""
    tensors = {}
    for path, ref in reference.tensors.items():
        tensors[path] = {**mean.tensors[path], **{k: ref[k].clone() for k in ref if k in A_KEYS}}
    return AdapterState(reference.config, tensors, mean.modules_to_save, mean.base_tensors)


secure_form("ffa_lora", encode_padded, decode)
