"""Entry points that put adapters on a model and take them off again.

``apply`` wraps the targeted layers in place and freezes everything else; ``merge`` folds the updates into
the base weights; ``unwrap`` removes the adapters without merging; ``disabled`` runs the base model.
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Iterator, Optional, Union

import torch
from torch import nn

from .adapter import Adapter, ModulesToSave
from .config import AdapterConfig
from .named import ACTIVE_ATTR, CONFIG_ATTR, DEFAULT, NAME_ATTR, OTHERS_ATTR, active_adapters, adapter_configs, selected
from .registry import METHODS, initializer_for
from .targets import (LINEAR_TYPES, expand_all_linear, is_module_to_save, is_target, no_match_message,
                      parameter_targets)

Wrapped = Union[Adapter, ModulesToSave]


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def adapters(model: nn.Module) -> dict[str, Adapter]:
    """The adapter layers of ``model`` by module path."""
    return {p: m for p, m in model.named_modules() if isinstance(m, Adapter)}


def wrapped_modules(model: nn.Module) -> dict[str, Wrapped]:
    """Adapters and ``modules_to_save`` wrappers by module path."""
    return {p: m for p, m in model.named_modules() if isinstance(m, (Adapter, ModulesToSave))}


def config_of(model: nn.Module, adapter_name: Optional[str] = None) -> AdapterConfig:
    """The config ``apply`` or ``load_peft`` put on ``model`` (of the adapter named, or the only or only active one)."""
    return adapter_configs(model)[selected(model, adapter_name, "tell which adapter's config is meant")]


def resolve(model: nn.Module, config: AdapterConfig) -> AdapterConfig:
    """The config as it will be saved: ``all-linear`` expanded, ``fan_in_fan_out`` set for Conv1D targets."""
    if config.task_type == "SEQ_CLS":  # as PEFT: the classification head trains and saves in full
        heads = [h for h in ("classifier", "score") if isinstance(getattr(model, h, None), nn.Module)]
        extra = [h for h in heads if h not in (config.modules_to_save or [])]
        if extra:
            config = dataclasses.replace(config, modules_to_save=list(config.modules_to_save or []) + extra)
    if config.target_modules == "all-linear":
        config = dataclasses.replace(config, target_modules=expand_all_linear(model, config))
    if config.target_modules is None and not getattr(config, "target_parameters", None):
        raise ValueError(
            f"{type(config).__name__}.target_modules is None: name the modules to adapt, e.g. "
            "target_modules=['q_proj', 'v_proj'] or 'all-linear'"
        )
    targets = [m for p, m in model.named_modules() if is_target(p, config)]
    conv1d = [m for m in targets if isinstance(m, LINEAR_TYPES[1:])]
    linear = [m for m in targets if isinstance(m, nn.Linear)]
    if conv1d and linear:
        raise ValueError(
            f"{type(config).__name__}: the targets mix nn.Linear and Conv1D layers, whose weights are stored "
            "transposed to each other ([out, in] vs [in, out]), and one fan_in_fan_out cannot describe both; "
            "adapt them with separate configs or narrow target_modules")
    if conv1d and not config.fan_in_fan_out:
        config = dataclasses.replace(config, fan_in_fan_out=True)  # Conv1D stores weights as [in, out]
    elif linear and config.fan_in_fan_out:  # as PEFT: nn.Linear stores [out, in]; the flag would transpose it
        warnings.warn(f"{type(config).__name__}: fan_in_fan_out=True, but the targets are nn.Linear layers; "
                      "setting fan_in_fan_out=False")
        config = dataclasses.replace(config, fan_in_fan_out=False)
    return config


def apply(model: nn.Module, config: AdapterConfig, adapter_name: str = DEFAULT) -> nn.Module:
    """Add the adapter ``config`` describes to ``model`` in place, freeze the rest, and return ``model``."""
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"expected an adapter config (e.g. lorakit.LoRAConfig), found {type(config).__name__}")
    if wrapped_modules(model):
        raise ValueError(f"{type(model).__name__} already has a lorakit adapter: merge(model) or unwrap(model) first, "
                         "or add another beside it with lorakit.add_adapter(model, name, config)")
    method = METHODS.get(config.method_name)
    config = resolve(model, config)
    targets = [(p, m) for p, m in model.named_modules() if p and is_target(p, config)]
    params = parameter_targets(model, config)
    if not targets and not params:
        raise ValueError(no_match_message(model, config))
    config = config.for_targets(dict(targets))
    for p in model.parameters():
        p.requires_grad_(False)
    for path, module in targets:
        cls = method.adapter_class_for(module)
        if cls is None:
            supported = ", ".join(t.__name__ for t in method.layer_types)
            raise TypeError(
                f"module '{path}' is a {type(module).__name__}; method '{method.name}' adapts {supported}. "
                "Narrow target_modules or exclude_modules."
            )
        _set_module(model, path, cls(module, config.for_module(path), path))
    if params:
        _wrap_parameters(model, config, params, method)
    for path, module in list(model.named_modules()):
        if is_module_to_save(path, config.modules_to_save) and not isinstance(module, (Adapter, ModulesToSave)):
            if not any(path.startswith(q + ".") for q in wrapped_modules(model)):
                _set_module(model, path, ModulesToSave(module, path))
    _set_bias_trainable(model, config)
    setattr(model, CONFIG_ATTR, config)
    if adapter_name != DEFAULT:
        setattr(model, NAME_ATTR, adapter_name)
        for module in wrapped_modules(model).values():
            module.adapter_name = adapter_name
    from .mixed import install_mixed_batch_hook  # mixed builds on this module

    install_mixed_batch_hook(model)
    initializer = initializer_for(config.init_lora_weights)
    if initializer is not None and not initializer.needs_data:
        initializer.run(model)  # pissa, olora, orthogonal; data-driven ones wait for lorakit.initialize
    return model


def _wrap_parameters(model: nn.Module, config: AdapterConfig, params: dict[str, list[str]], method) -> None:
    """Wrap each targeted parameter (PEFT's ``target_parameters``); several on one module nest, the first innermost."""
    cls = next((c for c in method.adapter_classes if c.wraps_parameters), None)
    if cls is None:
        able = [n for n in METHODS.names() if any(c.wraps_parameters for c in METHODS.get(n).adapter_classes)]
        raise TypeError(f"method '{method.name}' cannot adapt parameters (target_parameters="
                        f"{config.target_parameters}); methods that can: {', '.join(able)}")
    for path, names in params.items():
        if any(p == path or p.startswith(path + ".") for p in wrapped_modules(model)):
            raise ValueError(f"module '{path}' is targeted both by target_modules and by target_parameters "
                             f"({', '.join(names)}); as in PEFT, adapt it one way only (e.g. target_modules=[])")
        layer = model.get_submodule(path)
        for i, name in enumerate(names):
            logical = path + ".base_layer" * (len(names) - 1 - i)  # where PEFT's file keeps this parameter's tensors
            for key in (f"{path}.{name}", logical):
                own = config.for_module(key)
                if (own.r, getattr(own, "lora_alpha", 0)) != (config.r, getattr(config, "lora_alpha", 0)):
                    raise ValueError(f"parameter '{path}.{name}': rank_pattern/alpha_pattern name it; per-parameter "
                                     "ranks are not supported with target_parameters, give one rank to all")
            layer = cls(layer, config.for_module(logical), logical, parameter_name=name)
        _set_module(model, path, layer)


def _set_bias_trainable(model: nn.Module, config: AdapterConfig) -> None:
    if config.bias == "none":
        return
    scope = adapters(model).values() if config.bias == "lora_only" else [model]
    # the originals beside a modules_to_save copy stay frozen (as PEFT): only the copy trains
    originals = tuple(p + ".base_layer." for p, m in wrapped_modules(model).items() if isinstance(m, ModulesToSave))
    for module in scope:
        for name, param in module.named_parameters():
            if (name == "bias" or name.endswith(".bias")) and not name.startswith(originals):
                param.requires_grad_(True)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters that train: the adapters, ``modules_to_save`` and any biases ``config.bias`` frees."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _restore(model: nn.Module, merge_weights: bool) -> nn.Module:
    found = wrapped_modules(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no lorakit adapter to {'merge' if merge_weights else 'unwrap'}")
    configs, active = adapter_configs(model), active_adapters(model)
    if merge_weights and len(configs) > 1 and len(active) != 1:
        raise ValueError(f"cannot merge: {type(model).__name__} has {len(active)} active adapters "
                         f"({', '.join(map(repr, active)) or 'none'}); merge folds exactly one: choose it with "
                         "lorakit.set_adapter(model, name), or combine them first (lorakit.merging)")
    if merge_weights:  # refuse before touching anything, so a refused merge leaves the model intact
        kept = {p: m for p, m in found.items() if len(configs) <= 1 or m.adapter_name == active[0]}
        for module in kept.values():
            if isinstance(module, Adapter):
                module.check_mergeable()
        _check_not_tied(model, {p: m for p, m in kept.items() if isinstance(m, Adapter)})
        if len(configs) > 1:  # as PEFT's merge_and_unload: the inactive adapters are dropped
            from .multi import delete_adapter

            for name in [n for n in configs if n != active[0]]:
                delete_adapter(model, name)
            found = wrapped_modules(model)
    # innermost first, so nested wrappers unwind correctly
    for path in sorted(found, key=lambda p: -p.count(".")):
        module = found[path]
        if isinstance(module, ModulesToSave):
            replacement = module.module if merge_weights else module.base_layer
        else:
            replacement = module.merged_layer() if merge_weights else module.base_layer
        _set_module(model, path, replacement)
    for attr in (CONFIG_ATTR, NAME_ATTR, OTHERS_ATTR, ACTIVE_ATTR):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def _check_not_tied(model: nn.Module, found: dict[str, Adapter]) -> None:
    """Refuse to merge into a weight that other modules share (tied embeddings): ΔW would change them too."""
    users: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        users.setdefault(id(param), []).append(name)
    for path, module in found.items():
        _, weight = module.merge_target()
        others = [n for n in users.get(id(weight), []) if not n.startswith(path + ".")]  # used outside this nest
        if others:
            raise ValueError(
                f"module '{path}': its weight is shared with {', '.join(others[:3])} (tied weights), so merging its "
                "update would change those too; keep the adapter on the model, or untie the weights first (give "
                "each module its own copy and set config.tie_word_embeddings=False)"
            )


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and remove the wrappers; returns the plain model."""
    return _restore(model, merge_weights=True)


def unwrap(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging; the base model comes back unchanged."""
    return _restore(model, merge_weights=False)


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: adapters and ``modules_to_save`` are bypassed inside the block."""
    found = wrapped_modules(model)
    before = {p: m.disabled for p, m in found.items()}
    try:
        for m in found.values():
            m.disabled = True
        yield model
    finally:
        for p, m in found.items():
            m.disabled = before[p]


@torch.no_grad()
def set_trainable(model: nn.Module, trainable: bool = True, adapter_name: Optional[str] = None) -> None:
    """Turn gradients of the adapter tensors (of one named adapter, or all) on or off (the base stays frozen)."""
    for m in wrapped_modules(model).values():
        if adapter_name is not None and m.adapter_name != adapter_name:
            continue
        for t in m.adapter_tensors().values():
            if isinstance(t, nn.Parameter):
                t.requires_grad_(trainable)
