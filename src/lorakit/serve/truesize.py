"""Adapters served at their true size: NOLA, LoRA-XS, Block-LoRA, RandLoRA and SHiRA from their own tensors.

These methods' updates are exactly s·B·A (SHiRA's sparse S = S[:, cols] · one-hot(cols), exactly), but their
files hold far fewer numbers than the LoRA pair: NOLA two coefficient vectors and a seed, LoRA-XS an r x r core
around frozen SVD factors, Block-LoRA one shared head of in/k columns, RandLoRA two diagonal scalings of seeded
bases, SHiRA r·(in+out) values and their indices. Served as their ``to_lora()`` export, every resident adapter
would cost the LoRA pair's bytes. Here a pool slot holds the method's own tensors, byte for byte (any dtype;
``TrueSizeAdapter.blob``), and the tensors that all adapters of a class hold alike (LoRA-XS's frozen A and B,
RandLoRA's saved bases) are stored once per class on the device (deduplicated by content). When a request starts
using an adapter, ``TrueSizeClass.on_acquire`` expands it on the device into the LoRA tables the batched operator
reads (a workspace row per adapter in use; an idle adapter keeps its row until another adapter needs it), with
the method's own ``low_rank`` (or, for RandLoRA and SHiRA, the factors below) and ``ops.pack_low_rank``: the
same tensors, computed the same way, as serving the export, so the outputs are the export's. The memory: resident
adapters at their true size, plus one LoRA-sized workspace row for each adapter that running requests use (counted
in the pool's bytes), plus the shared tensors once. The first use of an adapter pays its expansion (NOLA draws its
random bases again: k·r·(in + out) numbers per module).

Deviation from the methods' own forwards (not from the export): RandLoRA's update runs as the two GEMMs of its
forward with the scale folded into the up-projection; SHiRA's as a gather of the used input columns and one GEMM
over them, where its forward uses a sparse matmul: equal up to float32 summation order.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..core.state import AdapterState
from ..methods.randlora import randlora_factors
from .ops import pack_low_rank
from .pool import PackedAdapter, ShapeClass, slot_layout, swap_rows

Factors = Callable[[dict, object, int, int], tuple[torch.Tensor, torch.Tensor, float]]  # (tensors, config, out, in)


def _randlora(tensors, config, out_f, in_f):
    down, up = randlora_factors(tensors, config, out_f, in_f)
    return down, up, config.scaling


def _shira(tensors, config, out_f, in_f):
    """S = B A exactly: A [c, in] picks the c input columns S uses (one-hot rows), B = S[:, those columns]."""
    values = tensors["shira_weight"]
    rows, cols = tensors["shira_indices"].long()
    if config.fan_in_fan_out:  # a Conv1D layer: the indices are of the [in, out] weight
        rows, cols = cols, rows
    used, where = torch.unique(cols, return_inverse=True)
    a = torch.zeros(used.numel(), in_f, dtype=values.dtype, device=values.device)
    a[torch.arange(used.numel(), device=values.device), used] = 1
    b = torch.zeros(out_f, used.numel(), dtype=values.dtype, device=values.device).index_put_((rows, where), values)
    return a, b, 1.0


@dataclass(frozen=True)
class Spec:
    """How a method is served at its true size."""

    shared: tuple[str, ...] = ()  # tensors every adapter of a class holds alike: stored once per class
    factors: Optional[Factors] = None  # default: the method's own ``low_rank(tensors, config)``


SPECS = {
    "nola": Spec(),
    "lora_xs": Spec(("lora_A.weight", "lora_B.weight")),
    "block_lora": Spec(),
    "randlora": Spec(("randlora_A", "randlora_B"), _randlora),
    "shira": Spec((), _shira),
}


def spec_for(state: AdapterState) -> Optional[Spec]:
    """The true-size recipe of ``state``'s method, or None (then it is served as LoRA, or refused)."""
    return SPECS.get(state.config.method_name)


