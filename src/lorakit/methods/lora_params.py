"""LoRA on parameters: PEFT's ``target_parameters``, for fused MoE expert weights and other bare nn.Parameters.

LoRA's update (Hu et al., arXiv:2106.09685) on a parameter rather than a layer. For a stack of E experts
W [E, d1, d2] the adapter holds PEFT's layout, A [r·E, in] and B [out, r·E]: expert e takes A's rows e·r..e·r+r-1
and B's columns e, E+e, 2E+e, ... (B viewed as [out, r, E]), and ΔW_e = s · B_e A_e, laid out as W is:
[E, out, in] (Mixtral, Qwen-MoE), or [E, in, out] when the module sets ``is_transposed`` (GPT-OSS). A 2-D
parameter [out, in] is one expert. The module runs with W + ΔW in W's place (``torch.func.functional_call``),
computed as PEFT computes it (one ``baddbmm`` over a stack, W + ΔW otherwise), so outputs agree to rounding.
Several parameters of one module nest in the module's parameter order, the first innermost, as PEFT nests its
ParamWrappers, so file keys are PEFT's (``<module>.base_layer.lora_A.weight`` for the inner one).
As in PEFT: no dropout, no fan_in_fan_out, no DoRA, no mixed batches (the experts see tokens, not rows); the
factors are fp32 over a half-precision parameter and cast to its dtype for the fold, so bf16 outputs are PEFT's.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.func import functional_call

from ..core.adapter import Adapter, innermost
from ..core.config import LoRAConfig
from ..core.registry import METHODS
from .lora import LoRALayer


def expert_factors(tensors: dict[str, torch.Tensor], r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [E, r, in], B [E, out, r]) from PEFT's stacked A [r·E, in] and B [out, r·E]."""
    a, b = tensors["lora_A.weight"], tensors["lora_B.weight"]
    if r <= 0 or a.shape[0] % r or a.shape[0] != b.shape[1]:
        raise ValueError(f"LoRA on a parameter: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not r·E "
                         f"stacks of rank r={r}")
    experts = a.shape[0] // r
    return a.reshape(experts, r, a.shape[1]), b.reshape(b.shape[0], r, experts).permute(2, 0, 1)


def fold(w: torch.Tensor, tensors: dict[str, torch.Tensor], r: int, scaling: float, transposed: bool) -> torch.Tensor:
    """W + ΔW for a parameter ``w`` (2-D, or a stack of experts), as PEFT's parametrisation computes it."""
    if w.dim() == 2:
        delta = tensors["lora_B.weight"] @ tensors["lora_A.weight"] * scaling
        return w + (delta.T if transposed else delta).to(w.dtype)
    a3, b3 = expert_factors(tensors, r)
    lhs, rhs = (a3.transpose(-2, -1), b3.transpose(-2, -1)) if transposed else (b3, a3)
    with torch.autocast(device_type=w.device.type, enabled=False):
        return torch.baddbmm(w, lhs.to(w.dtype), rhs.to(w.dtype), alpha=scaling)


