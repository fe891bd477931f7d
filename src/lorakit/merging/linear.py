"""Mergers on the updates B A themselves: linear, task_arithmetic, cat (exact) and svd (re-factored).

All four compute the weighted sum Σ w_i s_i B_i A_i of the inputs' updates (Task Arithmetic, Ilharco et al.,
arXiv:2212.04089: λ Σ τ_i, with λ folded into the weights). Stacking the factors represents that sum exactly at
rank Σ r_i, so no cross terms B_i A_j appear. PEFT's ``linear`` differs on purpose: it combines A and B
separately (A = Σ √(w_i s_i) A_i, B likewise), so B A carries the cross terms and is not the weighted sum; its
``cat`` and ``svd`` equal our ``cat`` and ``svd`` (tested in tests/merging/test_peft_parity.py).

- ``linear``: the weighted average, Σ w_i ΔW_i / Σ w_i (mergekit's ``linear`` with normalize=True).
- ``task_arithmetic``: the weighted sum. ``rank=k`` re-factors it to its best rank-k approximation.
- ``cat``: the weighted sum stacked at rank Σ r_i, the tensors laid out as PEFT's ``cat``.
- ``svd``: the weighted sum re-factored to ``rank`` (default: the largest input rank, as PEFT). PEFT takes an
  SVD of the dense [out, in] sum; we take it from QR of the stacked factors, which is the same result (up to the
  signs of singular vectors) at O((out + in) (Σr)²) cost. PEFT's ``svd_clamp`` is not offered.
"""
from __future__ import annotations

from typing import Optional

from .protocol import MergeError, max_rank, merger
from .lowrank import stack, truncate


@merger("linear", averages=True)
def linear(parts, weights, rank: Optional[int] = None):
    """The weighted average of the updates (weights normalised to sum to 1)."""
    total = sum(weights)
    if abs(total) < 1e-12:
        raise MergeError(f"linear averages with weights / sum(weights), and the weights {weights} sum to zero; use task_arithmetic")
    return task_arithmetic(parts, [w / total for w in weights], rank)


@merger("cat")
def cat(parts, weights):
    """Exact stacking: rank Σ r_i."""
    return stack(parts, weights)


@merger("task_arithmetic")
def task_arithmetic(parts, weights, rank: Optional[int] = None):
    """The weighted sum of the updates (exact, or re-factored to ``rank``)."""
    a, b = stack(parts, weights)
    return (a, b) if rank is None else truncate(a, b, rank)


@merger("svd")
def svd(parts, weights, rank: Optional[int] = None):
    """The weighted sum re-factored to ``rank`` (default: the largest input rank)."""
    a, b = stack(parts, weights)
    return truncate(a, b, rank or max_rank(parts))
