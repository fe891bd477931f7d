"""DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using Dynamic Search-Free Low-Rank Adaptation
(Valipour et al., arXiv:2210.07558).

Update rule at rank b (1 <= b <= r): h = W x + (lora_alpha / b) · B[:, :b] A[:b] x. Training draws one b per
optimiser step for every layer (``sample_rank(model)``, as the official ``on_step_begin`` callback; with
``lorakit.train.fit`` pass ``callbacks=[rank_sampler(model)]``); by default
only row b of A and column b of B receive gradients (the rows and columns below b are detached, as in the
official recipe, ``frozen=True``; ``train_last_only=False`` trains all of A[:b] and B[:, :b]). Afterwards the
adapter runs at any b without retraining: ``truncate(state, rank=b)`` gives a plain LoRA state of rank b
(PEFT- and vLLM-loadable), and ``active_rank=b`` in the config (or ``set_rank(model, b)``) runs at rank b.

Decisions and deviations:
- The scale alpha/b is the official code's, which multiplies each truncated factor by sqrt(r/b) on top of
  alpha/r; with ``use_rslora`` it is alpha/sqrt(b).
- Training at a sampled rank happens only in ``train()`` mode; in ``eval()`` the layer runs at ``active_rank``
  (default r), so merging, saving and ``delta`` always describe the configured inference rank.
- The sampled b is the same for all layers and is at most the smallest r of the adapted modules.
- Nothing here stops decoupled weight decay (AdamW) from shrinking the detached rows, as in the official code;
  use weight_decay=0 or exclude the adapter from decay if that matters.
- Files are lorakit files (``LORAKIT_DYLORA``): PEFT has no nested-rank LoRA. Export with ``truncate``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..core.capabilities import LOW_RANK
from ..core.apply import CONFIG_ATTR, adapters, config_of
from ..core.config import LoRAConfig
from ..core.registry import METHODS
from ..core.state import AdapterState
from .lora import LoRALinear, lora_delta, lora_low_rank


@dataclass(frozen=True)
class DyLoRAConfig(LoRAConfig):
    """DyLoRA: LoRA trained for every rank 1..r at once; runs at ``active_rank`` (None: r)."""

    peft_type: ClassVar[str] = "LORAKIT_DYLORA"
    method: ClassVar[str] = "dylora"

    active_rank: Optional[int] = None
    train_last_only: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.active_rank is not None and not 1 <= self.active_rank <= self.r:
            raise ValueError(f"DyLoRAConfig.active_rank must be in [1, r={self.r}], found {self.active_rank}")

    def for_module(self, path: str) -> "DyLoRAConfig":
        try:  # rank_pattern may give this module an r below active_rank
            return super().for_module(path)
        except ValueError as e:
            raise ValueError(f"module '{path}': {e}") from None


def _scale(config: LoRAConfig, b: int) -> float:
    return config.lora_alpha / (math.sqrt(b) if config.use_rslora else b)


def _first(tensors: dict[str, torch.Tensor], b: int) -> dict[str, torch.Tensor]:
    """The first ``b`` components: rows of A, columns of B."""
    return {"lora_A.weight": tensors["lora_A.weight"][:b], "lora_B.weight": tensors["lora_B.weight"][:, :b]}


def _at_rank(config: DyLoRAConfig) -> tuple[int, LoRAConfig]:
    b = config.active_rank or config.r
    return b, dataclasses.replace(config, r=b, active_rank=None)


@METHODS.register()
class DyLoRALinear(LoRALinear):
    """DyLoRA on ``nn.Linear`` and ``Conv1D``."""

    name = "dylora"
    capabilities = LOW_RANK
    config_class = DyLoRAConfig
    tensor_names = ("lora_A.weight", "lora_B.weight")
    param_formula = "r·(in+out)"

    def __init__(self, base_layer: nn.Module, config: DyLoRAConfig, module_path: str = ""):
        super().__init__(base_layer, config, module_path)
        self.sampled_rank: Optional[int] = None  # set per step by sample_rank; used in train() mode only

    @classmethod
    def delta(cls, tensors, config, base_weight):
        b, at_b = _at_rank(config)
        return lora_delta(_first(tensors, b), at_b, base_weight)

    @classmethod
    def low_rank(cls, tensors, config):
        b, at_b = _at_rank(config)
        return lora_low_rank(_first(tensors, b), at_b)

    def current_rank(self) -> int:
        if self.training and self.sampled_rank is not None:
            return self.sampled_rank
        return self.config.active_rank or self.r

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled or self.r == 0:
            return result
        b = self.current_rank()
        a, up = self.lora_A.weight[:b], self.lora_B.weight[:, :b]
        if self.training and self.config.train_last_only and b > 1:
            a = torch.cat([a[: b - 1].detach(), a[b - 1:]])
            up = torch.cat([up[:, : b - 1].detach(), up[:, b - 1:]], dim=1)
        x = self.lora_dropout(x.to(a.dtype))
        return result + (F.linear(F.linear(x, a), up) * _scale(self.config, b)).to(result.dtype)


def _layers(model: nn.Module) -> list[DyLoRALinear]:
    found = [a for a in adapters(model).values() if isinstance(a, DyLoRALinear)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no DyLoRA layers: apply a DyLoRAConfig first")
    return found


def sample_rank(model: nn.Module, generator: Optional[torch.Generator] = None) -> int:
    """Draw b ~ U{1..r} for this training step and set it on every DyLoRA layer; call once per optimiser step."""
    layers = _layers(model)
    b = int(torch.randint(1, min(a.r for a in layers) + 1, (1,), generator=generator))
    for layer in layers:
        layer.sampled_rank = b
    return b


def rank_sampler(model: nn.Module, seed: int = 0) -> Callable[[int, dict], None]:
    """A ``lorakit.train.fit`` callback: draws the first step's rank now, then a new one after every step."""
    generator = torch.Generator().manual_seed(seed)
    sample_rank(model, generator)
    return lambda step, record: sample_rank(model, generator)


def set_rank(model: nn.Module, rank: Optional[int]) -> nn.Module:
    """Run (and merge and save) the model's DyLoRA adapter at ``rank`` from now on; None means full rank."""
    config = dataclasses.replace(config_of(model), active_rank=rank)
    layers = _layers(model)
    per_layer = [dataclasses.replace(a.config, active_rank=rank) for a in layers]  # validates rank <= r per module
    for layer, layer_config in zip(layers, per_layer):
        layer.config = layer_config
    setattr(model, CONFIG_ATTR, config)
    return model


def truncate(state: AdapterState, rank: int) -> AdapterState:
    """The first ``rank`` components of a DyLoRA (or LoRA) state, as a plain LoRA state of rank ``rank``."""
    config = state.config
    if config.method_name not in ("dylora", "lora"):
        raise TypeError(f"truncate takes a DyLoRA or LoRA adapter state, found method '{config.method_name}'")
    tensors = {}
    for path, t in state.tensors.items():
        r = state.module_config(path).r
        if "lora_A.weight" not in t or not 1 <= rank <= r:
            raise ValueError(f"module '{path}': cannot truncate {sorted(t)} of rank {r} to rank {rank} "
                             "(Linear/Conv1D adapters, 1 <= rank <= r)")
        tensors[path] = {k: v.clone() for k, v in _first(t, rank).items()}
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(LoRAConfig)}
    fields.update(r=rank, rank_pattern={})
    return AdapterState(LoRAConfig(**fields), tensors, state.modules_to_save, state.base_tensors)
