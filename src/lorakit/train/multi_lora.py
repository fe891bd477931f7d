"""Many LoRA jobs on one frozen base: the serving engine's batched operator with a backward, and the hooks that
route each row of a mixed micro-batch to its job's adapter.

``BatchedLoRA`` adds ``x[t] A_s^T (s·B_s)^T`` to the base output for every token ``t`` of slot ``s``
(``lorakit.serve.ops.lora_add_``, Punica's SGMV semantics). Its backward reuses the same operator for the input
gradient (``dx[t] = dy[t] (s·B_s) A_s``: the tables transposed and swapped) and takes the weight gradients slot
by slot: ``d(A_s^T) = X_s^T (dY_s (s·B_s))``, ``d((s·B_s)^T) = (X_s A_s^T)^T dY_s`` over the slot's tokens.
With ``fused=True`` the update is added into the base layer's output in place (LoRAFusion's fused ``xW + s·BAx``
epilogue: no separate [tokens, out] delta tensor and no extra add); ``fused=False`` returns ``y + delta``.

``Routing`` is one micro-batch's metadata (rows sorted by job, one plan for the tokens, one for the rows), built
once and shared by every hooked module. Jobs that adapt the same modules form one class whatever their ranks
(lower ranks zero-padded: on CPU a rank-4 and a rank-16 product cost about the same, both memory-bound), and
padding tokens take their row's adapter as in a solo run, so a micro-batch's tokens are already in slot order:
the ``segments`` backend then slices them with no gather or scatter. Padding is kept small by packing rows of
similar length together instead.

``MultiLoRA``'s default backend, ``"jobs"``, skips the tables and plans: each job's tokens are one run, and
`multi_kernel.job_segment_lora` updates them with the job's own A and B (fewer products in the backward, no
stacked tables; faster at training shapes, bench/multi_job.py). The serving operator stays selectable
(``backend="segments"``, ``"bmm"``, ``"grouped"``) and is tested to give the same jobs.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Hashable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..serve import ops
from .multi_kernel import job_segment_lora


class BatchedLoRA(torch.autograd.Function):
    """``y += `` each token's LoRA update (in place); differentiable in ``x`` and the per-class tables."""

    @staticmethod
    def forward(ctx, y, x, plan, keys, backend, *tables):
        pairs = _pairs(keys, tables)
        ops.lora_add_(y, x, plan, pairs, backend)
        ctx.mark_dirty(y)
        ctx.save_for_backward(x, *tables)
        ctx.plan, ctx.keys, ctx.backend = plan, keys, backend
        return y

    @staticmethod
    def backward(ctx, dy):
        x, *tables = ctx.saved_tensors
        pairs = _pairs(ctx.keys, tables)
        dx = None
        if ctx.needs_input_grad[1]:  # dx[t] = dy[t] B'_s A_s: the same operator over transposed, swapped tables
            swapped = {k: (bt.transpose(1, 2).contiguous(), at.transpose(1, 2).contiguous()) for k, (at, bt) in pairs.items()}
            only = ctx.plan.classes[0] if len(ctx.plan.classes) == 1 else None
            if only is not None and only.index is None and ctx.backend == "segments" and only.key in pairs:
                dx = torch.empty_like(x)  # one class over every token in order: write each slot's rows in place
                _segments_into(dx, dy, *swapped[only.key], only)
            else:
                dx = ops.lora_add_(torch.zeros_like(x), dy, ctx.plan, swapped, ctx.backend)
        grads = {k: (torch.zeros_like(at), torch.zeros_like(bt)) for k, (at, bt) in pairs.items()}
        for cp in ctx.plan.classes:
            if cp.key not in pairs:
                continue
            (at, bt), (dat, dbt) = pairs[cp.key], grads[cp.key]
            xs = x if cp.index is None else x.index_select(0, cp.index)
            dys = dy if cp.index is None else dy.index_select(0, cp.index)
            start = 0
            for i, count in enumerate(cp.counts):
                if count:
                    s, xs_s, dy_s = cp.lo + i, xs[start:start + count], dys[start:start + count]
                    dat[s] = xs_s.T @ (dy_s @ bt[s].T)  # [in, r]
                    dbt[s] = (xs_s @ at[s]).T @ dy_s  # [r, out]
                    start += count
        flat = [g for k in ctx.keys for g in grads[k]]
        return (dy, dx, None, None, None, *flat)


