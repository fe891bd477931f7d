"""The initialiser protocol, the factor-writing step every initialiser shares, and ``initialize``.

An initialiser sets the factors of LoRA-shaped adapters (``lora_A.weight`` [r, in], ``lora_B.weight`` [out, r]
and a scaling s) on ``nn.Linear``/``Conv1D`` layers. Base-mutating ones also move s·B A out of the frozen
weight (W_res = W − s·B A, computed in fp32 from the factors as stored), so the output at step 0 is unchanged.
Weight-only initialisers run inside ``lorakit.apply``; data-driven ones run in ``initialize(model, batches)``.
Adapters of other layer kinds (embeddings, convolutions) keep the default initialisation, with a warning.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from typing import Any, Callable, ClassVar, Iterable, Iterator, Optional

import torch
from torch import nn

from ..core.adapter import Adapter, quantized_kind
from ..core.apply import adapters, config_of
from ..core.registry import INITIALIZERS, initializer_for
from ..methods.lora import LoRALinear
from .calibration import Calibration

INIT_ATTR = "lorakit_init"  # set on each adapter an initialiser has written


class Initializer:
    """Base class of the entries of ``lorakit.INITIALIZERS`` (class methods only: nothing to instantiate)."""

    name: ClassVar[str] = ""
    needs_data: ClassVar[bool] = False  # runs in ``initialize(model, batches)``, not inside ``apply``
    mutates_base: ClassVar[bool] = False  # writes W − s·B0 A0 into the base weight (see convert_to_plain_lora)
    settings_class: ClassVar[Optional[type]] = None  # e.g. EvaConfig, LoraGAConfig

    @classmethod
    def accepts(cls, value: str) -> bool:
        """Whether this initialiser handles ``init_lora_weights=value``."""
        return value == cls.name

    @classmethod
    def run(cls, model: nn.Module, calibration: Optional[Calibration] = None, settings: Any = None) -> nn.Module:
        """Initialise the adapters of ``model`` (prepared by ``apply``) in place and return it."""
        raise NotImplementedError


@functools.lru_cache(maxsize=8)
def _cpu_state(seed: int) -> torch.Tensor:
    return torch.Generator().manual_seed(seed).get_state()


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Draw torch's global random numbers from ``seed`` inside the block; the caller's RNG state is kept."""
    if device.type != "cpu":
        with torch.random.fork_rng(devices=[device]):
            torch.manual_seed(seed)
            yield
        return
    saved = torch.get_rng_state()
    torch.set_rng_state(_cpu_state(seed))  # cheaper than manual_seed, which EVA calls once per layer and batch
    try:
        yield
    finally:
        torch.set_rng_state(saved)


def lora_pairs(model: nn.Module, init_name: str) -> dict[str, Adapter]:
    """The LoRA-shaped Linear/Conv1D adapters of ``model`` by path; warns about the adapters left as they are.

    LoRA-shaped means built on ``LoRALinear`` (LoRA, DoRA and their subclasses): the forward holds W + s·B A, so
    moving s·B A out of W keeps the output. Methods with other forwards (routed or shared factors) are refused.
    """
    every = adapters(model)
    found = {p: a for p, a in every.items() if isinstance(a, LoRALinear)}
    skipped = [p for p in every if p not in found]
    if not found:
        kinds = sorted({type(a).__name__ for a in every.values()})
        raise ValueError(
            f"init_lora_weights={init_name!r} initialises LoRA/DoRA factors on Linear/Conv1D layers; this model's "
            f"adapters are {', '.join(kinds) or 'none'}. Use init_lora_weights=True for this method"
        )
    if skipped:
        warnings.warn(
            f"init_lora_weights={init_name!r} initialises LoRA factors on Linear/Conv1D layers only; "
            f"{len(skipped)} adapter(s) keep the default initialisation: {', '.join(skipped[:6])}",
            stacklevel=3,
        )
    return found


def scaling_of(adapter: Adapter) -> float:
    """s in ΔW = s·B A for this adapter."""
    return float(getattr(adapter, "scaling", adapter.config.scaling))