@METHODS.register()
class LoRAParameter(LoRALayer):
    """LoRA on one parameter of a module (``target_parameters``): a 2-D weight or a 3-D stack of experts."""

    layer_types = ()  # chosen by parameter, never by layer type
    wraps_parameters = True

    def __init__(self, base_layer: nn.Module, config: LoRAConfig, module_path: str = "", parameter_name: str = ""):
        where = f"module '{module_path}', parameter '{parameter_name}'"
        for name, value in (("lora_dropout", config.lora_dropout), ("fan_in_fan_out", config.fan_in_fan_out),
                            ("use_dora", config.use_dora)):
            if value:
                raise ValueError(f"{where}: LoRA on a parameter (target_parameters) does not work with {name}="
                                 f"{value!r} (nor in PEFT); set it off, or target the module's layers instead")
        super().__init__(base_layer, config, module_path)
        self.parameter_name = parameter_name
        w = self.parameter()
        if w.dim() not in (2, 3):
            raise ValueError(f"{where}: a {w.dim()}-D parameter; LoRA adapts 2-D weights and 3-D expert stacks only")
        self.num_experts = w.shape[0] if w.dim() == 3 else 1
        self.transposed = w.dim() == 3 and bool(getattr(innermost(base_layer), "is_transposed", False))
        out_f, in_f = (w.shape[2], w.shape[1]) if self.transposed else (w.shape[-2], w.shape[-1])
        # fp32 factors over a half-precision parameter (PEFT's autocast_adapter_dtype); cast to W's dtype to fold
        kw = dict(device=w.device, dtype=torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype)
        self.lora_A = nn.Linear(in_f, config.r * self.num_experts, bias=False, **kw)
        self.lora_B = nn.Linear(config.r * self.num_experts, out_f, bias=False, **kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._init_pair(self.lora_A.weight, self.lora_B.weight)

    def parameter(self) -> torch.Tensor:
        """The adapted parameter, on the original module."""
        return getattr(innermost(self.base_layer), self.parameter_name)

    def _path(self) -> str:
        """The parameter's name seen from ``base_layer`` (through any adapters nested below this one)."""
        depth, node = 0, self.base_layer
        while isinstance(node, Adapter):
            depth, node = depth + 1, node.base_layer
        return "base_layer." * depth + self.parameter_name

    @classmethod
    def delta(cls, tensors, config, base_weight: Optional[torch.Tensor], transposed: Optional[bool] = None):
        """ΔW in the parameter's layout; a stack's layout comes from ``transposed`` or else ``base_weight``'s shape."""
        a, b = tensors["lora_A.weight"], tensors["lora_B.weight"]
        if base_weight is None or base_weight.dim() == 2:
            return b @ a * config.scaling
        a3, b3 = expert_factors(tensors, config.r)
        normal, swapped = (a3.shape[0], b3.shape[1], a3.shape[2]), (a3.shape[0], a3.shape[2], b3.shape[1])
        if transposed is None:
            if tuple(base_weight.shape) not in (normal, swapped) or normal == swapped:
                raise ValueError(f"LoRA on a parameter: cannot tell the layout of a {tuple(base_weight.shape)} stack "
                                 f"from factors for {normal}; apply the adapter to the model and merge there")
            transposed = tuple(base_weight.shape) == swapped
        # PEFT's einsum: B [out, r, E] and A [E, r, in]
        spec = "ore,eri->eio" if transposed else "ore,eri->eoi"
        return torch.einsum(spec, b.reshape(b.shape[0], config.r, -1), a3) * config.scaling

    @classmethod
    def low_rank(cls, tensors, config):
        experts = tensors["lora_A.weight"].shape[0] // max(config.r, 1)
        return (tensors["lora_A.weight"], tensors["lora_B.weight"], config.scaling) if experts == 1 else None

    def updated(self) -> torch.Tensor:
        """W + ΔW, as PEFT's parametrisation computes it."""
        tensors = {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}
        return fold(self.parameter(), tensors, self.r, self.scaling, self.transposed)

    def forward(self, x, *args, **kwargs):
        if self.disabled or self.r == 0:
            return self.base_layer(x, *args, **kwargs)
        return functional_call(self.base_layer, {self._path(): self.updated()}, (x, *args), kwargs)

    def merge_target(self) -> tuple[str, torch.Tensor]:
        return f"base_layer.{self._path()}", self.parameter()

    def delta_weight(self) -> torch.Tensor:
        tensors = {k: v.detach() for k, v in self.adapter_tensors().items()}
        w = self.parameter()
        return type(self).delta(tensors, self.config, w.detach(), self.transposed).to(w.dtype)

    def merged_layer(self) -> nn.Module:
        self.check_mergeable()
        delta = self.delta_weight()
        if not torch.isfinite(delta).all():
            raise ValueError(f"module '{self.module_path}': the adapter's update has NaN or inf; refusing to merge")
        with torch.no_grad():
            self.parameter().add_(delta)
        return self.base_layer

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, parameter={self.parameter_name!r}, experts={self.num_experts}"