def _segments_into(out: torch.Tensor, x: torch.Tensor, at: torch.Tensor, bt: torch.Tensor, cp: ops.ClassPlan) -> None:
    start = 0
    for i, count in enumerate(cp.counts):
        torch.mm(x[start:start + count] @ at[cp.lo + i], bt[cp.lo + i], out=out[start:start + count])
        start += count


def _pairs(keys: Sequence[Hashable], tables: Sequence[torch.Tensor]) -> dict:
    return {k: (tables[2 * i], tables[2 * i + 1]) for i, k in enumerate(keys)}


def batched_lora(y: torch.Tensor, x: torch.Tensor, plan: ops.StepPlan, tables: dict, fused: bool = True,
                 backend: str = "auto") -> torch.Tensor:
    """``y`` plus each token's update from ``tables`` {class key: (A^T [k, in, r], B'^T [k, r, out])}."""
    keys = list(tables)
    flat = [t for k in keys for t in tables[k]]
    if fused:
        return BatchedLoRA.apply(y, x, plan, keys, backend, *flat)
    return y + BatchedLoRA.apply(torch.zeros_like(y), x, plan, keys, backend, *flat)


@dataclass
class JobAdapters:
    """One job's trainable pieces: LoRA layers by module path (``lora_A``/``lora_B``/``scaling``) and head copies."""

    name: str
    lora: dict[str, nn.Module]
    heads: dict[str, nn.Module]
    key: Hashable = field(init=False)

    def __post_init__(self):
        self.key = tuple(sorted(self.lora))  # jobs adapting the same modules share a class, whatever their ranks


@dataclass
class Routing:
    """One micro-batch: jobs in row order with their row ranges, and the token- and row-level plans."""

    segments: list[tuple[JobAdapters, int, int]]  # (job, first row, end row), rows sorted by job
    num_rows: int
    num_tokens: int
    token_plan: Optional[ops.StepPlan]
    row_plan: ops.StepPlan
    slots: dict[Hashable, list[JobAdapters]]  # class key -> jobs by slot
    cache: dict = field(default_factory=dict)

    @classmethod
    def build(cls, jobs: Sequence[JobAdapters], attention_mask: Optional[torch.Tensor]) -> "Routing":
        """Routing for rows ``jobs`` (one per row, equal jobs adjacent); mask [rows, seq]: tokens with 0 take no adapter."""
        segments, slots, row_class, row_slot = [], {}, [], []
        for i, job in enumerate(jobs):
            if not segments or segments[-1][0] is not job:
                if any(s[0] is job for s in segments):
                    raise ValueError(f"rows of job '{job.name}' are not adjacent")
                segments.append((job, i, i + 1))
                slots.setdefault(job.key, []).append(job)
            else:
                segments[-1] = (job, segments[-1][1], i + 1)
            row_class.append(list(slots).index(job.key))
            row_slot.append(slots[job.key].index(job))
        keys = list(slots)
        rc, rs = torch.tensor(row_class), torch.tensor(row_slot)
        token_plan = None
        if attention_mask is not None:
            seq = attention_mask.shape[1]
            token_plan = ops.plan_step(rc.repeat_interleave(seq), rs.repeat_interleave(seq), keys)
        n_tok = attention_mask.numel() if attention_mask is not None else -1
        return cls(segments, len(jobs), n_tok, token_plan, ops.plan_step(rc, rs, keys), slots)

    def spans(self, path: str, per_row: int) -> list:
        """(first, end, LoRA layer) of each job segment that adapts ``path``, in units of ``per_row`` per row."""
        key = (path, per_row)
        if key not in self.cache:
            self.cache[key] = [(a * per_row, b * per_row, j.lora[path]) for j, a, b in self.segments if path in j.lora]
        return self.cache[key]

    def tables(self, path: str) -> dict:
        """{class key: (A^T [k, in, r], (s·B)^T [k, r, out])} of the classes that adapt module ``path``."""
        if path not in self.cache:  # the serving operator's tables (backends other than "jobs")
            self.cache[path] = {key: _table([j.lora[path] for j in jobs]) for key, jobs in self.slots.items()
                                if path in jobs[0].lora}
        return self.cache[path]


