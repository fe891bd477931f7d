"""The optimiser registry, the LoRA factor pairs an optimiser works on, and the AdamW pieces they share.

An entry of ``OPTIMIZERS`` is a ``torch.optim.Optimizer`` subclass with a ``name``, a one-line ``summary`` and a
classmethod ``from_model(model, lr, weight_decay=0.0, **options)`` that builds it over the parameters of
``model`` that require grad. ``create(name, model, ...)`` is the entry point; the result works in
``lorakit.train.fit`` and as ``transformers.Trainer(optimizers=(opt, None))``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from ..core.apply import adapters
from ..core.registry import Registry

OPTIMIZERS = Registry("optimiser")


@dataclass
class LoRAPair:
    """One adapted layer's factors: A [r, in] (or a conv kernel), B [out, r], the scale s and the module path."""

    path: str
    A: nn.Parameter
    B: nn.Parameter
    scale: float
    adapter: nn.Module


def lora_pairs(model: nn.Module, *, plain_linear: bool = False) -> list[LoRAPair]:
    """The trainable (lora_A, lora_B) pairs of ``model``; with ``plain_linear`` every adapter must be a LoRA
    ``nn.Linear``/Conv1D pair (the maths of LoRA-Pro and ALLoRA hold for ΔW = s·B·A only)."""
    pairs = []
    for path, adapter in adapters(model).items():
        a, b = getattr(adapter, "lora_A", None), getattr(adapter, "lora_B", None)
        plain = adapter.name == "lora" and isinstance(a, nn.Linear) and isinstance(b, nn.Linear)
        if plain_linear and not plain:
            raise ValueError(
                f"module '{path}' is a {type(adapter).__name__} ({adapter.name}); this optimiser needs plain LoRA on "
                "linear layers (ΔW = s·B·A): train it with LoRAConfig, or use --optimizer adamw"
            )
        if a is None or b is None or not (a.weight.requires_grad and b.weight.requires_grad):
            continue
        pairs.append(LoRAPair(path, a.weight, b.weight, float(adapter.scaling), adapter))
    return pairs


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters that require grad, by name; a clear error when there are none."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not named:
        raise ValueError("no parameter of the model requires grad: apply an adapter first, or unfreeze what to train")
    return named


def decay_groups(params: list[nn.Parameter], weight_decay: float, **extra) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on vectors (biases, norm scales, DoRA magnitudes)."""
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay, **extra},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, **extra},
    ]
    return [g for g in groups if g["params"]]


def split(model: nn.Module, pairs: list[LoRAPair]) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
    """(A factors, B factors, every other trainable parameter) in model order."""
    a_ids, b_ids = {id(p.A) for p in pairs}, {id(p.B) for p in pairs}
    params = list(trainable(model).values())
    return ([p for p in params if id(p) in a_ids], [p for p in params if id(p) in b_ids],
            [p for p in params if id(p) not in a_ids | b_ids])


def adam_direction(state: dict, grad: torch.Tensor, betas: tuple[float, float], eps: float, key: str = "") -> torch.Tensor:
    """Update the moments ``exp_avg``/``exp_avg_sq`` (prefixed by ``key``) in ``state`` and return the
    bias-corrected Adam direction m̂ / (sqrt(v̂) + eps); ``state[key + "step"]`` counts the calls."""
    if key + "exp_avg" not in state:
        state[key + "step"] = torch.tensor(0.0)
        state[key + "exp_avg"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
        state[key + "exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
    b1, b2 = betas
    state[key + "step"] += 1
    t = state[key + "step"].item()
    m, v = state[key + "exp_avg"], state[key + "exp_avg_sq"]
    m.lerp_(grad, 1 - b1)
    v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    return (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt_().add_(eps))


def create(name: str, model: nn.Module, lr: float, weight_decay: float = 0.0, **options) -> torch.optim.Optimizer:
    """The registered optimiser ``name`` over the trainable parameters of ``model``."""
    cls = OPTIMIZERS.get(name)
    accepted = [p for p in inspect.signature(cls.from_model).parameters if p not in ("model", "lr", "weight_decay")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"optimiser '{name}' has no option {', '.join(unknown)}; its options: {', '.join(accepted) or '(none)'}")
    return cls.from_model(model, lr=lr, weight_decay=weight_decay, **options)


@OPTIMIZERS.register()
class AdamW(torch.optim.AdamW):
    """AdamW over every trainable parameter, weight decay on matrices only (the default)."""

    name = "adamw"
    summary = "AdamW on every trainable parameter; weight decay on matrices only"

    @classmethod
    def from_model(cls, model: nn.Module, lr: float, weight_decay: float = 0.0) -> "AdamW":
        """AdamW with the decay groups of ``model``'s trainable parameters."""
        return cls(decay_groups(list(trainable(model).values()), weight_decay), lr=lr)
