"""Several named adapters on one model, as PEFT users work with them: add, activate, delete, mix per row.

Adapters nest: an adapter added beside others wraps the layer as it stands (``base_layer`` is then the previous
adapter), so each layer still holds one adapter and the model's own weights stay where they were. A layer whose
adapter is not active passes its input through (``disabled``). Several active adapters therefore add their
updates, in the order they were added, exactly as PEFT sums its active adapters; ``set_adapter`` allows it only
for methods that declare ``servable`` (their forward is the base output plus s·B·A x, checked by the conformance
suite), and for parameter adapters (``target_parameters``), whose updates add to the same weight.

A mixed batch (``model(..., adapter_names=[...])`` or ``with mixed_batch(model, names)``) gives each row its
own adapter, or none for ``"__base__"``: each adapted layer runs once per adapter on that adapter's rows, with
the others passed through, so a row's output is the single-adapter output. It needs methods that declare
``mergeable`` (a fixed ΔW, so rows are independent) and no parameter adapters (experts see tokens, not rows).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Sequence, Union

import torch
from torch import nn

from .adapter import Adapter, ModulesToSave, innermost
from .apply import _set_module, apply, set_trainable, unwrap, wrapped_modules
from .named import (ACTIVE_ATTR, BASE, CONFIG_ATTR, DEFAULT, NAME_ATTR, OTHERS_ATTR, active_adapters, adapter_configs,
                    adapter_names, check_name)
from .config import AdapterConfig
from .registry import METHODS, initializer_for

HOOKS_ATTR = "_lorakit_mixed_batch_hooks"
ROUTING_ATTR = "_lorakit_mixed_batch"


def _tops(model: nn.Module) -> dict[str, nn.Module]:
    """The outermost adapter layer at each adapted path (the top of each nest)."""
    found = wrapped_modules(model)
    return {p: m for p, m in found.items() if not any(p.startswith(q + ".") for q in found)}


def _sync(model: nn.Module) -> None:
    """Pass through every layer whose adapter is not active."""
    active = set(active_adapters(model))
    for layer in wrapped_modules(model).values():
        layer.disabled = layer.adapter_name not in active


def _check_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not name or name == BASE or any(c in name for c in "./\\"):
        raise ValueError(f"adapter name {name!r}: use a non-empty name without '.', '/' or '\\', other than {BASE!r}")
    if name in adapter_names(model):
        raise ValueError(f"{type(model).__name__} already has an adapter named {name!r}; delete_adapter(model, "
                         f"{name!r}) first, or load new weights into it with load_peft(..., adapter_name={name!r})")


def _check_addable(model: nn.Module, name: str, config: AdapterConfig) -> None:
    _check_name(model, name)
    if any(isinstance(m, ModulesToSave) for m in wrapped_modules(model).values()):
        raise ValueError("the model's adapter trains modules in full (modules_to_save); adapters beside it are not "
                         "supported: keep one adapter per model, or train without modules_to_save")
    if config.modules_to_save or config.bias != "none" or config.task_type == "SEQ_CLS":
        raise ValueError(f"adapter {name!r}: modules_to_save, trained biases (bias={config.bias!r}) and SEQ_CLS heads "
                         "change modules the other adapters share; add it to a model of its own")
    if initializer_for(config.init_lora_weights) is not None:
        raise ValueError(f"adapter {name!r}: init_lora_weights={config.init_lora_weights!r} changes the base "
                         "weights, which the other adapters share; add it with init_lora_weights=True")


def add_adapter(model: nn.Module, adapter_name: str, config: AdapterConfig) -> nn.Module:
    """Add a named adapter beside those ``model`` has (inactive and frozen, as in PEFT); the first one is active."""
    if not adapter_names(model):
        _check_name(model, adapter_name)
        return apply(model, config, adapter_name=adapter_name)
    _check_addable(model, adapter_name, config)
    tops = _tops(model)
    saved = {a: getattr(model, a) for a in (CONFIG_ATTR, NAME_ATTR) if hasattr(model, a)}
    for path, top in tops.items():  # the base model's view: apply targets paths and layers as they were
        _set_module(model, path, innermost(top))
    for attr in saved:
        delattr(model, attr)
    try:
        apply(model, config, adapter_name=adapter_name)
        added = getattr(model, CONFIG_ATTR)
    finally:
        new = _tops(model)
        for path, top in tops.items():
            if path in new:  # the new adapter's lowest layer now wraps the old nest
                lowest = new[path]
                while isinstance(lowest.base_layer, Adapter):
                    lowest = lowest.base_layer
                lowest.base_layer = top
            else:
                _set_module(model, path, top)
        for attr in (CONFIG_ATTR, NAME_ATTR):
            if hasattr(model, attr):
                delattr(model, attr)
        for attr, value in saved.items():
            setattr(model, attr, value)
    setattr(model, OTHERS_ATTR, {**getattr(model, OTHERS_ATTR, {}), adapter_name: added})
    set_trainable(model, False, adapter_name)
    _sync(model)
    return model


def _stackable(config: AdapterConfig) -> bool:
    """Whether the method's forward is the base output plus its own update (declared ``servable``)."""
    method = METHODS.get(config.method_name)
    caps = method.adapter_classes[0].capabilities_for(dataclasses.replace(config, target_parameters=None)) \
        if getattr(config, "target_parameters", None) else method.adapter_classes[0].capabilities_for(config)
    return bool(method.capabilities and caps and caps.servable)


