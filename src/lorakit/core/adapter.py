"""The adapter protocol: one module wraps one frozen layer and holds one adapter.

Adapter state is structural: every parameter or buffer of an adapter that is not under ``base_layer``.
``adapter_tensors()`` returns it keyed as in PEFT files (the file key minus ``base_model.model.<path>.``).
"""
from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .capabilities import Capabilities, CapabilityError, require
from .config import AdapterConfig

LowRank = tuple[torch.Tensor, torch.Tensor, float]


class AdapterShapeError(ValueError):
    """A tensor does not fit the module it is meant for."""


class NotMergeableError(CapabilityError):
    """The adapter's update depends on the input (e.g. token routing), so no weight can hold it."""


# Layer kinds that store their weight quantised (bitsandbytes, torchao): ``lorakit.compress.quantize`` registers
# objects with name, matches(layer), features(layer), compute_dtype(layer), dequantize(layer), merge(layer, delta).
QUANTIZED_KINDS: list = []


def quantized_kind(layer: nn.Module) -> Any:
    """The registered quantised-layer kind of ``layer``, or None for a plain layer."""
    return next((k for k in QUANTIZED_KINDS if k.matches(layer)), None)


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as a float tensor: a dequantised copy for quantised layers, else the weight itself."""
    kind = quantized_kind(layer)
    return kind.dequantize(layer) if kind is not None else layer.weight


class Adapter(nn.Module):
    """Base class of every adapter layer: ``base_layer`` stays frozen, the rest is adapter state."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = AdapterConfig
    layer_types: ClassVar[tuple[type, ...]] = ()
    # Declared behaviour, checked by lorakit.testing.check_method.
    identity_at_init: ClassVar[bool] = True  # output equals the base output before training
    capabilities: ClassVar[Optional[Capabilities]] = None  # every method declares its own (core/capabilities.py)
    tensor_names: ClassVar[tuple[str, ...]] = ()  # file key suffixes this method writes
    param_formula: ClassVar[str] = ""  # trainable parameters per adapted layer, for `lorakit methods`
    quantized_base: ClassVar[bool] = False  # can wrap a quantised layer (reads W0 only through dense_weight)
    wraps_parameters: ClassVar[bool] = False  # adapts one nn.Parameter of a module (``target_parameters``)
    adapter_name: str = "default"  # the adapter this layer belongs to on a model with several (core/multi.py)

    def __init__(self, base_layer: nn.Module, config: AdapterConfig, module_path: str = ""):
        super().__init__()
        kind = quantized_kind(base_layer)
        if kind is not None and not self.quantized_base:
            raise TypeError(
                f"module '{module_path}' is quantised ({kind.name}); method '{self.name}' needs the dense base weight "
                "(its factors or forward come from W0 itself). Use method 'lora' or 'dora' on a quantised base, or "
                "train on the unquantised model"
            )
        self.base_layer = base_layer
        self.config = config
        self.module_path = module_path
        self.disabled = False

    @classmethod
    def capabilities_for(cls, config: AdapterConfig) -> Optional[Capabilities]:
        """The capabilities under ``config``: the class declaration unless a setting takes one away."""
        return cls.capabilities

    @classmethod
    def can_wrap(cls, layer: nn.Module) -> bool:
        return isinstance(layer, cls.layer_types)

    # -- what every method implements ------------------------------------------------------------
    def reset_parameters(self) -> None:
        raise NotImplementedError

    @classmethod
    def delta(cls, tensors: dict[str, torch.Tensor], config: AdapterConfig, base_weight: Optional[torch.Tensor]) -> torch.Tensor:
        """ΔW in the base weight's layout, from the adapter tensors and the per-module config."""
        raise NotImplementedError

    @classmethod
    def low_rank(cls, tensors: dict[str, torch.Tensor], config: AdapterConfig) -> Optional[LowRank]:
        """(A [r, in], B [out, r], scale) with ΔW = scale · B A, for methods whose update is exactly low-rank."""
        return None

    # -- shared machinery -------------------------------------------------------------------------
    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """Adapter state keyed as in PEFT files: everything not under ``base_layer``."""
        out = {k: v for k, v in self.named_parameters() if not k.startswith("base_layer.")}
        out.update({k: v for k, v in self.named_buffers() if not k.startswith("base_layer.")})
        return out

    def load_adapter_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy ``tensors`` (keyed as ``adapter_tensors``) in, checking names and shapes."""
        own = self.adapter_tensors()
        missing = sorted(set(own) - set(tensors))
        unexpected = sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise KeyError(
                f"module '{self.module_path}': expected tensors {sorted(own)}, found {sorted(tensors)}"
                + (f"; missing {missing}" if missing else "")
                + (f"; unexpected {unexpected}" if unexpected else "")
            )
        with torch.no_grad():
            for key, value in tensors.items():
                target = own[key]
                if tuple(target.shape) != tuple(value.shape):
                    raise AdapterShapeError(
                        f"module '{self.module_path}', tensor '{key}': the model expects shape "
                        f"{tuple(target.shape)}, the adapter has {tuple(value.shape)}. Was the adapter trained "
                        "for another base model or with another rank?"
                    )
                target.copy_(value.to(device=target.device, dtype=target.dtype))

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return getattr(self.base_layer, "bias", None)

    def features(self) -> tuple[int, int]:
        """(out_features, in_features) of a Linear-like base layer, in either weight layout (fan_in_fan_out)."""
        kind = quantized_kind(self.base_layer)
        if kind is not None:
            return kind.features(self.base_layer)
        w = self.base_layer.weight
        return (w.shape[1], w.shape[0]) if self.config.fan_in_fan_out else (w.shape[0], w.shape[1])

    def merge_target(self) -> tuple[str, torch.Tensor]:
        """(name under this module, tensor) of the base weight a merge adds ΔW to."""
        return "base_layer.weight", self.base_layer.weight

    def delta_weight(self) -> torch.Tensor:
        """ΔW of this adapter, in the base weight's layout and dtype."""
        tensors = {k: v.detach() for k, v in self.adapter_tensors().items()}
        weight = dense_weight(self.base_layer).detach()
        return type(self).delta(tensors, self.config, weight).to(weight.dtype)

    def check_mergeable(self) -> None:
        """Raise NotMergeableError unless the method declares ``mergeable``."""
        try:
            require(self.capabilities_for(self.config), "mergeable", self.name, f"merge module '{self.module_path}'")
        except CapabilityError as e:
            raise NotMergeableError(str(e)) from None

    def merged_layer(self) -> nn.Module:
        """The base layer with ΔW added to its weight (in place), ready to replace this adapter."""
        self.check_mergeable()
        delta = self.delta_weight()
        if not torch.isfinite(delta).all():
            raise ValueError(f"module '{self.module_path}': the adapter's update has NaN or inf; refusing to merge")
        kind = quantized_kind(self.base_layer)
        if kind is not None:  # dequantise, add, quantise again (as PEFT), with its rounding warning
            return kind.merge(self.base_layer, delta, self.module_path)
        with torch.no_grad():
            self.base_layer.weight.add_(delta)
        return self.base_layer

    def adapter_dtype(self) -> torch.dtype:
        """fp32 for half-precision base layers (as PEFT's autocast_adapter_dtype), else the base dtype."""
        kind = quantized_kind(self.base_layer)
        dtype = kind.compute_dtype(self.base_layer) if kind is not None else self.base_layer.weight.dtype
        return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

    def extra_repr(self) -> str:
        return f"name={self.name!r}, r={getattr(self.config, 'r', None)}, path={self.module_path!r}"


