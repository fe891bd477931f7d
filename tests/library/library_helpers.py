"""Adapters for the library tests: the CLI tests' tiny ``Net`` adapters, and constructed adapters that differ by
task (each task writes into its own output subspace of every layer; A is random per adapter, as LoRA's is)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

import lorakit
from lorakit.core import fingerprint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))
from trust_helpers import Net, one_line_error, save_adapter, snapshot, write_task  # noqa: E402

__all__ = ["CONCEPTS", "Net", "Tower", "one_line_error", "pair_adapter", "save_adapter", "snapshot", "task_adapter",
           "write_task", "TASKS"]

TASKS = (
    "Sentiment of movie reviews: positive or negative.",
    "Detect spam in e-mail messages.",
    "Topic of news articles: sports, politics, business or science.",
    "Solve arithmetic word problems.",
    "Translate English sentences into French.",
    "Tag the part of speech of each word.",
)
D_IN, D_OUT, LAYERS = 32, 48, 4


class Tower(nn.Module):
    """Four Linear layers (32 -> 48), seeded: a base for constructed adapters."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(nn.Linear(D_IN, D_OUT) for _ in range(LAYERS))


def _subspace(g: torch.Generator, d: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, 2, generator=g)).Q


def task_adapter(path: Path, task: int, seed: int, noise: float = 0.3, input_side: bool = True) -> Path:
    """An adapter of ``task``. With ``input_side``: per layer ΔW = U_task S_task V_taskᵀ + noise (rank 2, fixed per
    task) in a factorisation of its own, A = P V_taskᵀ, B = U_task S_task P⁺ (P random per adapter), as adapters of
    one task trained from different seeds agree on ΔW, not on A and B. Without: A random, B = U_task C + noise
    (only the output side is the task's)."""
    directions = torch.Generator().manual_seed(7)
    outputs = [[_subspace(directions, D_OUT) for _ in range(LAYERS)] for _ in TASKS]
    inputs = [[_subspace(directions, D_IN) for _ in range(LAYERS)] for _ in TASKS]
    cores = [[torch.randn(2, 2, generator=directions) for _ in range(LAYERS)] for _ in TASKS]
    g = torch.Generator().manual_seed(1000 * task + seed)
    tensors = {}
    for i in range(LAYERS):
        a = torch.randn(4, D_IN, generator=g) / D_IN ** 0.5
        b = outputs[task][i] @ torch.randn(2, 4, generator=g)
        if input_side:
            p = torch.randn(4, 2, generator=g)
            a = p @ inputs[task][i].T + noise * a
            b = outputs[task][i] @ cores[task][i] @ torch.linalg.pinv(p)
        b = b + noise * torch.randn(D_OUT, 4, generator=g) / D_OUT ** 0.5
        tensors[f"layers.{i}"] = {"lora_A.weight": a, "lora_B.weight": b}
    config = lorakit.LoRAConfig(r=4, lora_alpha=4, target_modules=["0", "1", "2", "3"])
    return lorakit.save_state(lorakit.AdapterState(config, tensors), path, base=fingerprint.record(Tower()))


CONCEPTS = ("animals", "plants", "vehicles", "music", "weather", "food")


def pair_adapter(path: Path, a: int, b: int, seed: int, noise: float = 0.3) -> Path:
    """An adapter of the task "concept a or concept b?": A random per adapter (LoRA's initialisation); per layer B
    writes into the two concepts' output subspaces (fixed per concept), so tasks that share a concept are related."""
    directions = torch.Generator().manual_seed(11)
    outputs = [[_subspace(directions, D_OUT) for _ in range(LAYERS)] for _ in CONCEPTS]
    g = torch.Generator().manual_seed(1000 * (10 * a + b) + seed)
    tensors = {}
    for i in range(LAYERS):
        u = torch.cat([outputs[a][i], outputs[b][i]], 1)  # (D_OUT, 4)
        a_ = torch.randn(4, D_IN, generator=g) / D_IN ** 0.5
        b_ = u @ torch.randn(4, 4, generator=g) + noise * torch.randn(D_OUT, 4, generator=g) / D_OUT ** 0.5
        tensors[f"layers.{i}"] = {"lora_A.weight": a_, "lora_B.weight": b_}
    config = lorakit.LoRAConfig(r=4, lora_alpha=4, target_modules=["0", "1", "2", "3"])
    return lorakit.save_state(lorakit.AdapterState(config, tensors), path, base=fingerprint.record(Tower()))
