"""Mixed batches: each row of a batch gets its own adapter, as PEFT's ``adapter_names=[...]``.

``model(..., adapter_names=[...])`` (a hook that ``apply`` puts on the model) or ``with mixed_batch(model, names)``
(for ``generate``) gives row i adapter ``names[i]``, or none for ``"__base__"``. Each adapted layer runs once per
adapter on that adapter's rows, with the other adapters of its nest passed through, so a row's output is exactly
that adapter's output alone and the base work is done once over the batch. It needs eval mode (as PEFT), layers
that see rows first (``x.shape[0]`` is checked against the names), methods that declare ``mergeable`` (one fixed
ΔW, so rows are independent), and no ``modules_to_save`` or parameter adapters (experts see tokens, not rows).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

from .adapter import Adapter, ModulesToSave
from .apply import wrapped_modules
from .named import BASE, adapter_configs
from .registry import METHODS

ROUTING_ATTR = "_lorakit_mixed_batch"


def tops(model: nn.Module) -> dict[str, nn.Module]:
    """The outermost adapter layer at each adapted path (the top of each nest)."""
    found = wrapped_modules(model)

    def nested(path: str) -> bool:  # under another adapter layer (an ancestor path is wrapped too)
        parts = path.split(".")
        return any(".".join(parts[:i]) in found for i in range(1, len(parts)))

    return {p: m for p, m in found.items() if not nested(p)}


def _check_mixable(model: nn.Module, names: Sequence[str]) -> None:
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"adapter_names: expected a list of adapter names, one per row, found {names!r}")
    configs = adapter_configs(model)
    unknown = sorted({n for n in names if n != BASE and n not in configs})
    if unknown:
        raise KeyError(f"adapter_names: {', '.join(map(repr, unknown))} not on the model; its adapters: "
                       f"{', '.join(map(repr, configs)) or '(none)'} (and {BASE!r} for the base model)")
    if model.training:
        raise ValueError("adapter_names: mixed batches run in eval mode only (as PEFT): call model.eval() first")
    layers = wrapped_modules(model).values()
    if any(isinstance(m, ModulesToSave) or m.wraps_parameters for m in layers):
        raise ValueError("adapter_names: the model has modules_to_save or parameter adapters (target_parameters), "
                         "which see tokens or whole modules rather than rows; run one adapter per batch instead")
    for name in dict.fromkeys(n for n in names if n != BASE):
        method = METHODS.get(configs[name].method_name)
        caps = method.adapter_classes[0].capabilities_for(configs[name])
        if not (method.capabilities and caps and caps.mergeable):
            raise ValueError(f"adapter_names: adapter {name!r} (method '{configs[name].method_name}') does not "
                             "declare 'mergeable': its update depends on the input, so rows cannot be given their "
                             "adapter independently; run it on a batch of its own")


def _routed(layer: nn.Module, forward, names: list[str]):
    """``layer``'s forward run once per adapter on that adapter's rows, with every other adapter passed through."""
    nest = []
    node = layer
    while isinstance(node, Adapter):
        nest.append(node)
        node = node.base_layer

    groups = {name: [i for i, n in enumerate(names) if n == name] for name in dict.fromkeys(names)}
    indices: dict = {}  # device -> the groups' row indices there

    def run(x: torch.Tensor, *args, **kwargs):
        if x.shape[0] != len(names):
            raise ValueError(f"adapter_names has {len(names)} names, but module '{layer.module_path}' sees a batch "
                             f"of {x.shape[0]} rows; give one name per row")
        if x.device not in indices:
            indices[x.device] = {n: torch.tensor(rows, device=x.device) for n, rows in groups.items()}
        before = [a.disabled for a in nest]
        out = None
        try:
            for name, rows in indices[x.device].items():
                for a in nest:
                    a.disabled = a.adapter_name != name
                y = forward(x.index_select(0, rows), *args, **kwargs)
                if out is None:
                    out = y.new_empty((x.shape[0], *y.shape[1:]))
                out[rows] = y
        finally:
            for a, flag in zip(nest, before):
                a.disabled = flag
        return out

    return run


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[nn.Module]:
    """Inside the block, row i of every batch uses adapter ``adapter_names[i]`` (``"__base__"``: none)."""
    names = list(adapter_names) if not isinstance(adapter_names, str) else adapter_names
    _check_mixable(model, names)
    layers = list(tops(model).values())
    saved = [top.__dict__.get("forward") for top in layers]  # an instance forward set by others is wrapped, then restored
    try:
        for top in layers:
            top.forward = _routed(top, top.forward, names)
        yield model
    finally:
        for top, forward in zip(layers, saved):
            if forward is None:
                top.__dict__.pop("forward", None)
            else:
                top.forward = forward


def _pre_hook(model: nn.Module, args: tuple, kwargs: dict):
    if "adapter_names" not in kwargs:
        return None
    names = kwargs.pop("adapter_names")
    if names is None:
        return args, kwargs
    first = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
    if isinstance(first, torch.Tensor) and first.dim() > 0 and first.shape[0] != len(names):
        raise ValueError(f"adapter_names has {len(names)} names for a batch of {first.shape[0]} rows; give one per row")
    stack = contextlib.ExitStack()
    stack.enter_context(mixed_batch(model, names))
    setattr(model, ROUTING_ATTR, stack)
    return args, kwargs


def _post_hook(model: nn.Module, args: tuple, kwargs: dict, output):
    stack = model.__dict__.pop(ROUTING_ATTR, None)
    if stack is not None:
        stack.close()
    return None


def install_mixed_batch_hook(model: nn.Module) -> None:
    """Let ``model(..., adapter_names=[...])`` run a mixed batch: hooks on the model, once (they stay harmless
    after the adapters are gone: names then meet a model without adapters, and are refused)."""
    if any(hook is _pre_hook for hook in model._forward_pre_hooks.values()):
        return  # found by value, so a deep copy of the model keeps exactly one pair
    model.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    model.register_forward_hook(_post_hook, with_kwargs=True, always_call=True)
