"""Adapters on parameters in the server: PEFT's ``target_parameters`` on fused MoE expert weights (Mixtral,
Qwen3-MoE, GPT-OSS) and other bare parameters, for each request its own.

An expert's update acts inside the experts' own computation (before the activation, for the experts each token is
routed to), so it cannot be added to a module output as the LoRA operator does. Instead, each targeted module gets
a forward hook: after the module has run for the whole step (the base result, kept for tokens without such an
adapter), for each adapter in the step the module runs again on that adapter's tokens alone with its parameters
replaced by W + ΔW (``torch.func.functional_call``), ΔW computed as lorakit's and PEFT's forward compute it
(``methods.lora_params.fold``, one ``baddbmm`` over the experts). Those tokens' rows of the output are replaced.
A token's row of an experts module depends only on that token's input and routing, so this is that request's own
forward: the tokens equal PEFT's. The cost per step and adapter is PEFT's: ΔW of every expert of the module once,
and the module again over the adapter's tokens.

Residency: such an adapter packs its linear modules' LoRA tables as usual and appends its parameter factors
(A [r·E, in], B [out, r·E], fp32) to the same pool slot (``ParameterAdapter``/``ParameterClass``), so the pool's
budget, reference counts and eviction cover them. The step's tokens are found through the runner's step plan
(token rows per pool class and slot), the same rows every adapted layer reads; a module whose input does not have
one row per token of the plan is refused in the step rather than guessed.
"""
from __future__ import annotations

import threading
from typing import Optional

import torch
from torch import nn
from torch.func import functional_call

from ..core.targets import LINEAR_TYPES
from ..methods.lora_params import fold
from .pool import PackedAdapter, ShapeClass, slot_layout

ParamShapes = dict[str, dict[str, tuple[tuple[int, ...], bool]]]  # module -> parameter -> (shape, transposed)


def parameter_shapes(model: nn.Module) -> ParamShapes:
    """Own parameters of 2 or more dimensions of every module that is not a linear layer or an embedding."""
    out: ParamShapes = {}
    for path, module in model.named_modules():
        if not path or isinstance(module, (*LINEAR_TYPES, nn.Embedding)):
            continue
        transposed = bool(getattr(module, "is_transposed", False))
        own = {n: (tuple(p.shape), transposed and p.dim() == 3) for n, p in module.named_parameters(recurse=False)
               if p.dim() >= 2}
        if own:
            out[path] = own
    return out


def locate(path: str, wanted: list[str], params: ParamShapes) -> Optional[tuple[str, str]]:
    """(module, parameter) of a state path under PEFT's nesting rule (the first targeted parameter innermost)."""
    depth, module = 0, path
    while module.endswith(".base_layer"):
        depth, module = depth + 1, module[: -len(".base_layer")]
    names = [n for n in params.get(module, {}) if f"{module}.{n}" in wanted or any(f"{module}.{n}".endswith("." + t)
                                                                                  for t in wanted)]
    if depth >= len(names):
        return None
    return module, names[len(names) - 1 - depth]


