"""Factor algebra shared by the mergers: exact stacking, and best rank-k re-factoring (Eckart–Young).

Factors are ``(A [k, in], B [out, k])`` with ΔW = B A. Re-factored results follow PEFT's convention
``B = U diag(S)``, ``A = Vᵀ``; the SVD runs in float64 and the result comes back as float32.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .protocol import Factors, Part


def stack(parts: Sequence[Part], weights: Sequence[float]) -> Factors:
    """Σ w_i s_i B_i A_i exactly, at rank Σ r_i: A = [w_1 s_1 A_1; …], B = [B_1 … B_n] (PEFT's ``cat``)."""
    a = torch.cat([p.a * w * p.scale for p, w in zip(parts, weights)], dim=0)  # PEFT's order: bit-equal tensors
    b = torch.cat([p.b for p in parts], dim=1)
    return a, b


def truncate(a: torch.Tensor, b: torch.Tensor, rank: int) -> Factors:
    """The best rank-``rank`` factors of B A, from QR of the factors (never forms the dense [out, in] update)."""
    if a.shape[0] == 0:
        return a, b
    qb, rb = torch.linalg.qr(b.double())  # [out, m], [m, R]
    qa, ra = torch.linalg.qr(a.double().T)  # [in, n], [n, R]
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)  # B A = qb (u s vh) qaᵀ
    k = min(rank, s.numel())
    return (vh[:k] @ qa.T).float(), (qb @ (u[:, :k] * s[:k])).float()


def factorize(delta: torch.Tensor, rank: int) -> Factors:
    """The best rank-``rank`` factors of a dense update ``delta`` [out, in]."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = min(rank, s.numel())
    return vh[:k].float(), (u[:, :k] * s[:k]).float()
