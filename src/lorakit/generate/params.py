"""Adapters as vectors: a fixed layout of LoRA tensors (``ParamSpace``) and a low-dimensional factor space
(``Factors``, principal components of the experts' vectors), where the generators' CVAEs work.

Each tensor key (module path, tensor name) is standardised by one mean and standard deviation taken over all the
adapters the space was fitted on (ICM-LoRA's official code standardises every tensor; one scalar pair per key keeps
the space shared by all adapters). Generated vectors map back to an ``AdapterState`` with the experts' LoRA config.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..core.state import AdapterState
from ..formats.peft import save_state
from ..core import fingerprint
from .zooindex import ZooError


@dataclass
class ParamSpace:
    """The layout of one LoRA family: (module, tensor, shape) in order, with per-key mean / std."""

    config: object
    keys: list[tuple[str, str, tuple[int, ...]]]
    mean: torch.Tensor  # [len(keys)]
    std: torch.Tensor  # [len(keys)]

    @classmethod
    def fit(cls, states: list[AdapterState], names: list[str]) -> ParamSpace:
        """The space of ``states`` (all with the same modules, tensors and shapes; names used in errors)."""
        if not states:
            raise ZooError("no expert adapters to fit a generator on")
        first = states[0]
        keys = [(p, k, tuple(t.shape)) for p in sorted(first.tensors) for k, t in sorted(first.tensors[p].items())]
        for state, name in zip(states, names):
            found = [(p, k, tuple(t.shape)) for p in sorted(state.tensors) for k, t in sorted(state.tensors[p].items())]
            if found != keys:
                diff = next((f"{a} vs {b}" for a, b in zip(keys, found) if a != b), f"{len(keys)} vs {len(found)} tensors")
                raise ZooError(f"adapter {name!r} does not share the layout of {names[0]!r} ({diff}); a generator needs "
                               "adapters of one base, method, rank and target modules")
        values = [[s.tensors[p][k].float() for s in states] for p, k, _ in keys]
        mean = torch.stack([torch.stack(v).mean() for v in values])
        std = torch.stack([torch.stack(v).std().clamp_min(1e-8) for v in values])
        config = dataclasses.replace(first.config, modules_to_save=None)
        return cls(config, keys, mean, std)

    @property
    def dim(self) -> int:
        return sum(int(torch.tensor(shape).prod()) for _, _, shape in self.keys)

    def flatten(self, state: AdapterState) -> torch.Tensor:
        """The standardised vector [dim] of ``state``."""
        return torch.cat([((state.tensors[p][k].float() - self.mean[i]) / self.std[i]).reshape(-1)
                          for i, (p, k, _) in enumerate(self.keys)])

    def unflatten(self, vector: torch.Tensor) -> AdapterState:
        """The AdapterState whose standardised vector is ``vector``."""
        tensors: dict = {}
        start = 0
        for i, (p, k, shape) in enumerate(self.keys):
            n = int(torch.tensor(shape).prod())
            tensors.setdefault(p, {})[k] = (vector[start:start + n] * self.std[i] + self.mean[i]).reshape(shape).clone()
            start += n
        return AdapterState(self.config, tensors)

    def nbytes(self) -> int:
        return (self.mean.numel() + self.std.numel()) * 4


@dataclass
class Factors:
    """Principal components of a set of vectors: x ≈ mean + (c * scale) @ basis, c of unit variance."""

    mean: torch.Tensor  # [D]
    basis: torch.Tensor  # [K, D], orthonormal rows
    scale: torch.Tensor  # [K], the components' standard deviations

    @classmethod
    def fit(cls, x: torch.Tensor, k: int) -> Factors:
        """The top ``k`` components of the rows of ``x`` (at most rows - 1)."""
        mean = x.mean(0)
        _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
        k = max(1, min(k, x.shape[0] - 1, int((s > s[0] * 1e-6).sum())))
        return cls(mean, vh[:k].contiguous(), (s[:k] / max(x.shape[0] - 1, 1) ** 0.5).clamp_min(1e-8))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) @ self.basis.T / self.scale

    def decode(self, c: torch.Tensor) -> torch.Tensor:
        return self.mean + (c * self.scale) @ self.basis

    def nbytes(self) -> int:
        return (self.mean.numel() + self.basis.numel() + self.scale.numel()) * 4


def head_parameters(model) -> frozenset:
    """Names of the parameters outside the backbone (the task head), whose values a generated adapter leaves open."""
    inside = {id(p) for p in getattr(model, "base_model", model).parameters()}
    return frozenset(n for n, p in model.named_parameters() if id(p) not in inside)


def write_adapter(state: AdapterState, path, model) -> object:
    """Save a generated LoRA as a PEFT directory, recording ``model`` as its base (head values not compared)."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    state = state.replace(base_model_name_or_path=str(name)) if name else state
    return save_state(state, path, base=fingerprint.record(model, skip_values=head_parameters(model)))
