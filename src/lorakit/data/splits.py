"""Seeded, machine-independent splitting and subsampling of example lists.

Order comes from SHA-256 of `"<seed>:<index>"`, not from a random generator, so a split is the same on every
machine and with every numpy or torch version.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence


def stable_permutation(n: int, seed: int) -> list[int]:
    """A permutation of range(n) fixed by `seed` alone."""
    return sorted(range(n), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest())


def carve(examples: Sequence[dict], fractions: Sequence[float], seed: int) -> list[list[dict]]:
    """Split `examples` into len(fractions) + 1 parts: one per fraction, then the rest (in that order)."""
    order = stable_permutation(len(examples), seed)
    parts, start = [], 0
    for fraction in fractions:
        size = round(fraction * len(examples))
        parts.append([examples[i] for i in order[start : start + size]])
        start += size
    parts.append([examples[i] for i in sorted(order[start:])])
    return parts


def subsample(examples: Sequence[dict], k: int | None, seed: int, stratify_by: str | None = None) -> list[dict]:
    """At most `k` examples, seeded; keeps the class proportions of `stratify_by` when given."""
    if k is None or k >= len(examples):
        return list(examples)
    order = stable_permutation(len(examples), seed)
    if stratify_by is None:
        return [examples[i] for i in sorted(order[:k])]
    by_class: dict[object, list[int]] = defaultdict(list)
    for i in order:
        by_class[examples[i][stratify_by]].append(i)
    # Largest-remainder quotas: each class gets floor(k * share), the leftovers go to the largest remainders.
    exact = {c: k * len(ids) / len(examples) for c, ids in by_class.items()}
    quota = {c: int(q) for c, q in exact.items()}
    leftovers = sorted(by_class, key=lambda c: (-(exact[c] - quota[c]), str(c)))
    for c in leftovers[: k - sum(quota.values())]:
        quota[c] += 1
    chosen = [i for c, ids in by_class.items() for i in ids[: quota[c]]]
    return [examples[i] for i in sorted(chosen)]
