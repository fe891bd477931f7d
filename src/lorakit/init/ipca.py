"""Incremental PCA: principal components of a stream of row batches, updated one batch at a time.

Ross et al.'s incremental SVD with mean correction (the algorithm of scikit-learn's ``IncrementalPCA``): the
new batch, centred on its own mean, is stacked under the current components scaled by their singular values
and one row that accounts for the shift of the running mean; the top right-singular vectors of that small
matrix are the updated components. The SVD is torch's randomised ``svd_lowrank`` (q = 2k, 4 power
iterations) under a fixed seed, as EVA's official code and PEFT use, with each component's sign fixed so that
its largest-magnitude entry is positive. State is kept in fp64.
"""
from __future__ import annotations

from typing import Optional

import torch

from .initializer import seeded


class IncrementalPCA:
    """The top ``n_components`` principal directions of all rows seen so far."""

    def __init__(self, n_components: int, seed: int = 42, niter: int = 4):
        self.n_components = n_components
        self.seed, self.niter = seed, niter
        self.n_seen = 0
        self.mean: Optional[torch.Tensor] = None
        self.m2: Optional[torch.Tensor] = None  # per-feature sum of squared deviations from the mean
        self.components: Optional[torch.Tensor] = None  # [k, d]
        self.singular_values: Optional[torch.Tensor] = None  # [k]
        self.explained_variance_ratio: Optional[torch.Tensor] = None  # [k]

    @property
    def fitted(self) -> bool:
        return self.components is not None

    def partial_fit(self, x: torch.Tensor) -> None:
        """Fold the rows ``x`` [b, d] into the components."""
        x = x.double()
        b = x.shape[0]
        batch_mean = x.mean(dim=0)
        centred = x - batch_mean
        batch_m2 = centred.square().sum(dim=0)
        if self.components is None:
            stacked, total = centred, b
            self.mean, self.m2 = batch_mean, batch_m2
        else:
            n = self.n_seen
            total = n + b
            shift = self.mean - batch_mean
            correction = (n * b / total) ** 0.5 * shift
            stacked = torch.vstack((self.singular_values[:, None] * self.components, centred, correction[None]))
            self.m2 = self.m2 + batch_m2 + (n * b / total) * shift.square()
            self.mean = self.mean + shift * (-b / total)
        self.n_seen = total
        with seeded(self.seed, x.device):
            _, s, v = torch.svd_lowrank(stacked, q=2 * self.n_components, niter=self.niter)
        vh = v.T
        # sign convention: the largest-magnitude entry of each component is positive
        signs = torch.sign(vh.gather(1, vh.abs().argmax(dim=1, keepdim=True)))
        vh = vh * signs
        k = self.n_components
        self.components, self.singular_values = vh[:k], s[:k]
        self.explained_variance_ratio = s[:k].square() / self.m2.sum()
