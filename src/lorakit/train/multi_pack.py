"""Bin-packing of rows into micro-batches by padded tokens.

A micro-batch pads every row to its longest, so its cost is ``rows × longest`` tokens, plus a fixed cost per
micro-batch (one pass of every layer's kernels, hooks and Python: on one CPU core about what 30-60 tokens of
MiniLM cost, measured in bench/multi_job.py). With the rows sorted longest first, some best packing cuts that
order into runs (a row never gains from sharing a micro-batch with a longer row than the next one up), so
``pack`` chooses the cuts by dynamic programming: the fewest padded tokens plus ``overhead`` tokens per
micro-batch, each within ``max_tokens`` (a row longer than that gets a micro-batch of its own). First-fit
decreasing, the usual greedy rule, fills each micro-batch to the budget with rows far shorter than its first:
on the bundled tweets with 4 jobs (bench/multi_job.py) it padded 29% over the real tokens, this rule 11%. LoRAFusion
balances micro-batches across pipeline stages with a MILP; one process only needs little padding and few
micro-batches, which this gives exactly for its cost model.
"""
from __future__ import annotations

from typing import Callable, Sequence, TypeVar

Row = TypeVar("Row")

OVERHEAD_TOKENS = 48


def pack(rows: Sequence[Row], max_tokens: int, length: Callable[[Row], int],
         overhead: int = OVERHEAD_TOKENS) -> list[list[Row]]:
    """Micro-batches of ``rows`` with ``len(batch) * max(length) <= max_tokens``, least padded tokens plus
    ``overhead`` per micro-batch (longest rows first)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    order = sorted(rows, key=length, reverse=True)  # stable: equal lengths keep their order
    lens = [length(row) for row in order]
    best, cut = [0] + [float("inf")] * len(order), [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):  # best[end]: cheapest packing of the first `end` rows
        for start in range(end - 1, -1, -1):  # run order[start:end] padded to lens[start]
            size = end - start
            if size > 1 and size * lens[start] > max_tokens:
                break  # longer runs only grow
            cost = best[start] + size * lens[start] + overhead
            if cost < best[end]:
                best[end], cut[end] = cost, start
    bins, end = [], len(order)
    while end:
        bins.append(order[cut[end]:end])
        end = cut[end]
    return bins[::-1]
