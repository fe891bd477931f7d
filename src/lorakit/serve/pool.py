"""The active pool: the adapters the batched operator reads, in per-shape tables under a byte budget.

A shape class is an adapter's tuple of (module path, in, out, padded rank). Its storage is one tensor
``[cap, slot_elems]``: a slot holds a whole adapter as one flat blob (every module's ``A^T [in, r]`` then
``B^T [r, out]``), and the per-module tables the operator reads are strided views of it. Adapters of different
ranks never pad to each other (S-LoRA's goal, reached with one storage per shape instead of unified pages); moving
an adapter host -> pool, or between two slots, is one copy. Slots ``[0, active)`` hold adapters that running
requests use (reference count above zero): the operator reads only that prefix, so a step gathers no weights.
``[active, n)`` are resident but idle (eviction candidates, least recently used first); ``[n, cap)`` are free.

The budget counts the storages' capacity in bytes. Growing a class reallocates its storage (for a moment both the
old and the new one exist). When the budget is spent, an idle adapter of the same class is evicted first (its
slot is reused without reallocating), then idle adapters of other classes, whose storage shrinks. An adapter in
use is never evicted; ``PoolFull`` says so when nothing idle is left.

Devices: the storages live on the pool's device (the model's). The host copies (``PackedAdapter.blob``) stay on
the CPU; on CUDA they are pinned (``serve/devices.py``), so moving one into a slot is an asynchronous copy on the
current stream that later kernels wait for, while the host thread goes on (S-LoRA's host/device swapping).

Adapters served at their true size (``serve/truesize.py``) bring their own class: their slot holds the method's
own tensors, and ``on_acquire`` expands an adapter into LoRA tables when a request starts using it.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Optional

import torch

ModuleShape = tuple[str, int, int, int]  # (module path, in, out, padded rank)


class PoolFull(RuntimeError):
    """No room for an adapter without evicting one that running requests use."""


def slot_layout(key: tuple[ModuleShape, ...]) -> tuple[int, dict[str, tuple[int, int, int]]]:
    """Elements per slot, and per module the offsets of A^T and B^T and the end, in a slot's flat blob."""
    offsets, at = {}, 0
    for path, i, o, r in key:
        offsets[path] = (at, at + i * r, at + i * r + r * o)
        at += i * r + r * o
    return at, offsets


