"""Which adapters a model carries, by name, and which are active: the records ``apply`` and ``add_adapter`` keep.

A model from ``apply`` carries one adapter, named ``"default"`` unless named otherwise; its config stays in
``lorakit_config`` as it always has. Adapters added beside it (``lorakit.add_adapter``) keep their configs in
``lorakit_other_adapters``, in the order they were added; ``lorakit_active_adapters`` lists the active ones. Each
adapter layer carries its adapter's name (``Adapter.adapter_name``) and its module path as it would be on a model
with that adapter alone (``module_path``), which is where PEFT's files put its tensors.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from .adapter import Adapter, ModulesToSave
from .config import AdapterConfig

CONFIG_ATTR = "lorakit_config"  # the first adapter's config
NAME_ATTR = "lorakit_adapter_name"  # the first adapter's name, when it is not "default"
OTHERS_ATTR = "lorakit_other_adapters"  # name -> config of the adapters added after the first
ACTIVE_ATTR = "lorakit_active_adapters"  # the active adapters' names (absent: the first one)
DEFAULT = "default"
BASE = "__base__"  # the row name that means "no adapter" in a mixed batch (as PEFT)


def adapter_configs(model: nn.Module) -> dict[str, AdapterConfig]:
    """The model's adapters' configs by name, in the order they were added."""
    first = getattr(model, CONFIG_ATTR, None)
    if first is None:
        return {}
    return {getattr(model, NAME_ATTR, DEFAULT): first, **getattr(model, OTHERS_ATTR, {})}


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapters on ``model``, in the order they were added."""
    return list(adapter_configs(model))


def active_adapters(model: nn.Module) -> list[str]:
    """The names of the active adapters (those the forward applies)."""
    names = adapter_names(model)
    return list(getattr(model, ACTIVE_ATTR, names[:1]))


def check_name(model: nn.Module, name: str) -> str:
    """``name`` if the model has an adapter so called; a KeyError listing the names otherwise."""
    names = adapter_names(model)
    if name not in names:
        raise KeyError(f"{type(model).__name__} has no adapter named {name!r}; its adapters: "
                       f"{', '.join(map(repr, names)) or '(none)'}")
    return name


def selected(model: nn.Module, adapter_name: Optional[str] = None, doing: str = "continue") -> str:
    """``adapter_name`` checked, or the model's only adapter, or its only active one; otherwise a clear error."""
    if adapter_name is not None:
        return check_name(model, adapter_name)
    names, active = adapter_names(model), active_adapters(model)
    if not names:
        raise ValueError(f"{type(model).__name__} has no lorakit adapter: call lorakit.apply(model, config) first")
    if len(names) == 1:
        return names[0]
    if len(active) == 1:
        return active[0]
    raise ValueError(f"cannot {doing}: {type(model).__name__} has adapters {', '.join(map(repr, names))} with "
                     f"{len(active)} active ({', '.join(map(repr, active)) or 'none'}); name one (adapter_name=...) "
                     "or make one active with lorakit.set_adapter(model, name)")


def layers_of(model: nn.Module, adapter_name: str) -> dict[str, nn.Module]:
    """The adapter and ``modules_to_save`` layers of one adapter, keyed by their module path in PEFT's files."""
    found = {p: m for p, m in model.named_modules() if isinstance(m, (Adapter, ModulesToSave))}
    if len(adapter_names(model)) <= 1:
        return found  # one adapter: the paths are the model's own
    return {m.module_path: m for m in found.values() if m.adapter_name == adapter_name}
