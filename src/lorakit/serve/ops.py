"""The heterogeneous batched LoRA operator: one step's tokens, many adapters, each at its own rank.

Semantics (Punica's SGMV/BGMV, S-LoRA's MBGMM/MBGMV): every token ``t`` carries an adapter (a slot ``s`` in the
table of a shape class ``c``) or none, and ``y[t] += (x[t] @ A_s^T) @ B_s^T`` where the table keeps
``A_s^T [in, r]`` and ``B_s^T [r, out]`` with the adapter's scale already folded into B. Adapters of different
ranks live in different classes, so nothing is padded to the largest rank in the batch.

``plan_step`` sorts the step's tokens by (class, slot) once; every adapted module of every layer reuses that plan.
Backends, chosen per call (``auto``: ``bmm`` while padding at most doubles the rows or keeps them under 256, as
in decode steps, else ``grouped``, else ``segments``):
- ``bmm``: S-LoRA's padded batched GEMM: each slot's tokens gathered into a ``[slots, width, in]`` block (padding rows
  repeat a real row and their results are dropped), one ``torch.bmm`` to shrink and one to expand per class. On CPU,
  ``grouped_mm`` runs one small GEMM per slot, and with one token per slot (decode) that per-slot cost is most of
  the LoRA time; two bmm calls have none of it;
- ``grouped``: ``torch.nn.functional.grouped_mm`` on the slot-sorted tokens, one shrink and one expand call per
  class (a grouped GEMM: segments for prefill, tiny groups for decode);
- ``segments``: a loop of ``torch.mm`` over each slot's contiguous run of tokens (for torch builds without
  grouped_mm, or strides grouped_mm cannot take: it needs rows aligned to 16 bytes);
- ``reference_delta``: token by token in plain torch, the ground truth the tests compare with.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

Tables = Mapping[Hashable, tuple[torch.Tensor, torch.Tensor]]  # class key -> (A^T [k, in, r], B^T [k, r, out])

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


@dataclass
class ClassPlan:
    """The tokens of one shape class, sorted by slot."""

    key: Hashable
    index: Optional[torch.Tensor]  # token rows in slot order; None when they are all rows, already in order
    offs: torch.Tensor  # int32 [k]: end of each slot's run of tokens (grouped_mm's offsets)
    counts: list[int]  # tokens per slot
    lo: int  # first slot with tokens; slots below it are left out of the calls
    hi: int  # one past the last slot with tokens
    width: int  # most tokens of one slot: the bmm backend's block is [hi - lo, width, in]
    src: Optional[torch.Tensor]  # [(hi - lo) * width] token row of each block row (padding repeats a real row)
    pick: Optional[torch.Tensor]  # block row of each token in slot order; None when the block has no padding


@dataclass
class StepPlan:
    """Token-to-adapter metadata for one forward pass, built once and shared by every adapted module."""

    num_tokens: int
    classes: list[ClassPlan]


def plan_step(token_class: torch.Tensor, token_slot: torch.Tensor, keys: Sequence[Hashable]) -> StepPlan:
    """Group tokens by (class, slot); ``token_class`` is -1 for tokens that take no adapter."""
    n = int(token_class.numel())
    plans = []
    for c, key in enumerate(keys):
        rows = (token_class == c).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        slots = token_slot.index_select(0, rows)
        slots, order = torch.sort(slots, stable=True)
        rows = rows.index_select(0, order)
        lo, hi = int(slots[0]), int(slots[-1]) + 1
        counts = torch.bincount(slots - lo, minlength=hi - lo)
        identity = rows.numel() == n and bool((rows == torch.arange(n, device=rows.device)).all())
        ends = counts.cumsum(0)
        width = int(counts.max())
        src, pick = None if identity else rows, None
        if width * (hi - lo) != rows.numel():  # padded: token j of slot s sits at block row s * width + j
            pick = (slots - lo) * width + torch.arange(rows.numel(), device=rows.device) - (ends - counts).index_select(0, slots - lo)
            src = rows.index_select(0, (ends - counts).clamp(max=rows.numel() - 1)).repeat_interleave(width)
            src[pick] = rows
        plans.append(ClassPlan(key, None if identity else rows, ends.to(torch.int32), counts.tolist(), lo, hi, width, src, pick))
    return StepPlan(n, plans)


def plan_split(token_class: torch.Tensor, token_slot: torch.Tensor, keys: Sequence[Hashable], split: int) -> StepPlan:
    """``plan_step`` for tokens ``[0, split)`` and ``[split, T)`` apart (a packed step's decode tokens, one per
    request, and its prompts), so that each part gets its own backend: ``bmm`` for the first, segments for the rest."""
    if split <= 0 or split >= token_class.numel():
        return plan_step(token_class, token_slot, keys)
    head, tail = token_class.clone(), token_class.clone()
    head[split:] = -1
    tail[:split] = -1
    return StepPlan(int(token_class.numel()), plan_step(head, token_slot, keys).classes + plan_step(tail, token_slot, keys).classes)


def padded_rank(r: int, dtype: torch.dtype) -> int:
    """``r`` rounded up so a row of ``r`` elements is a multiple of 16 bytes (zero columns: exact)."""
    unit = max(1, 16 // dtype.itemsize)
    return -(-r // unit) * unit


def pack_low_rank(a: torch.Tensor, b: torch.Tensor, scale: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Table layout of one module's update: ``A^T [in, r']`` and ``(scale · B)^T [r', out]``, zero-padded to r'."""
    r, rp = a.shape[0], padded_rank(a.shape[0], dtype)
    at = torch.zeros(a.shape[1], rp, dtype=dtype, device=a.device)
    bt = torch.zeros(rp, b.shape[0], dtype=dtype, device=a.device)
    at[:, :r] = a.detach().T.to(dtype)
    bt[:r] = (b.detach().float() * scale).T.to(dtype)
    return at, bt


