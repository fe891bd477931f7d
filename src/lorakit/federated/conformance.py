"""Conformance properties every registered strategy must have: ``check_strategy(name)``.

Reusable by third-party strategies registered in ``STRATEGIES``. Each property raises ``AssertionError`` with
the strategy, the property and the numbers when it fails.
"""
from __future__ import annotations

import torch
from torch import nn

from ..core.config import LoRAConfig
from ..core.state import AdapterState
from .aggregation import A_KEYS, STRATEGIES, aggregate, exact_update, normalised, relative_error, update_of

SHAPES = {"enc.q": (24, 16), "enc.v": (12, 24)}  # module path -> (out, in)


class ToyEncoder(nn.Module):
    """Two Linear layers at the paths of ``SHAPES`` plus a ``head``: what synthetic clients adapt."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Module()
        self.enc.q, self.enc.v = nn.Linear(16, 24), nn.Linear(24, 12)
        self.head = nn.Linear(12, 3)


def synthetic_clients(ranks, spread: float = 0.5, seed: int = 0, shared_a: bool = False,
                      dtype: torch.dtype = torch.float32, head: bool = False) -> list[AdapterState]:
    """One LoRA state per rank (alpha = 2r) on ``ToyEncoder``: A = common init (+ spread * noise), B random.

    With ``shared_a`` every client's A is the leading rows of one shared init, as FFA-LoRA's clients have.
    """
    g = torch.Generator().manual_seed(seed)
    r_max = max(ranks)
    a0 = {p: torch.randn(r_max, i, generator=g, dtype=torch.float64) / i**0.5 for p, (_, i) in SHAPES.items()}
    states = []
    for r in ranks:
        cfg = LoRAConfig(r=r, lora_alpha=2 * r, target_modules=["q", "v"], modules_to_save=["head"] if head else None)
        tensors = {}
        for p, (o, i) in SHAPES.items():
            noise = torch.randn(r, i, generator=g, dtype=torch.float64) / i**0.5
            a = a0[p][:r] + (0.0 if shared_a else spread) * noise
            b = 0.1 * torch.randn(o, r, generator=g, dtype=torch.float64)
            tensors[p] = {"lora_A.weight": a.to(dtype), "lora_B.weight": b.to(dtype)}
        saved = {"head": {"weight": torch.randn(3, 12, generator=g).to(dtype),
                          "bias": torch.randn(3, generator=g).to(dtype)}} if head else {}
        states.append(AdapterState(cfg, tensors, saved))
    return states


def _updates_match(name: str, what: str, got: AdapterState, want, tol: float) -> None:
    for path in got.tensors:
        target = want(path)
        err = relative_error(update_of(got, path), target)
        assert err <= tol, f"strategy '{name}': {what}: module '{path}' update off by relative error {err:.3g}"


def check_strategy(name: str, tol: float = 1e-5) -> list[str]:
    """Run the conformance properties for strategy ``name``; returns what was checked."""
    rule = STRATEGIES.get(name)
    one = synthetic_clients([4], shared_a=True, head=True)[0]
    same = [one.clone() for _ in range(3)]
    # 1. identical clients aggregate to themselves
    out = aggregate(name, same, [1, 2, 3])
    _updates_match(name, "identical clients", out, lambda p: update_of(one, p), tol)
    for key, t in one.modules_to_save["head"].items():
        assert torch.allclose(out.modules_to_save["head"][key], t, atol=1e-6), f"strategy '{name}': head changed"
    if not rule.restart:
        for p, d in one.tensors.items():
            for k, t in d.items():
                assert torch.allclose(out.tensors[p][k], t, atol=1e-6), f"strategy '{name}': {p}.{k} not kept"
    # 2. one client with all the weight returns itself
    solo = aggregate(name, [one], [5])
    _updates_match(name, "single client", solo, lambda p: update_of(one, p), tol)
    # 3. weights are normalised, and client order does not matter
    shared = bool(set(rule.shared) & set(A_KEYS))  # the strategy expects one A for all clients
    mixed = synthetic_clients([4, 4, 4], spread=0.3, seed=1, shared_a=shared, head=True)
    base = aggregate(name, mixed, [1, 2, 5])
    scaled = aggregate(name, mixed, [10, 20, 50])
    flipped = aggregate(name, mixed[::-1], [5, 2, 1])
    for other, what in ((scaled, "weights x10"), (flipped, "reversed clients")):
        _updates_match(name, what, other, lambda p: update_of(base, p), tol)
    head = sum(w * s.modules_to_save["head"]["weight"].double() for s, w in zip(mixed, normalised([1, 2, 5], 3)))
    assert relative_error(base.modules_to_save["head"]["weight"], head) < 1e-6, f"strategy '{name}': head is not the weighted mean"
    # 4. the result is a loadable adapter of the same dtype
    _loads(name, base)
    # 5. mixed ranks: aggregated and loadable where declared, a clear error otherwise
    hetero = synthetic_clients([2, 4, 8], spread=0.3, seed=2, shared_a=shared)
    if rule.mixed_ranks:
        _loads(name, aggregate(name, hetero, [1, 1, 1]))
    else:
        try:
            aggregate(name, hetero, [1, 1, 1])
        except ValueError:
            pass
        else:
            raise AssertionError(f"strategy '{name}' accepted clients of ranks 2, 4, 8 without declaring mixed_ranks")
    return [f"{name}: {p}" for p in ("identical", "single", "normalised", "order", "head", "loads", "ranks")]


def _loads(name: str, state: AdapterState) -> None:
    model = state.load_into(ToyEncoder())
    for p, d in state.tensors.items():
        assert all(t.dtype == torch.float32 for t in d.values()), f"strategy '{name}': {p} changed dtype"
        assert torch.isfinite(state.delta(p)).all(), f"strategy '{name}': {p} update is not finite"
    assert model is not None


__all__ = ["SHAPES", "ToyEncoder", "check_strategy", "exact_update", "synthetic_clients"]
