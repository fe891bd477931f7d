"""Task-vector mergers on the dense updates: ties, dare_linear, dare_ties, magnitude_prune.

Each input's update τ_i = s_i B_i A_i (its "task vector") is sparsified, weighted, and summed or merged by sign
consensus; the dense result is re-factored to ``rank`` (default: the largest input rank, as PEFT's ``*_svd``).
- TIES-Merging (Yadav et al., arXiv:2306.01708): keep the top ``density`` fraction of each τ_i by magnitude,
  elect a sign per entry (``majority="total"``: the sign of Σ w_i τ̂_i; ``"frequency"``: the sign of the count),
  then average the entries that agree with it (the disjoint mean). Default density 0.2 (the paper's top-20%).
- DARE (Yu et al., arXiv:2311.03099): drop each entry with probability 1 − density and rescale the rest by
  1/density; ``dare_linear`` sums, ``dare_ties`` adds TIES's sign election and disjoint mean. Default density 0.5
  (the paper drops 90% on 7B models; small models tolerate less). Masks come from a generator seeded by
  ``seed`` and the module path, so results are reproducible and independent of the module order.
- ``magnitude_prune`` (PEFT's name): TIES's trim step, then the weighted sum.
The global scale λ of these papers is the weights (TIES's result is linear in them).

Deviations: PEFT elects signs on the unweighted trimmed τ̂_i; we elect on the weighted w_i τ̂_i (as mergekit's
"sum" consensus), so an adapter given a negative weight votes with its negated update. The two agree when the
weights are equal and positive (tested against PEFT's ``ties_svd``, ``magnitude_prune_svd`` and merge_utils).
PEFT's ``ties``/``dare_*``/``magnitude_prune`` without ``_svd`` apply these steps to A and B separately, which is
not the task vector of either paper; we do not offer that.
"""
from __future__ import annotations

from typing import Optional

import torch

from .protocol import MergeError, max_rank, merger
from .lowrank import factorize

# name: (sparsification, sign consensus) — also the ``inner`` choices of knots
VARIANTS = {
    "task_arithmetic": (None, False), "magnitude_prune": ("magnitude", False), "ties": ("magnitude", True),
    "dare_linear": ("random", False), "dare_ties": ("random", True),
}


def combine_task_vectors(tvs: torch.Tensor, weights, variant: str, density: float = 1.0, majority: str = "total",
                         generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Merge stacked task vectors ``tvs`` [n, ...] by one of ``VARIANTS``."""
    how, consensus = VARIANTS[variant]
    if not 0 < density <= 1:
        raise MergeError(f"density must be in (0, 1], found {density}")
    if majority not in ("total", "frequency"):
        raise MergeError(f"majority must be 'total' or 'frequency', found {majority!r}")
    if how == "magnitude" and density < 1:
        tvs = torch.stack([t * _top_mask(t, density) for t in tvs])
    elif how == "random" and density < 1:
        tvs = torch.stack([t * torch.bernoulli(torch.full_like(t, density), generator=generator) / density for t in tvs])
    weighted = tvs * torch.tensor(weights, dtype=tvs.dtype).view(-1, *[1] * (tvs.dim() - 1))
    if not consensus:
        return weighted.sum(0)
    votes = weighted.sum(0) if majority == "total" else weighted.sign().sum(0)
    agree = weighted.sign() == torch.where(votes >= 0, 1.0, -1.0)
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def _top_mask(t: torch.Tensor, density: float) -> torch.Tensor:
    """1 at the int(density · numel) entries of largest magnitude (PEFT's count), 0 elsewhere."""
    mask = torch.zeros(t.numel(), dtype=t.dtype)
    mask[t.abs().flatten().topk(int(density * t.numel())).indices] = 1
    return mask.view_as(t)


def _dense(parts, weights, variant, rank, **kw):
    merged = combine_task_vectors(torch.stack([p.dense() for p in parts]), weights, variant, **kw)
    return factorize(merged, rank or max_rank(parts))


@merger("ties", averages=True, exact={"density": 1.0})
def ties(parts, weights, density: float = 0.2, majority: str = "total", rank: Optional[int] = None):
    """TIES: trim, elect sign, disjoint mean."""
    return _dense(parts, weights, "ties", rank, density=density, majority=majority)


@merger("magnitude_prune", exact={"density": 1.0})
def magnitude_prune(parts, weights, density: float = 0.2, rank: Optional[int] = None):
    """Keep the largest entries of each update, then sum."""
    return _dense(parts, weights, "magnitude_prune", rank, density=density)


@merger("dare_linear", exact={"density": 1.0}, random=True, order_invariant=False)
def dare_linear(parts, weights, generator, density: float = 0.5, rank: Optional[int] = None):
    """DARE: random drop and rescale, then sum."""
    return _dense(parts, weights, "dare_linear", rank, density=density, generator=generator)


@merger("dare_ties", averages=True, exact={"density": 1.0}, random=True, order_invariant=False)
def dare_ties(parts, weights, generator, density: float = 0.5, majority: str = "total", rank: Optional[int] = None):
    """DARE drop and rescale, then TIES's sign election and disjoint mean."""
    return _dense(parts, weights, "dare_ties", rank, density=density, majority=majority, generator=generator)