class PackedAdapter:
    """An adapter in table layout (the host copy): one flat blob, per module ``A^T [in, r]`` then
    ``(scale · B)^T [r, out]``."""

    def __init__(self, aid: str, modules: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        self.aid = aid
        self.key = tuple((p, at.shape[0], bt.shape[1], at.shape[1]) for p, (at, bt) in sorted(modules.items()))
        self.blob = torch.cat([t.reshape(-1) for p in sorted(modules) for t in modules[p]])
        self.nbytes = self.blob.nbytes

    def slot_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of one pool slot for this adapter."""
        return slot_layout(self.key)[0] * dtype.itemsize

    def make_class(self, dtype: torch.dtype, device: torch.device) -> "ShapeClass":
        """The pool class that holds adapters of this one's shape."""
        return ShapeClass(self.key, dtype, device)

    def modules(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per module (A^T, B^T), as views of the blob."""
        _, offsets = slot_layout(self.key)
        return {p: (self.blob[a:b].view(i, r), self.blob[b:e].view(r, o))
                for (p, i, o, r), (a, b, e) in zip(self.key, offsets.values())}


class ShapeClass:
    """The storage of one adapter shape, and the per-module tables viewing it."""

    def __init__(self, key: tuple[ModuleShape, ...], dtype: torch.dtype, device: torch.device = torch.device("cpu")):
        self.key, self.dtype, self.device = key, dtype, torch.device(device)
        self.slot_elems, self.offsets = self.layout()
        self.slot_bytes = self.slot_elems * dtype.itemsize
        self.ids: list[str] = []  # occupied slots, in slot order
        self.active = 0
        self.storage = torch.empty(0, self.slot_elems, dtype=dtype, device=self.device)
        self.tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def layout(self) -> tuple[int, dict]:
        return slot_layout(self.key)

    @property
    def cap(self) -> int:
        return self.storage.shape[0]

    @property
    def nbytes(self) -> int:
        return self.cap * self.slot_bytes

    @property
    def in_use_bytes(self) -> int:
        return self.active * self.slot_bytes

    def resize(self, cap: int) -> None:
        n = len(self.ids)
        assert cap >= n
        storage = torch.empty(cap, self.slot_elems, dtype=self.dtype, device=self.device)
        storage[:n] = self.storage[:n]
        self.storage = storage
        self.tables = self.views(storage)

    def views(self, storage: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        # A^T [cap, in, r] and B^T [cap, r, out]: strided views, the slot stride being a whole blob
        return {p: (storage[:, a:b].unflatten(1, (i, r)), storage[:, b:e].unflatten(1, (r, o)))
                for (p, i, o, r), (a, b, e) in zip(self.key, self.offsets.values())}

    def put(self, packed: PackedAdapter) -> None:
        # from pinned host memory: asynchronous on CUDA, ordered before the kernels that read the slot
        self.storage[len(self.ids)].copy_(packed.blob, non_blocking=True)
        self.ids.append(packed.aid)

    def on_acquire(self, slot: int) -> None:
        """An adapter entered the in-use prefix at ``slot`` (true-size classes expand it here)."""

    def swap(self, i: int, j: int) -> None:
        if i == j:
            return
        swap_rows(self.storage, i, j)
        self.ids[i], self.ids[j] = self.ids[j], self.ids[i]

    def remove(self, slot: int) -> None:
        """Drop an idle slot; the last occupied slot moves into it."""
        assert slot >= self.active
        self.swap(slot, len(self.ids) - 1)
        self.ids.pop()


def swap_rows(t: torch.Tensor, i: int, j: int) -> None:
    """Exchange rows ``i`` and ``j`` of ``t`` in place (three row copies: 4x faster on the CPU than an indexed
    gather and put of both rows)."""
    held = t[i].clone()
    t[i].copy_(t[j])
    t[j].copy_(held)


class AdapterPool:
    """Resident adapters under ``budget_bytes``, with reference counts and LRU eviction of idle ones."""

    def __init__(self, budget_bytes: int, dtype: torch.dtype = torch.float32, growth: float = 0.5,
                 device: torch.device = torch.device("cpu")):
        self.budget, self.dtype, self.growth, self.device = int(budget_bytes), dtype, growth, torch.device(device)
        self.classes: dict[Hashable, ShapeClass] = {}
        self.home: dict[str, ShapeClass] = {}
        self.refs: dict[str, int] = {}
        self.idle: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self.doomed: set[str] = set()  # dropped while in use: evicted at release
        self.stats = {"evictions": 0, "activations": 0, "bytes_in": 0, "resizes": 0}

    # -- queries ------------------------------------------------------------------------------------
    def __contains__(self, aid: str) -> bool:
        return aid in self.home

    @property
    def used_bytes(self) -> int:
        return sum(c.nbytes for c in list(self.classes.values()))  # list(): read from other threads (metrics)

    @property
    def resident_bytes(self) -> int:
        return sum(len(c.ids) * c.slot_bytes for c in list(self.classes.values()))

    def in_use_bytes(self) -> int:
        return sum(c.in_use_bytes for c in list(self.classes.values()))

    def slot_of(self, aid: str) -> tuple[ShapeClass, int]:
        cls = self.home[aid]
        return cls, cls.ids.index(aid)

    def fits(self, packed: PackedAdapter) -> bool:
        """Whether ``packed`` can become resident by evicting idle adapters only (admission control)."""
        if packed.aid in self.home:
            return True
        cls = self.classes.get(packed.key)
        if cls is not None and len(cls.ids) < cls.cap:
            return True
        need = packed.slot_bytes(self.dtype)
        return self.in_use_bytes() + need <= self.budget

    def tables_for(self, path: str) -> dict[Hashable, tuple[torch.Tensor, torch.Tensor]]:
        """Per class that adapts ``path`` and has adapters in use: its (A^T, B^T) tables."""
        return {k: c.tables[path] for k, c in self.classes.items() if c.active and path in c.tables}

    # -- residency ----------------------------------------------------------------------------------
    def activate(self, packed: PackedAdapter) -> None:
        """Make ``packed`` resident (idle), evicting idle adapters if the budget requires."""
        if packed.aid in self.home:
            return
        cls = self._room_for(packed)
        cls.put(packed)
        self.home[packed.aid] = cls
        self.refs[packed.aid] = 0
        self.idle[packed.aid] = None
        self.stats["activations"] += 1
        self.stats["bytes_in"] += packed.nbytes

    def acquire(self, aid: str) -> None:
        """A running request uses ``aid`` (resident): it moves into its class's in-use prefix."""
        cls = self.home[aid]
        self.refs[aid] += 1
        if self.refs[aid] == 1:
            self.idle.pop(aid, None)
            cls.swap(cls.ids.index(aid), cls.active)
            cls.active += 1
            cls.on_acquire(cls.active - 1)

    def release(self, aid: str) -> None:
        cls = self.home[aid]
        self.refs[aid] -= 1
        if self.refs[aid] == 0:
            cls.active -= 1
            cls.swap(cls.ids.index(aid), cls.active)
            self.idle[aid] = None
            if aid in self.doomed:
                self.evict(aid)

    def drop(self, aid: str) -> None:
        """Forget ``aid`` now if idle, else as soon as its last request releases it."""
        if aid not in self.home:
            return
        if self.refs[aid]:
            self.doomed.add(aid)
        else:
            self.evict(aid)

    def evict(self, aid: str, shrink: bool = True) -> None:
        if self.refs.get(aid):
            raise RuntimeError(f"adapter '{aid}' is in use by {self.refs[aid]} request(s) and cannot be evicted")
        cls = self.home.pop(aid)
        self.refs.pop(aid)
        self.idle.pop(aid, None)
        self.doomed.discard(aid)
        cls.remove(cls.ids.index(aid))
        self.stats["evictions"] += 1
        if shrink and not cls.ids:
            del self.classes[cls.key]

    def _room_for(self, packed: PackedAdapter) -> ShapeClass:
        key, aid = packed.key, packed.aid
        cls = self.classes.get(key) or self.classes.setdefault(key, packed.make_class(self.dtype, self.device))
        if cls.slot_bytes > self.budget:
            del self.classes[key]
            raise PoolFull(f"adapter '{aid}' needs {cls.slot_bytes:,} bytes; the whole pool budget is {self.budget:,}")
        while len(cls.ids) >= cls.cap:
            free = self.budget - self.used_bytes
            if free >= cls.slot_bytes:
                extra = max(1, min(max(4, int(cls.cap * self.growth)), free // cls.slot_bytes))
                cls.resize(cls.cap + extra)
                self.stats["resizes"] += 1
                continue
            same = next((a for a in self.idle if self.home[a] is cls), None)
            if same is not None:  # reuse its slot: no reallocation
                self.evict(same, shrink=False)
                continue
            if not self._reclaim(cls, cls.slot_bytes - free):
                if not cls.ids:
                    del self.classes[key]
                raise PoolFull(
                    f"no room for adapter '{aid}' ({cls.slot_bytes:,} bytes): {self.in_use_bytes():,} of the "
                    f"{self.budget:,}-byte pool are adapters in use; raise the pool budget or lower max batch"
                )
        return cls

    def _reclaim(self, keep: ShapeClass, need: int) -> bool:
        """Free ``need`` bytes from other classes: their spare capacity first, then their idle adapters."""
        touched = set()
        slack = lambda c: (c.cap - len(c.ids)) * c.slot_bytes  # noqa: E731
        freed = sum(slack(c) for c in self.classes.values() if c is not keep)
        touched.update(k for k, c in self.classes.items() if c is not keep and slack(c))
        for victim in list(self.idle):
            if freed >= need:
                break
            cls = self.home[victim]
            if cls is keep:
                continue
            self.evict(victim, shrink=False)
            freed += cls.slot_bytes
            touched.add(cls.key)
        for key in touched:
            cls = self.classes[key]
            if cls.ids:
                cls.resize(len(cls.ids))
                self.stats["resizes"] += 1
            else:
                del self.classes[key]
        return freed >= need