def base_matrix(adapter: Adapter) -> torch.Tensor:
    """The frozen base weight as fp32 [out, in] (Conv1D stores [in, out])."""
    kind = quantized_kind(adapter.base_layer)
    if kind is not None:  # the factors would come from a rounded W0, and the residual could not be stored exactly
        raise TypeError(
            f"module '{adapter.module_path}' is quantised ({kind.name}); this initialiser reads or rewrites the dense "
            "base weight W0. Initialise on the unquantised model, or use init_lora_weights=True/'gaussian'/'eva'"
        )
    w = adapter.base_layer.weight.detach().float()
    return w.T if adapter.config.fan_in_fan_out else w


def rank_of(adapter: Adapter, init_name: str, needs: int = 1) -> int:
    """The adapter's rank r, checked against the base weight: ``needs``·r <= min(out, in)."""
    r = adapter.adapter_tensors()["lora_A.weight"].shape[0]
    limit = min(adapter.features())
    if needs * r > limit:
        raise ValueError(
            f"module '{adapter.module_path}': {init_name} needs {'' if needs == 1 else f'{needs}·'}r <= min(out, in) = "
            f"{limit}, found r={r}; lower r or set rank_pattern for this module"
        )
    return r


def set_factors(adapter: Adapter, a: torch.Tensor, b: torch.Tensor, subtract: bool, init_name: str) -> None:
    """Write A [r, in] and B [out, r]; with ``subtract``, move s·B A out of the base weight."""
    tensors = adapter.adapter_tensors()
    own_a, own_b = tensors["lora_A.weight"], tensors["lora_B.weight"]
    if own_a.shape != a.shape or own_b.shape != b.shape:
        raise ValueError(
            f"module '{adapter.module_path}': {init_name} produced A {tuple(a.shape)}, B {tuple(b.shape)}; the "
            f"adapter holds A {tuple(own_a.shape)}, B {tuple(own_b.shape)}"
        )
    with torch.no_grad():
        own_a.copy_(a.to(own_a.dtype))
        own_b.copy_(b.to(own_b.dtype))
        if subtract:
            # the offset from the factors as stored, so that W_res + s·B A reproduces W as the forward computes it
            residual = base_matrix(adapter) - scaling_of(adapter) * (own_b.float() @ own_a.float())
            weight = adapter.base_layer.weight
            weight.copy_((residual.T if adapter.config.fan_in_fan_out else residual).to(weight.dtype))
    setattr(adapter, INIT_ATTR, init_name)


def resolve_settings(initializer: type, settings: Any) -> Any:
    """The initialiser's settings object: defaults for None, built from a dict, or checked."""
    cls = initializer.settings_class
    if cls is None:
        if settings is not None:
            raise TypeError(f"initialiser '{initializer.name}' takes no settings, found {settings!r}")
        return None
    if settings is None:
        return cls()
    if isinstance(settings, dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise TypeError(f"{cls.__name__}: unknown settings {unknown}; known: {sorted(known)}")
        return cls(**settings)
    if not isinstance(settings, cls):
        raise TypeError(f"initialiser '{initializer.name}' expects {cls.__name__} settings, found {type(settings).__name__}")
    return settings


def initialize(
    model: nn.Module,
    batches: Optional[Iterable] = None,
    *,
    loss_fn: Optional[Callable] = None,
    forward_fn: Optional[Callable] = None,
    settings: Any = None,
) -> nn.Module:
    """Run the data-driven initialiser that ``init_lora_weights`` names on calibration ``batches``; returns ``model``.

    Batches are dicts (``model(**batch)``; ``loss_fn`` defaults to ``output.loss``), tuples (``model(*batch)``)
    or tensors; pass ``forward_fn(model, batch)``/``loss_fn(model, batch)`` for anything else. Weight-only
    initialisers (pissa, olora) already ran inside ``apply``: for them this returns ``model`` unchanged.
    """
    config = config_of(model)
    initializer = initializer_for(config.init_lora_weights)
    if initializer is None:
        raise ValueError(
            f"init_lora_weights={config.init_lora_weights!r} names no initialiser; registered: "
            f"{', '.join(INITIALIZERS.names())}"
        )
    settings = resolve_settings(initializer, settings)
    if not initializer.needs_data:
        return model
    if any(hasattr(a, INIT_ATTR) for a in adapters(model).values()):
        raise ValueError(
            f"the adapters were already initialised with '{initializer.name}'; running it again would move the "
            "base weight twice. Apply the adapter to a fresh base model instead."
        )
    if batches is None:
        raise ValueError(f"init_lora_weights={initializer.name!r} is data-driven: pass calibration batches")
    return initializer.run(model, Calibration.of(batches, forward_fn, loss_fn), settings)