def factors(state: AdapterState, spec: Spec, path: str, tensors: dict, out_f: int, in_f: int):
    """(A [r, in], B [out, r], scale) of module ``path`` from ``tensors`` (own and shared)."""
    config = state.module_config(path)
    if spec.factors is not None:
        return spec.factors(tensors, config, out_f, in_f)
    return state._class_for(path).low_rank(tensors, config)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def _align(n: int) -> int:
    return -(-n // 8) * 8  # every tensor starts 8-byte aligned in the blob, so any dtype can view it


class TrueSizeAdapter(PackedAdapter):
    """An adapter's own tensors as one byte blob (the host copy), its shared tensors, and how to expand it."""

    def __init__(self, aid: str, state: AdapterState, spec: Spec, shapes: dict, lora: dict, shared_cache: dict):
        self.aid, self.state, self.spec, self.shapes = aid, state, spec, shapes
        self.lora_key = tuple((p, at.shape[0], bt.shape[1], at.shape[1]) for p, (at, bt) in sorted(lora.items()))
        self.fields, parts, at = [], [], 0  # (path, name, dtype, shape, byte offset)
        self.shared: dict[str, dict[str, torch.Tensor]] = {}
        key = []
        for path in sorted(lora):
            tensors = state.tensors[path]
            own = sorted(n for n in tensors if n not in spec.shared)
            for name in own:
                t = tensors[name].detach().contiguous()
                raw = t.view(-1).view(torch.uint8) if t.numel() else torch.zeros(0, dtype=torch.uint8, device="cpu")
                self.fields.append((path, name, t.dtype, tuple(t.shape), at))
                parts += [raw, raw.new_zeros(_align(raw.numel()) - raw.numel())]
                at += _align(raw.numel())
            shared = {n: tensors[n].detach() for n in spec.shared if n in tensors}
            digests = tuple(sorted((n, _digest(t)) for n, t in shared.items()))
            self.shared[path] = {n: shared_cache.setdefault(d, shared[n]) for n, d in digests}  # one copy on the host
            config = state.module_config(path)
            signature = hashlib.sha256(repr((state.config.method_name, config, digests,
                                             [f[1:4] for f in self.fields if f[0] == path])).encode()).hexdigest()[:16]
            key.append((*next(k for k in self.lora_key if k[0] == path), "true-size", signature))
        self.key = tuple(key)
        self.blob = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8, device="cpu")
        self.nbytes = self.blob.nbytes

    def slot_bytes(self, dtype: torch.dtype) -> int:
        """A slot's bytes and, for an adapter in use, its workspace row."""
        return self.nbytes + slot_layout(self.lora_key)[0] * dtype.itemsize

    def make_class(self, dtype: torch.dtype, device: torch.device) -> "TrueSizeClass":
        return TrueSizeClass(self, dtype, device)

    def own_tensors(self, blob: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        """Per module, the adapter's own tensors as views of ``blob`` (this layout, on any device)."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for path, name, dtype, shape, at in self.fields:
            size = torch.Size(shape).numel() * dtype.itemsize
            out.setdefault(path, {})[name] = blob[at:at + size].view(dtype).view(shape)
        return out

    def expand(self, blob: torch.Tensor, shared: dict, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per module, the LoRA tables (A^T, (s·B)^T) of the adapter whose blob is ``blob``."""
        own, out = self.own_tensors(blob), {}
        for path, d_in, d_out, _ in self.lora_key:
            a, b, scale = factors(self.state, self.spec, path, {**own.get(path, {}), **shared[path]}, d_out, d_in)
            out[path] = pack_low_rank(a, b, scale, dtype)
        return out

    def modules(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The LoRA tables, expanded on the host (merges of served adapters read these)."""
        return self.expand(self.blob, self.shared, torch.float32)


class TrueSizeClass(ShapeClass):
    """Slots of adapters' own bytes, shared tensors once, and LoRA tables for the slots in use."""

    def __init__(self, template: TrueSizeAdapter, dtype: torch.dtype, device: torch.device):
        self.template, self.lora_dtype = template, dtype
        self.lora = ShapeClass(template.lora_key, dtype, device)  # lays out the workspace rows
        self.shared = {p: {n: t.to(device) for n, t in d.items()} for p, d in template.shared.items()}
        self.shared_bytes = sum(t.nbytes for d in self.shared.values() for t in d.values())
        super().__init__(template.key, torch.uint8, device)
        self.workspace = torch.zeros(0, self.lora.slot_elems, dtype=dtype, device=self.device)
        self.tables = self.lora.views(self.workspace)
        self.expanded: list[Optional[str]] = []  # per workspace row: the adapter whose tables it holds

    def layout(self) -> tuple[int, dict]:
        return self.template.nbytes, {}

    def views(self, storage: torch.Tensor) -> dict:
        return self.lora.views(self.workspace)  # the operator reads the expanded rows, never the blobs

    @property
    def nbytes(self) -> int:
        return self.cap * self.slot_bytes + self.workspace.nbytes + self.shared_bytes

    @property
    def in_use_bytes(self) -> int:
        return self.active * (self.slot_bytes + self.lora.slot_bytes) + self.shared_bytes

    def swap(self, i: int, j: int) -> None:
        super().swap(i, j)
        if i != j and max(i, j) < self.workspace.shape[0]:  # an idle adapter keeps its tables while its row lasts
            swap_rows(self.workspace, i, j)
            self.expanded[i], self.expanded[j] = self.expanded[j], self.expanded[i]

    def on_acquire(self, slot: int) -> None:
        if slot >= self.workspace.shape[0]:
            grown = torch.zeros(max(slot + 1, 2 * self.workspace.shape[0]), self.lora.slot_elems,
                                dtype=self.lora_dtype, device=self.device)
            grown[:self.workspace.shape[0]] = self.workspace
            self.expanded += [None] * (grown.shape[0] - self.workspace.shape[0])
            self.workspace = grown
            self.tables = self.lora.views(grown)
        if self.expanded[slot] == self.ids[slot]:  # expanded when it was last in use, and its row kept since
            return
        self.expanded[slot] = self.ids[slot]
        for path, (at, bt) in self.template.expand(self.storage[slot], self.shared, self.lora_dtype).items():
            self.tables[path][0][slot].copy_(at)
            self.tables[path][1][slot].copy_(bt)