def _table(layers: Sequence[nn.Module]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A^T [k, in, r], (s·B)^T [k, r, out]) of LoRA layers, lower ranks zero-padded to the highest (exact: a zero
    column of A^T and row of B^T add nothing, and the padding's gradients are dropped by ``F.pad``'s backward)."""
    r = max(layer.r for layer in layers)
    at = [_pad(layer.lora_A.weight.T, 1, r) for layer in layers]
    bt = [_pad(layer.lora_B.weight.T * layer.scaling, 0, r) for layer in layers]
    return torch.stack(at), torch.stack(bt)


def _pad(t: torch.Tensor, dim: int, r: int) -> torch.Tensor:
    extra = r - t.shape[dim]
    return t if extra == 0 else F.pad(t, (0, extra) if dim == 1 else (0, 0, 0, extra))


class MultiLoRA:
    """Forward hooks on one base model's target and head modules; inactive (the plain base) unless routed."""

    def __init__(self, model: nn.Module, fused: bool = True, backend: str = "jobs"):
        self.model, self.fused, self.backend = model, fused, backend
        self.routing: Optional[Routing] = None
        self.single: Optional[JobAdapters] = None
        self.paths: dict[str, str] = {}  # module path -> "lora" or "head"
        self.handles: list = []

    def watch(self, job: JobAdapters) -> None:
        """Hook the modules ``job`` adapts (a module is hooked once, whichever jobs use it)."""
        for kind, paths in (("lora", job.lora), ("head", job.heads)):
            for path in paths:
                if self.paths.setdefault(path, kind) != kind:
                    raise ValueError(f"job '{job.name}': module '{path}' is adapted by one job and a full copy in another")
        self._install()

    def _install(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = [self.model.get_submodule(p).register_forward_hook(self._hook(p, kind)) for p, kind in self.paths.items()]

    @contextmanager
    def detached(self):
        """The plain base model inside the block (no hooks), e.g. to apply or save one job's adapter."""
        for h in self.handles:
            h.remove()
        self.handles = []
        try:
            yield self.model
        finally:
            self._install()

    @contextmanager
    def only(self, job: JobAdapters):
        """Every row takes ``job``'s adapter inside the block: the model behaves as the job trained alone."""
        self.single, self.routing = job, None
        try:
            yield self.model
        finally:
            self.single = None

    def _hook(self, path: str, kind: str):
        def hook(module, args, out):
            if self.single is not None:
                return self._single(path, kind, args[0], out)
            if self.routing is None:
                return None
            r, x = self.routing, args[0]
            if kind == "head":
                if x.shape[0] != r.num_rows:
                    raise ValueError(f"module '{path}' (a full copy per job) got {x.shape[0]} rows, the micro-batch has {r.num_rows}")
                parts = [j.heads[path](x[a:b]) if path in j.heads else out[a:b] for j, a, b in r.segments]
                return torch.cat(parts)
            n = x.shape[:-1].numel()
            plan = r.token_plan if n == r.num_tokens else r.row_plan if n == r.num_rows else None
            if plan is None:
                raise ValueError(f"module '{path}' got {n} rows of features; the micro-batch has {r.num_rows} rows and "
                                 f"{r.num_tokens} tokens, so its rows cannot be matched to jobs")
            if self.backend == "jobs":
                spans = r.spans(path, 1 if plan is r.row_plan else n // r.num_rows)
                flat = job_segment_lora(out.reshape(n, -1), x.reshape(n, -1), spans, self.fused)
            else:
                flat = batched_lora(out.reshape(n, -1), x.reshape(n, -1), plan, r.tables(path), self.fused, self.backend)
            return flat.view(out.shape)
        return hook

    def _single(self, path: str, kind: str, x: torch.Tensor, out: torch.Tensor):
        job = self.single
        if kind == "head":
            return job.heads[path](x) if path in job.heads else None
        layer = job.lora.get(path)
        if layer is None:
            return None
        return out + layer.lora_B(layer.lora_A(x.to(layer.lora_A.weight.dtype)) * layer.scaling).to(out.dtype)
