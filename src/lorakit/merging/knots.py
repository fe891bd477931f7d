"""KnOTS: Model merging with SVD to tie the KnOTS (Stoica et al., arXiv:2410.19735).

Per module: M = [ΔW_1 … ΔW_n] (the updates side by side, [out, n·in]) = U S Vᵀ; each input becomes its block of
S Vᵀ, r̃_i = Uᵀ ΔW_i [K, in], in a basis shared by all inputs; a task-vector merge (``inner``: ties by default, or
any of task_arithmetic, magnitude_prune, dare_linear, dare_ties, with ``density``/``majority``) combines the
r̃_i; the merged update is U · merged. With ``inner="task_arithmetic"`` this is Σ w_i ΔW_i exactly. The result
is already low-rank (K ≤ Σ r_i), so it is stored without truncation unless ``rank`` is given.

Numerics: U and S come from an SVD of Rᵀ-sized factors (QR of [B_1 … B_n], then the small [K, n·in] core) in
float64, never from the dense [out, n·in] matrix; components with s ≤ 1e-9 · s_max are dropped (the official
code drops s ≤ 1e-5 absolute; a relative threshold does not depend on the updates' scale).
Deviation: the official code trims TIES's top-k over the whole model's concatenated representations; we trim
per module, like every other merger here (and PEFT and mergekit), so that a merge is a per-module function.
"""
from __future__ import annotations

from typing import Optional

import torch

from .protocol import MergeError, merger
from .lowrank import truncate
from .task_vectors import VARIANTS, combine_task_vectors


def shared_basis(parts) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """U [out, K] (left singular vectors of [ΔW_1 … ΔW_n]) and each input's representation Uᵀ ΔW_i [K, in]."""
    live = [p for p in parts if p.rank]
    q, r = torch.linalg.qr(torch.cat([p.b for p in live], dim=1).double())  # [out, m], [m, Σr]
    blocks, start = [], 0
    for p in live:  # R_i (s_i A_i): the input's update in the basis q
        blocks.append(r[:, start:start + p.rank] @ (p.a.double() * p.scale))
        start += p.rank
    u, s, _ = torch.linalg.svd(torch.cat(blocks, dim=1), full_matrices=False)
    u = u[:, s > 1e-9 * s.max()] if s.numel() and s.max() > 0 else u[:, :0]
    reps, it = [], iter(blocks)
    for p in parts:
        reps.append(u.T @ next(it) if p.rank else torch.zeros(u.shape[1], p.a.shape[1], dtype=u.dtype))
    return q @ u, reps


@merger("knots", averages=True, exact={"density": 1.0}, random=True)
def knots(parts, weights, generator, inner: str = "ties", density: float = 0.2, majority: str = "total",
          rank: Optional[int] = None):
    """Merge the inputs' representations in their shared SVD basis with ``inner``."""
    if inner not in VARIANTS:
        raise MergeError(f"knots: inner must be one of {', '.join(VARIANTS)}, found {inner!r}")
    if not any(p.rank for p in parts):
        return parts[0].a[:0], parts[0].b[:, :0]
    basis, reps = shared_basis(parts)
    merged = combine_task_vectors(torch.stack(reps).float(), weights, inner, density, majority, generator)
    a, b = merged, basis.float()
    return (a, b) if rank is None else truncate(a, b, rank)
