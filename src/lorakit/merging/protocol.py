"""The merger protocol: ``Part`` (one input's update of one module), ``Merger`` and the ``MERGERS`` registry.

A merger is a pure per-module function ``fn(parts, weights, **knobs) -> (A [k, in], B [out, k])`` with the merged
update ``ΔW = B A`` (scaling 1). ``parts`` holds one ``Part`` per input, in input order; an input that does not
adapt the module contributes a rank-0 part (a zero update). Register one with ``@merger(name, ...)`` beside its
definition; being registered puts it under the property tests of tests/merging/test_merge_registry.py.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..core.registry import Registry

Factors = tuple[torch.Tensor, torch.Tensor]
MERGERS = Registry("merge method")


class MergeError(ValueError):
    """Adapters that cannot be merged as asked."""


@dataclass(frozen=True)
class Part:
    """One input's update of one module: ΔW = scale · B A, with A [r, in] and B [out, r] (2-D, float32)."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def dense(self) -> torch.Tensor:
        """ΔW as [out, in]; computed as PEFT does, (B A) · scale."""
        return (self.b @ self.a) * self.scale


@dataclass(frozen=True)
class Merger:
    """A registered merge method and the behaviour it declares (checked by tests/merging)."""

    name: str
    fn: Callable[..., Factors]
    averages: bool = False  # n identical inputs (weight 1) merge to the input itself, not n times it
    exact: dict = field(default_factory=dict)  # knobs under which a lone input's update is reproduced exactly
    order_invariant: bool = True  # permuting the inputs (with their weights) leaves the result unchanged
    random: bool = False  # takes a torch.Generator, seeded from ``seed`` and the module path

    def knobs(self) -> list[str]:
        params = inspect.signature(self.fn).parameters
        return [n for n in params if n not in ("parts", "weights", "generator")]


def merger(name: str, **declared) -> Callable[[Callable], Callable]:
    """Decorator: register a per-module merge function under ``name``."""

    def deco(fn: Callable) -> Callable:
        MERGERS.register(name)(Merger(name, fn, **declared))
        return fn

    return deco


def max_rank(parts: Sequence[Part]) -> int:
    """The largest input rank at a module: the default rank of methods that re-factor."""
    return max(p.rank for p in parts)
