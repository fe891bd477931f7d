"""Routed adapters whose experts are LoRAs (MeteoRA, LoRA-Mixer, SMoRA): the shared layer, router losses, loading.

A routed layer is one stacked LoRA, A [E·b, in] and B [out, E·b], whose E blocks of b ranks are the experts (b = 1
in SMoRA, where each rank is an expert). Its router gives per-token gates g [..., E], mostly zero, and
    h = W x + s · B (repeat_b(g) ⊙ A x),
a single LoRA with block-wise activation; SMoRA (arXiv:2501.15103) shows that a multi-LoRA MoE is exactly this. All
blocks are computed and the unselected ones zeroed: at these sizes that is cheaper on CPU than gathering, and it
keeps a gradient path to every gate.

Token routing makes the update depend on the input, so no ΔW exists: these methods declare no capabilities (``NONE``),
``lorakit.merge`` refuses with NotMergeableError and leaves the model untouched, and ``delta`` raises.

Router losses: in training, each layer keeps the (already weighted) auxiliary loss of its last forward pass in
``aux_loss``; ``aux_loss(model)`` averages it over the layers. ``route_context(model, attention_mask, labels)``
tells the layers which tokens are padding (left out of the router statistics) and, for supervised routers
(MeteoRA), each token's expert label. ``loss_fn`` wires both into ``lorakit.train.fit(..., loss_fn=loss_fn)``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import Adapter, NotMergeableError, linear_factor
from ..core.capabilities import NONE
from ..core.apply import adapters
from ..core.config import AdapterConfig
from ..core.state import AdapterState
from .lora import Conv1D, LoRALayer

Expert = Union[AdapterState, str, Path]


@dataclass(frozen=True)
class RoutedLoRAConfig(AdapterConfig):
    """Fields every routed-LoRA method shares; ``r`` is the rank of one expert."""

    lora_alpha: float = 8
    lora_dropout: float = 0.0
    top_k: Optional[int] = 2

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r if self.r else 0.0


@dataclass(frozen=True)
class ExpertsConfig(RoutedLoRAConfig):
    """Routed configs over ``num_experts`` LoRA experts of rank ``r`` each (MeteoRA, LoRA-Mixer)."""

    num_experts: int = 2
    train_experts: bool = True  # False: the experts are fixed buffers (``from_adapters``) and only the router trains

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_experts < 1 or not 1 <= (self.top_k or 0) <= self.num_experts:
            raise ValueError(
                f"{type(self).__name__}: need 1 <= top_k <= num_experts, found top_k={self.top_k}, "
                f"num_experts={self.num_experts}"
            )


class RoutedLoRA(Adapter):
    """A stacked LoRA of ``experts`` blocks of ``block`` ranks behind a token router (subclasses give ``route``)."""
    capabilities = NONE

    layer_types = (nn.Linear,) + ((Conv1D,) if isinstance(Conv1D, type) else ())

    def __init__(self, base_layer: nn.Module, config: RoutedLoRAConfig, module_path: str, experts: int, block: int):
        super().__init__(base_layer, config, module_path)
        self.out_features, self.in_features = self.features()
        self.num_experts, self.block, self.r, self.scaling = experts, block, block, config.scaling
        kw = dict(device=base_layer.weight.device, dtype=self.adapter_dtype())
        trainable = getattr(config, "train_experts", True)
        self.lora_A = linear_factor(torch.zeros(experts * block, self.in_features, **kw), trainable)
        self.lora_B = linear_factor(torch.zeros(self.out_features, experts * block, **kw), trainable)
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.aux_loss: Optional[torch.Tensor] = None
        self.token_mask: Optional[torch.Tensor] = None  # [batch, seq] True for real tokens (route_context)
        self.route_target: Optional[torch.Tensor] = None  # expert label per example or token (route_context)
        self.last_gates: Optional[torch.Tensor] = None

    def reset_experts(self) -> None:
        LoRALayer._init_pair(self, self.lora_A.weight, self.lora_B.weight)  # PEFT's LoRA initialisation

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Gates [..., experts] for input ``x``; sets ``self.aux_loss`` (None when there is none)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        x = x.to(self.lora_A.weight.dtype)
        gates = self.route(x)
        self.last_gates = gates.detach()
        u = self.lora_A(self.lora_dropout(x))
        u = u * gates.to(u.dtype).repeat_interleave(self.block, dim=-1)
        return result + (self.lora_B(u) * self.scaling).to(result.dtype)

    def tokens(self, t: torch.Tensor) -> torch.Tensor:
        """Rows of ``t`` [..., n] for the real tokens (padding left out when the mask fits), as [tokens, n]."""
        mask = self.token_mask
        if mask is not None and tuple(mask.shape) == tuple(t.shape[:-1]):
            return t[mask.to(t.device, torch.bool)]
        return t.reshape(-1, t.shape[-1])

    @classmethod
    def delta(cls, tensors, config, base_weight):
        raise NotMergeableError(f"'{cls.name}' routes each token to its own experts: its update has no single ΔW")


def top_k_gates(logits: torch.Tensor, k: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(gates, indices): softmax over the k largest logits / temperature, scattered into zeros [..., E]."""
    top, idx = logits.topk(k, dim=-1)
    return torch.zeros_like(logits).scatter(-1, idx, torch.softmax(top / temperature, dim=-1)), idx


def supervised_loss(layer: RoutedLoRA, logits: torch.Tensor) -> Optional[torch.Tensor]:
    """Cross-entropy of the router logits against ``layer.route_target`` (-100 and padding ignored), or None."""
    target = layer.route_target
    if target is None:
        return None
    target = target.to(logits.device).long()
    if target.dim() == logits.dim() - 2:  # one label per example: every token of it
        target = target.reshape(*target.shape, *([1] * (logits.dim() - 1 - target.dim()))).expand(logits.shape[:-1])
    if layer.token_mask is not None and tuple(layer.token_mask.shape) == tuple(target.shape):
        target = target.masked_fill(~layer.token_mask.to(target.device, torch.bool), -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=-100)


def routed_layers(model: nn.Module) -> dict[str, RoutedLoRA]:
    """The routed adapter layers of ``model`` by module path."""
    return {p: m for p, m in adapters(model).items() if isinstance(m, RoutedLoRA)}


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Mean over routed layers of the auxiliary loss of their last training forward pass (0 when none)."""
    losses = [m.aux_loss for m in routed_layers(model).values() if m.aux_loss is not None]
    if not losses:
        return torch.zeros((), device=next(model.parameters()).device)
    return torch.stack([loss.float() for loss in losses]).mean()


@contextlib.contextmanager
def route_context(model: nn.Module, attention_mask: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None):
    """Within the block, routed layers see which tokens are real and, for supervised routers, their labels."""
    layers = list(routed_layers(model).values())
    for m in layers:
        m.token_mask, m.route_target = attention_mask, labels
    try:
        yield model
    finally:
        for m in layers:
            m.token_mask = m.route_target = None


def loss_fn(model: nn.Module, batch: dict) -> torch.Tensor:
    """``fit`` loss: the model's loss plus ``aux_loss``; a ``route_labels`` entry of the batch supervises routers."""
    batch = dict(batch)
    labels = batch.pop("route_labels", None)
    with route_context(model, batch.get("attention_mask"), labels):
        out = model(**batch)
        return out.loss + aux_loss(model).to(out.loss.device)
