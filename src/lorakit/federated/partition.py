"""Splitting a labelled data set over clients with a Dirichlet label skew (Hsu et al., arXiv:1909.06335).

For each class, the share each client gets is drawn from Dir(alpha * 1): alpha -> 0 gives every client a
few classes, alpha -> inf an IID split. Draws repeat (seeded) until every client holds ``min_size`` examples.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def dirichlet_split(labels: Sequence[int], num_clients: int, alpha: float, seed: int = 0,
                    min_size: int = 1, attempts: int = 100) -> list[list[int]]:
    """Example indices per client; the same on every party for the same arguments."""
    if num_clients < 1 or alpha <= 0:
        raise ValueError(f"need num_clients >= 1 and alpha > 0, found {num_clients} and {alpha}")
    labels = np.asarray(labels)
    if len(labels) < num_clients * min_size:
        raise ValueError(f"{len(labels)} examples cannot give {num_clients} clients {min_size} each")
    rng = np.random.default_rng(seed)
    for _ in range(attempts):
        shards: list[list[int]] = [[] for _ in range(num_clients)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * num_clients))[:-1] * len(idx)).astype(int)
            for k, part in enumerate(np.split(idx, cuts)):
                shards[k].extend(int(i) for i in part)
        if min(len(s) for s in shards) >= min_size:
            return [sorted(s) for s in shards]
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split in {attempts} draws gave all {num_clients} clients {min_size} examples; "
        "raise alpha or lower min_size"
    )


def label_histogram(labels: Sequence[int], shards: Sequence[Sequence[int]], num_classes: int) -> np.ndarray:
    """[clients, classes] counts, for reports."""
    labels = np.asarray(labels)
    return np.stack([np.bincount(labels[list(s)], minlength=num_classes) for s in shards])