def set_adapter(model: nn.Module, adapter_name: Union[str, Sequence[str]], inference_mode: bool = False) -> nn.Module:
    """Make the named adapter(s) active; as PEFT, they train (unless ``inference_mode``) and the others freeze."""
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    if not names:
        raise ValueError("set_adapter: name at least one adapter (lorakit.disabled(model) runs the base model)")
    configs = adapter_configs(model)
    for name in names:
        check_name(model, name)
    if len(names) > 1:
        for name in names:
            if not _stackable(configs[name]):
                raise ValueError(
                    f"adapters {names} cannot be active together: adapter {name!r} (method "
                    f"'{configs[name].method_name}') does not declare 'servable', so its output is not the base "
                    "output plus its own update and stacking would not add the updates; activate one at a time, "
                    "or give each row its adapter with adapter_names=[...]")
    setattr(model, ACTIVE_ATTR, list(dict.fromkeys(names)))
    for name in configs:
        set_trainable(model, name in names and not inference_mode, name)
    _sync(model)
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Remove one named adapter; the others stay as they were (the last one removed gives the base model back)."""
    check_name(model, adapter_name)
    configs = adapter_configs(model)
    if len(configs) == 1:
        return unwrap(model)
    found = wrapped_modules(model)
    for path in sorted(found, key=lambda p: -p.count(".")):  # deepest first: the shallower paths stay valid
        if found[path].adapter_name == adapter_name:
            _set_module(model, path, found[path].base_layer)
    del configs[adapter_name]
    first, *rest = configs
    setattr(model, CONFIG_ATTR, configs[first])
    if first == DEFAULT and hasattr(model, NAME_ATTR):
        delattr(model, NAME_ATTR)
    elif first != DEFAULT:
        setattr(model, NAME_ATTR, first)
    setattr(model, OTHERS_ATTR, {n: configs[n] for n in rest})
    active = [n for n in active_adapters(model) if n != adapter_name]
    setattr(model, ACTIVE_ATTR, active or [first])
    _sync(model)
    return model


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

    def run(x: torch.Tensor, *args, **kwargs):
        if x.shape[0] != len(names):
            raise ValueError(f"adapter_names has {len(names)} names, but module '{layer.module_path}' sees a batch "
                             f"of {x.shape[0]} rows; give one name per row")
        before = [a.disabled for a in nest]
        out = None
        try:
            for name in dict.fromkeys(names):
                rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
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
    tops = list(_tops(model).values())
    saved = [top.__dict__.get("forward") for top in tops]  # an instance forward set by others is wrapped, then restored
    try:
        for top in tops:
            top.forward = _routed(top, top.forward, names)
        yield model
    finally:
        for top, forward in zip(tops, saved):
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
    """Let ``model(..., adapter_names=[...])`` run a mixed batch (hooks on the model; once)."""
    if HOOKS_ATTR in model.__dict__:
        return
    pre = model.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    post = model.register_forward_hook(_post_hook, with_kwargs=True, always_call=True)
    model.__dict__[HOOKS_ATTR] = (pre, post)


def remove_mixed_batch_hook(model: nn.Module) -> None:
    """Remove the hooks ``install_mixed_batch_hook`` put on the model."""
    for handle in model.__dict__.pop(HOOKS_ATTR, ()):
        handle.remove()
