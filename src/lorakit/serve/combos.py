"""Per-request merged adapters (LoRAX's ``merged_adapters``): several adapters, weights and an exact strategy, served
as one adapter built by ``lorakit.merging`` and kept in the store's host cache and the active pool like any other.

Strategies: ``linear`` (Σ w_i ΔW_i / Σ w_i), ``task_arithmetic`` (Σ w_i ΔW_i) and ``cat`` (the same sum, PEFT's
layout). All three are exact in low-rank factors (the inputs' factors stacked at rank Σ r_i, ``merging.lowrank``),
so the served update is the merge itself; TIES, DARE, SVD and the others re-factor a dense result to a lower rank,
which would serve an approximation, so the schema refuses them (merge those offline with ``lorakit merge``).
Serving imports ``lorakit.merging`` here and only here: the merge arithmetic has one home.

A spec is normalised before anything else: the three strategies give the same update, ``linear``'s weights are
divided by their sum, and the (adapter version, weight) pairs are sorted, so ``{a: 1, b: 1}`` linear, ``{b: 0.5,
a: 0.5}`` task_arithmetic and ``{a: 2, b: 2}`` linear are one cache entry. The key holds each adapter's version, so a
reloaded adapter never reuses a merge of its old weights.

Cache policy (segmented LRU, bounded): a new spec enters a probation segment (a quarter of ``capacity``); a second
request for it while it is there promotes it to the protected segment (the rest). A new spec evicts the least
recently used probation entry that no queued or running request uses; a full protected segment demotes its least
recently used entry to probation. So a stream of one-off specs (a client varying weights on every request) churns
the probation segment only and cannot evict specs that are reused; only specs requested at least twice compete for
the protected segment. When every probation entry is in use, a new spec gets 429 (QueueFull). Eviction forgets the
spec in the store (host cache) and drops it from the pool once idle. Requests for merged adapters are counted in
``/metrics`` under one label (``kind="merged"``), whatever the spec, so clients cannot grow the label set.
"""
from __future__ import annotations

import hashlib
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..merging.protocol import MERGERS, Part
from .ops import pack_low_rank
from .pool import PackedAdapter
from .request import QueueFull, UnknownAdapter


@dataclass(frozen=True)
class MergeSpec:
    """A normalised merge: (adapter id with its version, weight) pairs sorted by id, merged as task arithmetic."""

    parts: tuple[tuple[str, float], ...]

    @property
    def aid(self) -> str:
        """The merged adapter's id (no ``#``, so never the id of a registered adapter, ``name#version``)."""
        return "merge:" + hashlib.sha256(repr(self.parts).encode()).hexdigest()[:24]


def normalise(store, names: Sequence[str], weights: Optional[Sequence[float]], strategy: str) -> MergeSpec:
    """The spec of a validated ``merged_adapters`` (schema.check_merge); UnknownAdapter names a missing adapter."""
    weights = [float(w) for w in weights] if weights is not None else [1.0] * len(names)
    if strategy == "linear":
        total = sum(weights)
        weights = [w / total for w in weights]
    aids = []
    for name in names:
        entry = store.entry(name)
        if entry is None:
            raise UnknownAdapter(f"merged_adapters: adapter '{name}' does not exist; GET /v1/models lists them")
        aids.append(entry.aid)
    return MergeSpec(tuple(sorted(zip(aids, weights))))


def build(spec: MergeSpec, packed: Sequence[PackedAdapter], dtype: torch.dtype) -> PackedAdapter:
    """Merge the components' packed factors with ``lorakit.merging``'s task arithmetic, module by module."""
    merge = MERGERS.get("task_arithmetic").fn
    experts = [p.aid for p in packed if getattr(p, "params", None)]
    if experts:  # their expert factors are not LoRA tables: a merge of linear tables would drop them
        raise ValueError(f"adapters {', '.join(experts)} adapt parameters (target_parameters, e.g. MoE experts); "
                         "per-request merges combine linear-layer LoRA factors only: merge them offline")
    modules = [p.modules() for p in packed]
    weights = [w for _, w in spec.parts]
    out = {}
    for path in sorted(set().union(*modules)):
        at, bt = next(m[path] for m in modules if path in m)
        d_in, d_out = at.shape[0], bt.shape[1]
        # packed tables hold A^T [in, r] and (scale B)^T [r, out]: the part's scale is 1
        parts = [Part(m[path][0].T.float(), m[path][1].T.float(), 1.0) if path in m
                 else Part(at.new_zeros(0, d_in, dtype=torch.float32), at.new_zeros(d_out, 0, dtype=torch.float32), 0.0)
                 for m in modules]
        a, b = merge(parts, weights)
        out[path] = pack_low_rank(a, b, 1.0, dtype)
    return PackedAdapter(spec.aid, out)


class MergeCache:
    """The merged adapters the store can build, under the segmented-LRU policy of the module docstring."""

    def __init__(self, store, capacity: int = 64, on_evict: Optional[Callable[[str], None]] = None):
        if capacity < 2:
            raise ValueError(f"the merged-adapter cache needs a capacity of at least 2, found {capacity}")
        self.store, self.on_evict = store, on_evict
        self.probation_cap = max(1, capacity // 4)
        self.protected_cap = capacity - self.probation_cap
        self.probation: OrderedDict[str, MergeSpec] = OrderedDict()
        self.protected: OrderedDict[str, MergeSpec] = OrderedDict()
        self.refs: Counter = Counter()
        self.stats = {"hits": 0, "misses": 0, "evictions": 0, "builds": 0}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.probation) + len(self.protected)

    def acquire(self, spec: MergeSpec) -> str:
        """The merged adapter's id for a request (counted as in use until ``release``)."""
        aid = spec.aid
        with self._lock:
            if aid in self.protected:
                self.protected.move_to_end(aid)
                self.stats["hits"] += 1
            elif aid in self.probation:
                del self.probation[aid]
                self._protect(aid, spec)
                self.stats["hits"] += 1
            else:
                if len(self.probation) >= self.probation_cap and not self._evict_one():
                    raise QueueFull(f"all {len(self.probation)} new merged adapters are in use; retry later")
                self.store.derive(aid, [a for a, _ in spec.parts], lambda packed: self._build(spec, packed))
                self.probation[aid] = spec
                self.stats["misses"] += 1
            self.refs[aid] += 1
        return aid

    def release(self, aid: str) -> None:
        with self._lock:
            self.refs[aid] -= 1
            if self.refs[aid] <= 0:
                del self.refs[aid]

    def _build(self, spec: MergeSpec, packed: Sequence[PackedAdapter]) -> PackedAdapter:
        self.stats["builds"] += 1
        return build(spec, packed, self.store.dtype)

    def _protect(self, aid: str, spec: MergeSpec) -> None:
        if len(self.protected) >= self.protected_cap:
            old, old_spec = self.protected.popitem(last=False)
            self.probation[old] = old_spec  # demoted: the most recent of probation
            self.probation.move_to_end(old)
            if len(self.probation) > self.probation_cap:
                self._evict_one()
        self.protected[aid] = spec

    def _evict_one(self) -> bool:
        victim = next((a for a in self.probation if not self.refs[a]), None)
        if victim is None:
            return False
        del self.probation[victim]
        self.stats["evictions"] += 1
        self.store.forget(victim)
        if self.on_evict is not None:
            self.on_evict(victim)
        return True