class ParameterAdapter(PackedAdapter):
    """A packed adapter with parameter factors after its linear modules' tables, in one blob."""

    def __init__(self, aid: str, modules: dict, parameters: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor, int, float, bool]]):
        self.aid = aid
        linear = tuple((p, at.shape[0], bt.shape[1], at.shape[1]) for p, (at, bt) in sorted(modules.items()))
        self.params = sorted(parameters)
        self.meta = {k: (parameters[k][0].shape, parameters[k][1].shape, parameters[k][2], parameters[k][3], parameters[k][4])
                     for k in self.params}
        # the parameter entries come after the linear ones; each names its module first, as the runner expects
        self.key = linear + tuple((m, "parameter", n, tuple(self.meta[(m, n)][0]), tuple(self.meta[(m, n)][1]),
                                   *self.meta[(m, n)][2:]) for m, n in self.params)
        flat = [t.reshape(-1) for p in sorted(modules) for t in modules[p]]
        flat += [t.detach().float().reshape(-1) for k in self.params for t in parameters[k][:2]]
        self.blob = torch.cat(flat) if flat else torch.zeros(0, device="cpu")
        self.nbytes = self.blob.nbytes
        self.linear = linear

    def slot_bytes(self, dtype: torch.dtype) -> int:
        return self.blob.numel() * dtype.itemsize

    def make_class(self, dtype: torch.dtype, device: torch.device) -> "ParameterClass":
        return ParameterClass(self, dtype, device)

    def modules(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        _, offsets = slot_layout(self.linear)
        return {p: (self.blob[a:b].view(i, r), self.blob[b:e].view(r, o))
                for (p, i, o, r), (a, b, e) in zip(self.linear, offsets.values())}


class ParameterClass(ShapeClass):
    """Slots of adapters with parameter factors: linear tables as usual, plus per slot the factors of each
    targeted parameter."""

    def __init__(self, template: ParameterAdapter, dtype: torch.dtype, device: torch.device):
        self.template = template
        super().__init__(template.key, dtype, device)

    def layout(self) -> tuple[int, dict]:
        at, offsets = slot_layout(self.template.linear)
        self.param_offsets = {}
        for k in self.template.params:
            a_shape, b_shape = self.template.meta[k][:2]
            na, nb = a_shape.numel(), b_shape.numel()
            self.param_offsets[k] = (at, at + na, at + na + nb)
            at += na + nb
        return at, offsets

    def views(self, storage: torch.Tensor) -> dict:
        return {p: (storage[:, a:b].unflatten(1, (i, r)), storage[:, b:e].unflatten(1, (r, o)))
                for (p, i, o, r), (a, b, e) in zip(self.template.linear, self.offsets.values())}

    def parameters_of(self, slot: int, module: str) -> dict[str, tuple[dict[str, torch.Tensor], int, float, bool]]:
        """Parameter name -> (factors, r, scaling, transposed) of the adapter in ``slot``, for ``module``."""
        row, out = self.storage[slot], {}
        for (m, name), (a, b, e) in self.param_offsets.items():
            if m == module:
                a_shape, b_shape, r, scale, transposed = self.template.meta[(m, name)]
                out[name] = ({"lora_A.weight": row[a:b].view(a_shape), "lora_B.weight": row[b:e].view(b_shape)},
                             r, scale, transposed)
        return out


class ParameterHooks:
    """Forward hooks that rerun targeted modules per adapter, on the runner's model (see the module docstring)."""

    def __init__(self, runner):
        self.runner = runner
        self.modules = {p: runner.modules[p] for p in parameter_shapes(runner.model)}
        self._inside = threading.local()
        self.handles = [m.register_forward_hook(self._hook(p), with_kwargs=True) for p, m in self.modules.items()]

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _hook(self, path: str):
        def rerun(module, args, kwargs, output):
            plan = self.runner._plan  # the step's token rows per pool class and slot (AttributeError if it moved)
            if plan is None or not self.runner._stepping or getattr(self._inside, "on", False):
                return None
            groups = []
            for cp in plan.classes:
                cls = self.runner.pool.classes.get(cp.key)
                if not isinstance(cls, ParameterClass) or not any(m == path for m, _ in cls.param_offsets):
                    continue
                rows = torch.arange(plan.num_tokens, device=output_tensor(output).device) if cp.index is None else cp.index
                start = 0
                for j, count in enumerate(cp.counts):
                    if count:
                        groups.append((cls, cp.lo + j, rows[start:start + count]))
                        start += count
            if not groups:
                return None
            return self._rerun(path, module, args, kwargs, output, plan.num_tokens, groups)

        return rerun

    def _rerun(self, path, module, args, kwargs, output, tokens: int, groups):
        if not all(a.dim() and a.shape[0] == tokens for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor)):
            raise RuntimeError(f"module '{path}': its inputs do not have one row per token of the step "
                               f"({tokens}); the server cannot apply parameter adapters to it exactly")
        outs = list(output) if isinstance(output, tuple) else [output]
        outs = [o.clone() if isinstance(o, torch.Tensor) and o.shape[0] == tokens else o for o in outs]
        self._inside.on = True
        try:
            for cls, slot, rows in groups:
                new = {name: fold(getattr(module, name), tensors, r, scale, transposed)
                       for name, (tensors, r, scale, transposed) in cls.parameters_of(slot, path).items()}
                pick = lambda a: a.index_select(0, rows) if isinstance(a, torch.Tensor) else a  # noqa: E731
                sub = functional_call(module, new, tuple(pick(a) for a in args), {k: pick(v) for k, v in kwargs.items()})
                for o, s in zip(outs, sub if isinstance(sub, tuple) else (sub,)):
                    if isinstance(o, torch.Tensor) and o.shape[0] == tokens:
                        o.index_copy_(0, rows, s.to(o.dtype))
        finally:
            self._inside.on = False
        return tuple(outs) if isinstance(output, tuple) else outs[0]


def output_tensor(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output
