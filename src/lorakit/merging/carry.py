"""What a merge carries over besides the low-rank updates: ``modules_to_save`` and trained biases.

Both are full tensors, so they are not merged like updates: ``policy`` None keeps them when every adapter that
has them agrees (and refuses otherwise), "drop" leaves them out, "mean" takes the weighted average over the
adapters that have them, and an integer takes them from that adapter.
"""
from __future__ import annotations

from typing import Union

import torch

from .protocol import MergeError


def carry_full_modules(states: list, weights: list[float], policy: Union[None, str, int]):
    """``modules_to_save`` and trained biases, by ``policy``: None (must agree), "drop", "mean", or an input index."""
    groups = []
    for attr in ("modules_to_save", "base_tensors"):
        nested = attr == "modules_to_save"
        # base tensors are flat {name: tensor}: nest them under one key to share the per-module logic
        items = [getattr(s, attr) if nested else {"": s.base_tensors} for s in states]
        merged = _merge_full(items, weights, policy, attr)
        groups.append(merged if nested else merged.get("", {}))
    mts, base = groups
    names = sorted({n for s in states for n in (s.config.modules_to_save or [])}) if mts else None
    bias = next((s.config.bias for s in states if s.config.bias != "none"), "none") if base else "none"
    return (mts, base), {"modules_to_save": names, "bias": bias}


def _merge_full(items: list[dict], weights: list[float], policy, what: str) -> dict:
    if policy == "drop" or not any(items):
        return {}
    if isinstance(policy, int) and not isinstance(policy, bool):
        if not 0 <= policy < len(items):
            raise MergeError(f"modules_to_save={policy}: there are {len(items)} adapters (0 to {len(items) - 1})")
        return {p: dict(d) for p, d in items[policy].items()}
    out = {}
    for path in dict.fromkeys(p for d in items for p in d):
        holders = [(w, d[path]) for w, d in zip(weights, items) if path in d]
        keys = {k for _, t in holders for k in t}
        if policy == "mean":
            total = sum(w for w, _ in holders)
            if total == 0:
                raise MergeError(f"{what} '{path}': the weights of the adapters holding it sum to zero")
            out[path] = {k: sum(w * t[k].float() for w, t in holders).div(total).to(holders[0][1][k].dtype) for k in keys}
        elif policy is None:
            ref = holders[0][1]
            if any(set(t) != set(ref) or not all(torch.equal(t[k], ref[k]) for k in ref) for _, t in holders[1:]):
                raise MergeError(
                    f"{what} '{path}' differs between the adapters; pass modules_to_save='mean', 'drop' or the "
                    "index of the adapter to take it from"
                )
            out[path] = dict(ref)
        else:
            raise MergeError(f"modules_to_save={policy!r}: expected None, 'drop', 'mean' or an adapter index")
    return out
