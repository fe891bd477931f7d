"""Bin-packing of rows into micro-batches by padded tokens (first-fit decreasing).

A micro-batch pads every row to its longest, so its cost is ``rows × longest``. Rows sorted longest first fill
the first micro-batch whose cost stays within ``max_tokens`` with them; a row longer than ``max_tokens`` gets a
micro-batch of its own. LoRAFusion balances micro-batches across pipeline stages with a MILP; one process only
needs few micro-batches with little padding, which the greedy rule gives.
"""
from __future__ import annotations

from typing import Callable, Sequence, TypeVar

Row = TypeVar("Row")


def pack(rows: Sequence[Row], max_tokens: int, length: Callable[[Row], int]) -> list[list[Row]]:
    """Micro-batches of ``rows`` with ``len(batch) * max(length) <= max_tokens`` (longest rows first)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    bins: list[list[Row]] = []
    widths: list[int] = []
    for row in sorted(rows, key=length, reverse=True):  # stable: equal lengths keep their order
        n = length(row)
        for i, b in enumerate(bins):
            if (len(b) + 1) * widths[i] <= max_tokens:  # widths[i] >= n: rows arrive longest first
                b.append(row)
                break
        else:
            bins.append([row])
            widths.append(n)
    return bins
