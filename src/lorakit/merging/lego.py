"""LoRA-LEGO: Merging LoRAs like Playing LEGO (Zhao et al., ICLR 2025, arXiv:2409.16167).

Per module: split every input into rank-1 units (column b_j of B, row a_j of A; ΔW = Σ_j b_j a_jᵀ, so units
commute and stacking equals summing), pool the units of all inputs, cluster them into k clusters (k-means), and
build a rank-k adapter whose units are the cluster centroids. Dual reweighting: (1) parameter reweighting
rescales each centroid half to the mean L2 norm of its members' halves (a mean of non-parallel vectors is
shorter than they are: the paper's "norm decay"); (2) output reweighting multiplies the update by √(r̄/k), r̄
the inputs' mean rank, since a sum of k units has k/r̄ times the output variance of an input's r̄ units.

Choices the paper leaves open, and ours:
- Gauge and sign: (t·b, a/t) and (−b, −a) are the same unit, so before clustering each unit is scaled to
  ‖b‖ = ‖a‖ (= √(|c|‖b‖‖a‖), c = w_i s_i folding in the input's weight and scaling) and its sign fixed so that the
  largest-magnitude entry of [b; a] is positive. Clustering is then blind to how training split the scale.
- Features: the concatenation [b; a], Euclidean k-means (k-means++ seeding from ``seed``, ``n_init`` restarts,
  Lloyd's iterations to convergence). Units are sorted into a canonical order first, so the result does not
  depend on the order of ranks inside an input nor on the order of the inputs.
- Heterogeneous ranks: r̄ is the mean number of non-zero units of the inputs that adapt the module. Zero units
  (e.g. an untrained B) are dropped. k defaults to the largest input rank (the paper merges into rank r).
- Weights scale units (c above), so with k = Σ r_i and no reweighting, lego equals cat exactly.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .protocol import max_rank, merger


def units(parts, weights) -> tuple[torch.Tensor, int, float]:
    """The balanced, sign-canonical units [N, out + in] of all inputs (float64), out, and r̄."""
    rows, counts = [], []
    for p, w in zip(parts, weights):
        b, a = p.b.double().T, p.a.double()  # [r, out], [r, in]
        nb, na = b.norm(dim=1), a.norm(dim=1)
        c = w * p.scale
        keep = (nb > 0) & (na > 0) & (c != 0)
        if keep.any():
            t = (abs(c) * na[keep] / nb[keep]).sqrt()
            rows.append(torch.cat([b[keep] * t[:, None], a[keep] * (c / t)[:, None]], dim=1))  # b t (c/t) aᵀ = c b aᵀ
            counts.append(int(keep.sum()))
    out = parts[0].b.shape[0]
    if not rows:
        return torch.zeros(0, out + parts[0].a.shape[1], dtype=torch.float64), out, 0.0
    u = torch.cat(rows)
    peak = u.gather(1, u.abs().argmax(dim=1, keepdim=True))
    u = u * torch.where(peak < 0, -1.0, 1.0)
    order = np.lexsort(u.numpy().T[::-1])  # canonical order: lexicographic on the entries
    return u[torch.from_numpy(order.copy())], out, sum(counts) / len(counts)


def kmeans(x: torch.Tensor, k: int, generator: torch.Generator, n_init: int = 4, iters: int = 100) -> torch.Tensor:
    """Cluster labels [N] from the best of ``n_init`` k-means++-seeded Lloyd runs (deterministic given x)."""
    best, best_cost = None, float("inf")
    for _ in range(n_init):
        centres = x[torch.randint(len(x), (1,), generator=generator)]
        while len(centres) < k:
            d2 = torch.cdist(x, centres).min(dim=1).values ** 2
            if d2.sum() <= 0:  # fewer distinct units than k
                break
            centres = torch.cat([centres, x[torch.multinomial(d2, 1, generator=generator)]])
        labels = None
        for _ in range(iters):
            new = torch.cdist(x, centres).argmin(dim=1)
            if labels is not None and torch.equal(new, labels):
                break
            labels = new
            centres = torch.stack([x[labels == j].mean(0) if (labels == j).any() else centres[j] for j in range(len(centres))])
        cost = ((x - centres[labels]) ** 2).sum().item()
        if cost < best_cost:
            best, best_cost = labels, cost
    return best


def _renorm(v: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """``v`` rescaled to L2 norm ``norm`` (a zero vector stays zero)."""
    n = v.norm()
    return v * (norm / n) if n > 0 else v


@merger("lego", averages=True, random=True)
def lego(parts, weights, generator, rank: Optional[int] = None, param_reweight: bool = True,
         output_reweight: bool = True, n_init: int = 4):
    """Cluster the inputs' rank-1 units into ``rank`` centroids and reassemble them into one adapter."""
    u, out, r_mean = units(parts, weights)
    k = min(rank or max_rank(parts), len(u))
    if k == 0:
        return parts[0].a[:0], parts[0].b[:, :0]
    labels = torch.arange(len(u)) if k == len(u) else kmeans(u, k, generator, n_init)
    b_cols, a_rows = [], []
    for j in dict.fromkeys(labels.tolist()):  # clusters in order of their first unit: canonical
        members = u[labels == j]
        b, a = members[:, :out], members[:, out:]
        cb, ca = b.mean(0), a.mean(0)
        if param_reweight:
            cb, ca = _renorm(cb, b.norm(dim=1).mean()), _renorm(ca, a.norm(dim=1).mean())
        b_cols.append(cb)
        a_rows.append(ca)
    scale = (r_mean / len(b_cols)) ** 0.5 if output_reweight else 1.0
    return (torch.stack(a_rows) * scale).float(), torch.stack(b_cols, dim=1).float()
