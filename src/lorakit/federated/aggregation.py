"""Federated aggregation of LoRA adapters: the registry of strategies and the entry point ``aggregate``.

A strategy is a pure function of the clients' ``AdapterState``s and their normalised weights
``p_k = n_k / sum(n)``. It returns the new adapter for the adapted modules; ``aggregate`` averages
``modules_to_save`` and trained base tensors (full tensors, so plain FedAvg is exact for them).

Two kinds of strategy, declared on registration:
- continuing (``restart=False``): the result is the new global adapter; clients start the next round from it.
- restarting (``restart=True``): the result is this round's update, merged into the base weights; clients then
  start a fresh adapter (FLoRA's protocol).
Conventions: a module's update is ``s * B @ A`` with ``A [r, in]``, ``B [out, r]`` (``AdapterState.low_rank``).
Maths runs in float64 and results come back in the clients' dtype.

Secure forms (``secure_form``): a strategy whose aggregate is a function of weighted sums of per-client tensors
declares ``encode(state, config)`` (the tensors client k contributes, at the run's fixed shapes: ``config`` is the
reference adapter config, at the largest rank) and ``decode(mean, reference, ranks)`` (the aggregate from
sum_k p_k encode(state_k)); ``secure_aggregate`` composes them and equals ``aggregate`` (for restarting strategies:
the same update). Secure aggregation (SecAgg+) then needs only the sum, never an individual update.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..core.registry import Registry
from ..core.state import AdapterState, Tensors

STRATEGIES = Registry("federated strategy")
A_KEYS = ("lora_A.weight", "lora_embedding_A")
B_KEYS = ("lora_B.weight", "lora_embedding_B")


@dataclass(frozen=True)
class Strategy:
    """A registered aggregation rule and what the federated runtime needs to know about it."""

    name: str
    fn: Callable[..., AdapterState]
    restart: bool = False  # merge the result into the base and start a fresh adapter each round
    mixed_ranks: bool = False  # clients may train adapters of different ranks
    shared: tuple[str, ...] = ()  # tensor names every party already holds: never sent over the wire
    doc: str = ""


def strategy(name: str, *, restart: bool = False, mixed_ranks: bool = False, shared: tuple[str, ...] = ()):
    """Decorator: register ``fn(states, weights, **options) -> AdapterState`` as strategy ``name``."""

    def deco(fn: Callable[..., AdapterState]) -> Callable[..., AdapterState]:
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        STRATEGIES.register(name)(Strategy(name, fn, restart, mixed_ranks, tuple(shared), doc))
        return fn

    return deco


def normalised(num_examples: Sequence[float], count: int) -> list[float]:
    """Client weights p_k = n_k / sum(n), after checking there is one finite, non-negative count per client."""
    counts = [float(n) for n in num_examples]
    if len(counts) != count:
        raise ValueError(f"expected one example count per client ({count}), found {len(counts)}")
    bad = [i for i, n in enumerate(counts) if not math.isfinite(n) or n < 0]
    if bad:
        raise ValueError(f"example counts must be finite and >= 0; client(s) {bad} have {[counts[i] for i in bad]}")
    total = sum(counts)
    if total <= 0:
        raise ValueError("the example counts sum to 0: at least one client must report examples")
    return [n / total for n in counts]


def aggregate(name: str, states: Sequence[AdapterState], num_examples: Sequence[float], **options) -> AdapterState:
    """Aggregate the clients' adapters with strategy ``name``, weighting client k by ``num_examples[k]``."""
    rule = STRATEGIES.get(name)
    states = list(states)
    if not states:
        raise ValueError(f"strategy '{name}': no client states to aggregate")
    weights = normalised(num_examples, len(states))
    _check_same_modules(states)
    out = rule.fn(states, weights, **options)
    saved = weighted_sum([s.modules_to_save for s in states], weights)
    base = weighted_sum([{"": s.base_tensors} for s in states], weights).get("", {})
    return AdapterState(out.config, out.tensors, saved, base)


