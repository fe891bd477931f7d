"""Several named adapters on one model, as PEFT users work with them: add, activate, delete, mix per row.

Adapters nest: an adapter added beside others wraps the layer as it stands (``base_layer`` is then the previous
adapter), so each layer still holds one adapter and the model's own weights stay where they were. A layer whose
adapter is not active passes its input through (``disabled``). Several active adapters therefore add their
updates, in the order they were added, exactly as PEFT sums its active adapters; ``set_adapter`` allows it only
for methods that declare ``servable`` (their forward is the base output plus s·B·A x, checked by the conformance
suite), and for parameter adapters (``target_parameters``), whose updates add to the same weight.

Mixed batches (one adapter per row) are in ``core/mixed.py``.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence, Union

from torch import nn

from .adapter import Adapter, ModulesToSave, innermost
from .apply import _set_module, apply, set_trainable, unwrap, wrapped_modules
from .named import (ACTIVE_ATTR, BASE, CONFIG_ATTR, DEFAULT, NAME_ATTR, OTHERS_ATTR, active_adapters, adapter_configs,
                    adapter_names, check_name)
from .config import AdapterConfig
from .mixed import tops as _tops
from .registry import METHODS, initializer_for

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
    for other, c in adapter_configs(model).items():
        init = initializer_for(c.init_lora_weights)
        if c.bias != "none" or (init is not None and init.mutates_base):
            raise ValueError(f"adapter {other!r} changed base weights (bias={c.bias!r}, init_lora_weights="
                             f"{c.init_lora_weights!r}) that an adapter beside it would share; add {name!r} to a "
                             "model of its own")
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
