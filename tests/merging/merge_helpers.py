"""Builders for merge tests: small LoRA states on the toy models of lorakit.testing."""
from __future__ import annotations

import torch

import lorakit
from lorakit.testing import ToyConv2d, ToyEmbedding, ToyLinear, perturb_


def toy_state(seed: int, toy=ToyLinear, targets=None, scale: float = 0.3, **config) -> lorakit.AdapterState:
    """A LoRA state on ``toy`` (base weights seeded with 0) with every adapter tensor perturbed by ``seed``."""
    torch.manual_seed(0)
    model = toy()
    config.setdefault("r", 4)
    config.setdefault("lora_alpha", 8)
    cls = lorakit.DoRAConfig if config.pop("dora", False) else lorakit.LoRAConfig
    lorakit.apply(model, cls(target_modules=list(targets or toy.targets), **config))
    perturb_(model, scale, seed)
    return lorakit.AdapterState.from_model(model)


def base_weights(toy=ToyLinear) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {p: m.weight.detach() for p, m in toy().named_modules() if hasattr(m, "weight")}


def update(state: lorakit.AdapterState, path: str, toy=ToyLinear) -> torch.Tensor:
    """ΔW of ``path`` (zero when the state does not adapt it)."""
    weight = base_weights(toy)[path]
    return state.delta(path, weight) if path in state.tensors else torch.zeros_like(weight)


def factors_update(state: lorakit.AdapterState, path: str, a: torch.Tensor, b: torch.Tensor, toy=ToyLinear) -> torch.Tensor:
    """ΔW of merged factors (B A, scaling 1) stored as ``state`` stores ``path``, in the base weight's layout."""
    from lorakit.merging.combine import _layout

    k = a.shape[0]
    config = lorakit.LoRAConfig(r=k, lora_alpha=k, target_modules=[path], fan_in_fan_out=state.config.fan_in_fan_out)
    merged = lorakit.AdapterState(config, {path: _layout(path, [state]).tensors(a, b)})
    return merged.delta(path, base_weights(toy)[path])


def weighted_sum(states, weights, path, toy=ToyLinear) -> torch.Tensor:
    return sum(w * update(s, path, toy) for s, w in zip(states, weights))


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str = "", atol: float = 1e-5, rtol: float = 1e-4) -> None:
    err = (a - b).abs().max().item()
    assert torch.allclose(a, b, atol=atol, rtol=rtol), f"{what}: max abs difference {err:.3g}"


def mixed():
    """Three LoRA states: ranks 4/8/2, overlapping targets, one rsLoRA."""
    return [
        toy_state(1),
        toy_state(2, r=8, targets=["lin1"]),
        toy_state(3, r=2, use_rslora=True),
    ]


TOYS = [ToyLinear, ToyEmbedding, ToyConv2d]
