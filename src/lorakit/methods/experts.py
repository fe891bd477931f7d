"""Routed layers built from LoRA adapters: each adapter becomes one expert block (MeteoRA, LoRA-Mixer regime ii).

Expert i of a module is the adapter's (A_i, B_i, s_i), written into block i of the stacked factors as
A_i and B_i · s_i / s, with s the routed config's scaling, so that s · B A over the block equals s_i B_i A_i exactly;
a lower rank is padded with zero ranks, and an adapter that does not adapt a module gives a zero expert there.
Only the LoRA factors are taken: the adapters' ``modules_to_save`` (e.g. their classification heads) are not.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..core.apply import apply
from ..core.state import AdapterState
from ..formats.peft import load_state
from .routing import Expert, RoutedLoRA, routed_layers


def expert_states(experts: Sequence[Expert]) -> list[AdapterState]:
    """AdapterStates from states or PEFT adapter directories, checked to be plain LoRA adapters."""
    states = []
    for i, e in enumerate(experts):
        state = e if isinstance(e, AdapterState) else load_state(Path(e))
        source = f"{e}" if isinstance(e, (str, Path)) else "an AdapterState"
        state.require("exportable_to_lora", f"use expert {i} ({source}) as a block of routed LoRA ranks")
        states.append(state)
    if not states:
        raise ValueError("no experts given: pass LoRA adapter directories or AdapterStates")
    return states


def max_rank(states: Sequence[AdapterState]) -> int:
    """The largest rank any expert has on any module."""
    return max(s.low_rank(p)[0].shape[0] for s in states for p in s.modules())


def stacked_factors(states: Sequence[AdapterState], layer: RoutedLoRA) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [E·b, in], B [out, E·b]) of ``layer``'s module path with expert i in block i."""
    path, b = layer.module_path, layer.block
    a_all = torch.zeros_like(layer.lora_A.weight)
    b_all = torch.zeros_like(layer.lora_B.weight)
    for i, state in enumerate(states):
        if path not in state.tensors:
            continue
        a, bb, s = state.low_rank(path)
        if a.shape[0] > b or a.shape[1] != layer.in_features or bb.shape[0] != layer.out_features:
            raise ValueError(
                f"module '{path}', expert {i}: A {tuple(a.shape)} and B {tuple(bb.shape)} do not fit a block of "
                f"{b} ranks for in={layer.in_features}, out={layer.out_features}"
            )
        a_all[i * b : i * b + a.shape[0]] = a.to(a_all.dtype)
        b_all[:, i * b : i * b + a.shape[0]] = (bb.double() * (s / layer.scaling)).to(b_all.dtype)
    return a_all, b_all


@torch.no_grad()
def load_experts(model: nn.Module, experts: Sequence[Expert]) -> nn.Module:
    """Write LoRA adapters into the routed layers of ``model`` as experts 0..E-1 (trainable or not, per config)."""
    states = expert_states(experts)
    layers = routed_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no routed adapter layers: apply a MeteoRA or LoRA-Mixer config first")
    unknown = sorted({p for s in states for p in s.modules()} - set(layers))
    if unknown:
        raise ValueError(f"the experts adapt modules the routed adapter does not hold: {', '.join(unknown[:8])}")
    for layer in layers.values():
        if layer.num_experts != len(states):
            raise ValueError(f"module '{layer.module_path}' has {layer.num_experts} experts; {len(states)} adapters given")
        a, b = stacked_factors(states, layer)
        layer.lora_A.weight.copy_(a)
        layer.lora_B.weight.copy_(b)
    return model


def from_adapters(model: nn.Module, config_class: type, experts: Sequence[Expert], *, freeze: bool = True, **fields) -> nn.Module:
    """Apply a routed config to ``model`` whose experts are the given LoRA adapters (targets: the modules they adapt).

    ``freeze`` (default) stores the experts as fixed buffers (``train_experts=False``): only the router trains, also
    after ``load_peft(..., is_trainable=True)``; ``freeze=False`` starts trainable experts from the adapters.
    """
    states = expert_states(experts)
    r = max_rank(states)
    bases = {s.config.base_model_name_or_path for s in states} - {None}
    fields.setdefault("base_model_name_or_path", bases.pop() if len(bases) == 1 else None)
    config = config_class(
        r=r, lora_alpha=float(r), num_experts=len(states), fan_in_fan_out=states[0].config.fan_in_fan_out,
        target_modules=sorted({p for s in states for p in s.modules()}), train_experts=not freeze, **fields,
    )
    apply(model, config)
    return load_experts(model, states)
