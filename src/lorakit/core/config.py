"""Adapter configurations: frozen dataclasses with PEFT's field names, defaults and JSON form.

A config describes a whole model's adapter (which modules, which rank). ``for_module(path)`` resolves it
for one module: ``rank_pattern`` and ``alpha_pattern`` applied, the patterns cleared, so the per-module
config is all a layer's pure functions (``delta``, ``low_rank``) need.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

Targets = Optional[Union[str, list]]


def pattern_value(patterns: dict, path: str, default: Any) -> Any:
    """PEFT's pattern lookup: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", path)`` wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is not None:
        return isinstance(value, origin)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


@functools.lru_cache(maxsize=None)
def _field_hints(cls: type) -> dict:
    """``typing.get_type_hints`` per config class, once: it re-evaluates every annotation string (~10 ms)."""
    return typing.get_type_hints(cls)


@dataclass(frozen=True)
class AdapterConfig:
    """Fields every adapter method shares (PEFT's names and defaults)."""

    peft_type: ClassVar[str] = ""
    method: ClassVar[str] = ""

    r: int = 8
    target_modules: Targets = None
    exclude_modules: Targets = None
    modules_to_save: Optional[list] = None
    layers_to_transform: Optional[Union[int, list]] = None
    layers_pattern: Optional[Union[str, list]] = None
    rank_pattern: dict = field(default_factory=dict)
    bias: str = "none"
    fan_in_fan_out: bool = False
    init_lora_weights: Union[bool, str] = True
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        hints = _field_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (tuple, set, frozenset)):
                value = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
                object.__setattr__(self, f.name, value)
            if not _type_ok(value, hints[f.name]):
                hint = hints[f.name]
                expected = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
                raise TypeError(
                    f"{type(self).__name__}.{f.name}: expected {expected}, found {type(value).__name__} "
                    f"({value!r})"
                )
        if self.r < 0:
            raise ValueError(f"{type(self).__name__}.r must be >= 0, found {self.r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'lora_only', found {self.bias!r}")
        # PEFT refuses these combinations when it reads the config, so a file written with them would not load.
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern):
            raise ValueError(
                f"{type(self).__name__}: layers_to_transform/layers_pattern need target_modules as a list of names; "
                f"with a regex (target_modules={self.target_modules!r}) put the layer indices in the regex"
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(f"{type(self).__name__}: layers_pattern={self.layers_pattern!r} needs layers_to_transform")

    @property
    def method_name(self) -> str:
        """Registry key of the method this config builds."""
        return self.method

    def rank_for(self, path: str) -> int:
        return int(pattern_value(self.rank_pattern, path, self.r))

    def for_module(self, path: str) -> "AdapterConfig":
        """This config resolved for one module: patterns applied, then cleared."""
        if not self.rank_pattern:  # nothing to resolve (and a copy would re-run the field checks)
            return self
        return dataclasses.replace(self, r=self.rank_for(path), rank_pattern={})

    def for_targets(self, layers: dict) -> "AdapterConfig":
        """This config completed from the layers it targets, by path (default: unchanged).

        For methods whose layers share model-level state (RandLoRA's random bases): ``apply`` calls it once.
        """
        return self

    @classmethod
    def claims(cls, data: dict) -> bool:
        """Whether a PEFT ``adapter_config.json`` dict describes this config class."""
        if data.get("lorakit_method"):
            return data["lorakit_method"] == cls.method
        return data.get("peft_type") == cls.peft_type

    def to_dict(self) -> dict:
        """The JSON form: PEFT's fields, plus ``lorakit_method`` for methods PEFT does not have."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["peft_type"] = self.peft_type
        if self.peft_type.startswith("LORAKIT"):
            out["lorakit_method"] = self.method
        return out

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "AdapterConfig":
        """Build from a PEFT-style dict: unknown keys are warned about and dropped, as PEFT does."""
        names = {f.name for f in dataclasses.fields(cls)}
        ignored = {"peft_type", "lorakit_method", "peft_version", "auto_mapping"}
        unknown = sorted(k for k in data if k not in names and k not in ignored)
        if unknown:
            warnings.warn(f"{source}: ignoring fields {cls.__name__} does not know: {', '.join(unknown)}", stacklevel=2)
        kwargs = {k: v for k, v in data.items() if k in names}
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise TypeError(f"{source}: {e}") from None


@dataclass(frozen=True)
class LoRAConfig(AdapterConfig):
    """LoRA (Hu et al., arXiv:2106.09685): ΔW = (lora_alpha / r) · B A, or lora_alpha / sqrt(r) with rsLoRA."""

    peft_type: ClassVar[str] = "LORA"
    method: ClassVar[str] = "lora"

    lora_alpha: float = 8
    lora_dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    lora_bias: bool = False
    alpha_pattern: dict = field(default_factory=dict)
    target_parameters: Optional[list] = None  # PEFT's: parameters adapted directly, e.g. fused MoE expert weights

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lora_bias:
            raise NotImplementedError("lora_bias=True is not supported yet; use lora_bias=False")
        if self.use_dora and self.method not in ("lora", "dora"):
            raise ValueError(f"{type(self).__name__}: use_dora=True applies to LoRA only; use DoRAConfig")

    @property
    def method_name(self) -> str:
        return "dora" if self.use_dora else self.method  # subclasses (LoRA variants) build their own method

    @classmethod
    def claims(cls, data: dict) -> bool:
        return super().claims(data) and not data.get("use_dora", False)

    def for_module(self, path: str) -> "LoRAConfig":
        if not self.rank_pattern and not self.alpha_pattern:
            return self
        alpha = pattern_value(self.alpha_pattern, path, self.lora_alpha)
        return dataclasses.replace(self, r=self.rank_for(path), lora_alpha=alpha, rank_pattern={}, alpha_pattern={})

    @property
    def scaling(self) -> float:
        """lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA (for a config resolved per module)."""
        if self.r == 0:
            return 0.0
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


@dataclass(frozen=True)
class DoRAConfig(LoRAConfig):
    """DoRA (Liu et al., arXiv:2402.09353): PEFT's LoRA with ``use_dora=True``."""

    method: ClassVar[str] = "dora"
    use_dora: bool = True

    @classmethod
    def claims(cls, data: dict) -> bool:
        return data.get("peft_type") == cls.peft_type and bool(data.get("use_dora", False))