def innermost(layer: nn.Module) -> nn.Module:
    """The original layer under ``layer``'s adapters (adapters nest when a model carries several)."""
    while isinstance(layer, Adapter):
        layer = layer.base_layer
    return layer


def embed_scale(layer: nn.Module) -> Optional[torch.Tensor]:
    """The scalar a scaled embedding multiplies its lookup by (``embed_scale``: Gemma 3, BART...), or None.

    An adapter's update to such a layer must be scaled alike, so that forward, ``delta`` merged into the weight
    and PEFT's files agree. A non-scalar ``embed_scale`` is refused (PEFT warns and leaves the update unscaled).
    """
    scale = getattr(layer, "embed_scale", None)
    if scale is None:
        return None
    if isinstance(scale, (int, float)):
        return torch.tensor(float(scale), device=layer.weight.device, dtype=layer.weight.dtype)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        return scale
    raise ValueError(
        f"{type(layer).__name__}.embed_scale is {type(scale).__name__} of shape {tuple(getattr(scale, 'shape', ()))}; "
        "an adapter can follow a scalar embedding scale only. Exclude this embedding from target_modules"
    )


class FrozenLinear(nn.Module):
    """A fixed bias-free linear map whose ``weight`` [out, in] is a buffer: saved with the adapter, never trained."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def linear_factor(weight: torch.Tensor, trainable: bool) -> nn.Module:
    """A bias-free linear factor holding ``weight`` [out, in]: ``nn.Linear`` if trainable, else ``FrozenLinear``.

    Frozen factors are buffers rather than parameters with ``requires_grad=False``: no optimiser, weight decay or
    ``set_trainable`` can move them, and their file key (``<name>.weight``) is the same either way.
    """
    if not trainable:
        return FrozenLinear(weight)
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


class ModulesToSave(nn.Module):
    """A module trained and saved in full (PEFT's ``modules_to_save``): a trainable copy beside the original."""

    def __init__(self, base_layer: nn.Module, module_path: str = ""):
        super().__init__()
        import copy

        self.base_layer = base_layer
        self.module = copy.deepcopy(base_layer)
        for p in self.module.parameters():
            p.requires_grad_(True)
        self.module_path = module_path
        self.disabled = False

    adapter_name = "default"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return (self.base_layer if self.disabled else self.module)(*args, **kwargs)

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        # PEFT files key these as the module's own state dict under its path.
        return dict(self.module.state_dict(keep_vars=True))

    def load_adapter_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        own = self.adapter_tensors()
        for key, value in tensors.items():
            if key in own and tuple(own[key].shape) != tuple(value.shape):
                raise AdapterShapeError(
                    f"module '{self.module_path}', tensor '{key}' (modules_to_save): the model expects shape "
                    f"{tuple(own[key].shape)}, the file has {tuple(value.shape)}"
                )
        missing = sorted(set(own) - set(tensors))
        if missing:
            raise KeyError(f"module '{self.module_path}' (modules_to_save): missing tensors {missing}")
        self.module.load_state_dict(tensors, strict=True)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["module"], name)
