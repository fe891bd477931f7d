"""The training kernel of multi-job LoRA: rows sorted by job, so each job's tokens are one contiguous run and its
update is two small matrix products on that run, added in place into the base output.

For job ``j`` with tokens ``[a, b)``, ``A_j [r_j, in]``, ``B_j [out, r_j]`` and scale ``s_j``:
forward ``h = x[a:b] A_j^T`` (kept for the backward: ``[tokens, r_j]``, small) and ``y[a:b] += s_j · h B_j^T``
(``addmm_`` into the base output: no [tokens, out] update tensor, no separate add); backward, with
``g = s_j · dy[a:b] B_j``: ``dA_j = g^T x[a:b]``, ``dB_j = s_j · dy[a:b]^T h``, ``dx[a:b] = g A_j``.
Four products per job per layer (the general serving operator's backward takes six and gathers its tables),
each job at its own rank (nothing padded to the largest), and the gradients go straight to each job's own
``lora_A``/``lora_B`` (no stacked tables to differentiate through). Tokens of jobs that do not adapt the module
pass through unchanged (their ``dx`` is zero from this term).

Measured against the serving operator (``lorakit.serve.ops.lora_add_`` with `multi_lora.BatchedLoRA`'s backward)
in bench/multi_job.py's operator table; that operator stays the trainer's general path (``backend=`` one of its
backends) and the ground truth of the gradient tests.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

Span = tuple[int, int, nn.Module]  # (first token, end token, the job's LoRALinear)


class JobSegmentLoRA(torch.autograd.Function):
    """``y[a:b] += s · x[a:b] A^T B^T`` per span (in place); differentiable in ``y``, ``x`` and every A and B."""

    @staticmethod
    def forward(ctx, y, x, bounds, scales, *weights):
        hs = []
        for i, (a, b) in enumerate(bounds):
            h = x[a:b] @ weights[2 * i].T  # [n, r]
            y[a:b].addmm_(h, weights[2 * i + 1].T, alpha=scales[i])
            hs.append(h)
        ctx.mark_dirty(y)
        ctx.save_for_backward(x, *weights, *hs)
        ctx.bounds, ctx.scales = bounds, scales
        return y

    @staticmethod
    def backward(ctx, dy):
        x, *rest = ctx.saved_tensors
        k = len(ctx.bounds)
        weights, hs = rest[:2 * k], rest[2 * k:]
        want_dx = ctx.needs_input_grad[1]
        covered = sum(b - a for a, b in ctx.bounds) == x.shape[0]
        dx = (torch.empty_like(x) if covered else torch.zeros_like(x)) if want_dx else None
        grads = []
        for i, (a, b) in enumerate(ctx.bounds):
            a_w, b_w, s, dy_j = weights[2 * i], weights[2 * i + 1], ctx.scales[i], dy[a:b]
            g = dy_j @ b_w  # [n, r]
            if s != 1.0:
                g.mul_(s)
            db = dy_j.T @ hs[i]  # [out, r]
            if s != 1.0:
                db.mul_(s)
            grads += [g.T @ x[a:b], db]
            if want_dx:
                torch.mm(g, a_w, out=dx[a:b])
        return (dy, dx, None, None, *grads)


def job_segment_lora(y: torch.Tensor, x: torch.Tensor, spans: Sequence[Span], fused: bool = True) -> torch.Tensor:
    """``y [T, out]`` plus each span's LoRA update from ``x [T, in]``; in place when ``fused``."""
    bounds = [(a, b) for a, b, _ in spans]
    scales = [float(layer.scaling) for _, _, layer in spans]
    weights = [w for _, _, layer in spans for w in (layer.lora_A.weight, layer.lora_B.weight)]
    if fused:
        return JobSegmentLoRA.apply(y, x, bounds, scales, *weights)
    return y + JobSegmentLoRA.apply(torch.zeros_like(y), x, bounds, scales, *weights)