@dataclass(frozen=True)
class SecureForm:
    """How a strategy's aggregate follows from a weighted sum: what each client contributes, and the inverse."""

    encode: Callable[[AdapterState, object], AdapterState]
    decode: Callable[[AdapterState, AdapterState, Sequence[int]], AdapterState]


SECURE: dict[str, SecureForm] = {}


def secure_form(name: str, encode, decode) -> None:
    """Declare that strategy ``name`` aggregates through ``decode(sum_k p_k encode(state_k))`` (see above)."""
    SECURE[name] = SecureForm(encode, decode)


def secure_aggregate(name: str, states: Sequence[AdapterState], num_examples: Sequence[float],
                     reference: AdapterState) -> AdapterState:
    """``aggregate`` computed as secure aggregation does: decode the weighted mean of the encoded clients."""
    form = SECURE[name]
    encoded = [form.encode(s, reference.config) for s in states]
    weights = normalised(num_examples, len(states))
    mean = AdapterState(reference.config, *(weighted_sum([getattr(e, g) for e in encoded], weights)
                                            for g in ("tensors", "modules_to_save")),
                        weighted_sum([{"": e.base_tensors} for e in encoded], weights).get("", {}))
    return form.decode(mean, reference, [s.config.r for s in states])


def _check_same_modules(states: list[AdapterState]) -> None:
    first = states[0]
    for k, s in enumerate(states[1:], 1):
        for what, a, b in (("adapted modules", first.tensors, s.tensors), ("modules_to_save", first.modules_to_save, s.modules_to_save)):
            if set(a) != set(b):
                diff = sorted(set(a) ^ set(b))[:5]
                raise ValueError(f"client {k} and client 0 differ in their {what}: {diff}")
        if type(s.config) is not type(first.config):
            raise ValueError(f"client {k} uses {type(s.config).__name__}, client 0 {type(first.config).__name__}")


def weighted_sum(groups: Sequence[Tensors], weights: Sequence[float]) -> Tensors:
    """Key-wise sum of p_k * tensor over clients (tensors must agree in shape; computed in float64)."""
    out: Tensors = {}
    for path, tensors in groups[0].items():
        out[path] = {}
        for key, t in tensors.items():
            shapes = {tuple(g[path][key].shape) for g in groups}
            if len(shapes) > 1:
                raise ValueError(f"module '{path}', tensor '{key}': clients disagree on the shape: {sorted(shapes)}")
            if not t.is_floating_point():
                out[path][key] = t.clone()
                continue
            acc = sum(w * g[path][key].double() for g, w in zip(groups, weights))
            out[path][key] = acc.to(t.dtype)
    return out


def factors(state: AdapterState, path: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A [r, in], B [out, r], scale) of one module in float64, with an error naming methods that have none."""
    state.require("aggregatable", f"aggregate module '{path}' factor-wise")
    lr = state.low_rank(path)
    if lr is None:
        raise ValueError(
            f"module '{path}': method '{state.config.method_name}' has no exact low-rank form here, so it cannot be "
            "aggregated factor-wise; use strategy 'fedit' (key-wise average) instead"
        )
    a, b, s = lr
    return a.double(), b.double(), float(s)


def exact_update(states: Sequence[AdapterState], weights: Sequence[float], path: str) -> torch.Tensor:
    """The ideal aggregate of one module, sum_k p_k s_k B_k A_k ([out, in], float64)."""
    total = None
    for state, w in zip(states, weights):
        a, b, s = factors(state, path)
        term = (w * s) * (b @ a)
        total = term if total is None else total + term
    return total


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want||_F / ||want||_F, in float64."""
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-300))


def update_of(state: AdapterState, path: str) -> torch.Tensor:
    """s * B @ A of one module ([out, in], float64)."""
    a, b, s = factors(state, path)
    return s * (b @ a)