def grouped_mm_available() -> bool:
    return _GROUPED_MM is not None


def _aligned(*tensors: torch.Tensor) -> bool:
    """grouped_mm needs every row stride (and the base pointer) to be a multiple of 16 bytes."""
    return all(t.stride(-2) * t.element_size() % 16 == 0 and t.data_ptr() % 16 == 0 for t in tensors)


def lora_add_(y: torch.Tensor, x: torch.Tensor, plan: StepPlan, tables: Tables, backend: str = "auto") -> torch.Tensor:
    """Add every token's LoRA update to ``y [T, out]`` in place, from ``x [T, in]``; returns ``y``."""
    for cp in plan.classes:
        pair = tables.get(cp.key)
        if pair is None:  # this class does not adapt the module
            continue
        at, bt = pair[0][cp.lo:cp.hi], pair[1][cp.lo:cp.hi]
        if backend == "bmm" or (backend == "auto" and bmm_suits(cp)):
            xp = x if cp.src is None else x.index_select(0, cp.src)
            delta = torch.bmm(torch.bmm(xp.to(at.dtype).reshape(cp.hi - cp.lo, cp.width, -1), at), bt).flatten(0, 1)
            if cp.pick is not None:
                delta = delta.index_select(0, cp.pick)
            _scatter_add(y, delta, cp.index)
            continue
        xs = x if cp.index is None else x.index_select(0, cp.index)
        xs = xs.to(at.dtype).contiguous()
        use_grouped = backend == "grouped" or (backend == "auto" and _GROUPED_MM is not None)
        if use_grouped and _aligned(xs, at, bt):
            delta = _GROUPED_MM(_GROUPED_MM(xs, at, offs=cp.offs), bt, offs=cp.offs)
        elif backend in ("auto", "segments"):
            delta = _segments(xs, at, bt, cp.counts)
        else:
            raise ValueError(f"backend {backend!r} cannot run these shapes (grouped_mm available: {grouped_mm_available()})")
        _scatter_add(y, delta, cp.index)
    return y


def bmm_suits(cp: ClassPlan) -> bool:
    """Whether padding each slot to ``cp.width`` tokens costs little: at most double the rows, or under 256."""
    padded = (cp.hi - cp.lo) * cp.width
    return padded <= max(2 * int(cp.offs[-1]), 256)


def _scatter_add(y: torch.Tensor, delta: torch.Tensor, index: Optional[torch.Tensor]) -> None:
    if delta.dtype.itemsize > y.dtype.itemsize:  # a bf16/fp16 base: add in the adapter's dtype, round once (PEFT's order)
        rows = y if index is None else y.index_select(0, index)
        total = rows.to(delta.dtype).add_(delta).to(y.dtype)
        y.copy_(total) if index is None else y.index_copy_(0, index, total)
        return
    delta = delta.to(y.dtype)
    if index is None:
        y.add_(delta)
    else:
        y.index_add_(0, index, delta)


def _segments(xs: torch.Tensor, at: torch.Tensor, bt: torch.Tensor, counts: list[int]) -> torch.Tensor:
    out = xs.new_empty(xs.shape[0], bt.shape[-1])
    start = 0
    for slot, count in enumerate(counts):
        if count:
            torch.mm(xs[start:start + count] @ at[slot], bt[slot], out=out[start:start + count])
            start += count
    return out


def reference_delta(x: torch.Tensor, per_token: Sequence[Optional[tuple[torch.Tensor, torch.Tensor, float]]]) -> torch.Tensor:
    """``scale · B (A x_t)`` token by token, from unpacked ``(A [r, in], B [out, r], scale)`` (None: no adapter)."""
    rows = []
    for t, low_rank in enumerate(per_token):
        if low_rank is None:
            rows.append(None)
            continue
        a, b, scale = low_rank
        rows.append((b.to(x.dtype) @ (a.to(x.dtype) @ x[t])) * scale)
    out_features = next((r.shape[0] for r in rows if r is not None), 0)
    return torch.stack([r if r is not None else x.new_zeros(out_features) for r in rows]) if rows else x.new_zeros(0, 0)