def with_factors(like: dict[str, torch.Tensor], a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    """A copy of a module's tensors with its A and B replaced (dtype and trailing 1x1 kernel dims kept)."""
    a_key = next(k for k in like if k in A_KEYS)
    b_key = next(k for k in like if k in B_KEYS)
    out = dict(like)
    ref_a, ref_b = like[a_key], like[b_key]
    out[a_key] = a.reshape(a.shape[0], *ref_a.shape[1:]).to(ref_a.dtype)
    out[b_key] = b.reshape(b.shape[0], b.shape[1], *ref_b.shape[2:]).to(ref_b.dtype)
    return out


def with_ranks(config, ranks: dict[str, int], scales: Optional[dict[str, float]] = None):
    """``config`` with per-module ranks and scales (default 1), as rank_pattern / alpha_pattern where they vary.

    ``config`` itself comes back when it already gives every module that rank and scale.
    """
    scales = scales or {p: 1.0 for p in ranks}
    resolved = {p: config.for_module(p) for p in ranks}
    if all(resolved[p].r == ranks[p] and math.isclose(resolved[p].scaling, scales[p]) for p in ranks):
        return config
    # alpha such that scaling == s for the module's rank, with plain (non-rs) LoRA scaling
    alphas = {p: scales[p] * ranks[p] for p in ranks}
    r0 = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha0 = max(set(alphas.values()), key=list(alphas.values()).count)
    pattern = lambda values, default: {re.escape(p): v for p, v in values.items() if v != default}  # noqa: E731
    return dataclasses.replace(
        config, r=r0, lora_alpha=alpha0, use_rslora=False,
        rank_pattern=pattern(ranks, r0), alpha_pattern=pattern(alphas, alpha0),
    )


def pad_to(a: torch.Tensor, b: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A [r_k, in] and B [out, r_k] zero-padded to rank ``r`` (an error if r_k > r)."""
    if a.shape[0] > r:
        raise ValueError(f"rank {a.shape[0]} is above the run's largest rank {r}")
    return (torch.nn.functional.pad(a, (0, 0, 0, r - a.shape[0])), torch.nn.functional.pad(b, (0, r - b.shape[1])))


def encode_padded(state: AdapterState, config) -> AdapterState:
    """A client's A and B zero-padded to the rank ``config`` gives each module, with s_k / s folded into B."""
    tensors = {}
    for path in state.tensors:
        a, b, s = factors(state, path)
        ref = config.for_module(path)
        a_pad, b_pad = pad_to(a, b, ref.r)
        tensors[path] = with_factors(state.tensors[path], a_pad, (s / ref.scaling) * b_pad)
    return AdapterState(config, tensors, state.modules_to_save, state.base_tensors)


def keep_mean(mean: AdapterState, reference: AdapterState, ranks=()) -> AdapterState:
    """The decoded aggregate when it is the weighted mean itself, in the reference config."""
    return AdapterState(reference.config, mean.tensors, mean.modules_to_save, mean.base_tensors)


def padded(parts: Sequence[tuple[torch.Tensor, torch.Tensor, float]]):
    """Clients' factors zero-padded to the largest rank, with s_k / s folded into B_k.

    Returns (A_k padded, B_k padded and rescaled, s): s is the clients' common scaling, or 1 when they differ.
    """
    r_max = max(a.shape[0] for a, _, _ in parts)
    own = {round(s, 12) for _, _, s in parts}
    scale = own.pop() if len(own) == 1 else 1.0
    pads = [pad_to(a, b, r_max) for a, b, _ in parts]
    return [a for a, _ in pads], [(s / scale) * b for (_, b), (_, _, s) in zip(pads, parts)], scale



def aggregation_error(result: AdapterState, states: Sequence[AdapterState], num_examples: Sequence[float]) -> float:
    """Mean over modules of ||update of ``result`` - sum_k p_k s_k B_k A_k||_F / ||sum_k p_k s_k B_k A_k||_F."""
    weights = normalised(num_examples, len(states))
    errors = [relative_error(update_of(result, p), exact_update(states, weights, p)) for p in result.tensors]
    return sum(errors) / max(1, len(errors))
