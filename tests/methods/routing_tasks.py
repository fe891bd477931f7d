"""Synthetic token-routing tasks for the routed-LoRA claim tests (MeteoRA, LoRA-Mixer, SMoRA).

Task t draws its tokens from its own slice of the vocabulary, and its target for a token is what the base model
gives with the task's own LoRA (its teacher). So an expert that fits task t exactly is that LoRA, and a router can
tell the tasks apart from the token alone.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit.testing import perturb_

VOCAB, DIM, OUT = 64, 16, 8


class TokenModel(nn.Module):
    """Embedding -> proj -> tanh -> out, token by token, with an MSE loss against per-token target vectors."""

    targets = ["proj", "out"]

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.out = nn.Linear(DIM, OUT)

    def forward(self, input_ids, labels=None, attention_mask=None):
        y = self.out(torch.tanh(self.proj(self.emb(input_ids))))
        return SimpleNamespace(loss=None if labels is None else F.mse_loss(y, labels), logits=y)


def base_model(n_tasks: int = 4, spread: float = 1.5) -> TokenModel:
    """The seeded base model; each task's slice of the embedding shares an offset, so tasks differ in input."""
    torch.manual_seed(0)
    model = TokenModel()
    with torch.no_grad():
        offsets = torch.randn(n_tasks, DIM)
        width = VOCAB // n_tasks
        for t in range(n_tasks):
            model.emb.weight[t * width : (t + 1) * width] += spread * offsets[t]
    return model


def teachers(n_tasks: int, rank: int = 4, scale: float = 0.5, seed: int = 100, alpha=None) -> list[lorakit.AdapterState]:
    """One random LoRA per task on the base model (``alpha`` per task: e.g. different scalings)."""
    states = []
    for t in range(n_tasks):
        model = lorakit.apply(base_model(), lorakit.LoRAConfig(
            r=rank, lora_alpha=(alpha[t] if alpha else 2 * rank), target_modules=TokenModel.targets))
        perturb_(model, scale, seed + t)
        states.append(lorakit.AdapterState.from_model(model))
    return states


def tokens_of(task: torch.Tensor, n_tasks: int, generator: torch.Generator) -> torch.Tensor:
    """A token id from each task's slice of the vocabulary, elementwise for a tensor of task ids."""
    width = VOCAB // n_tasks
    return task * width + torch.randint(0, width, task.shape, generator=generator)


@torch.no_grad()
def targets(ids: torch.Tensor, task: torch.Tensor, experts: list[lorakit.AdapterState]) -> torch.Tensor:
    """Per-token outputs of the base model with the token's own task LoRA."""
    outs = torch.stack([s.load_into(base_model())(ids).logits for s in experts])  # [T, batch, seq, OUT]
    return outs.gather(0, task[None, ..., None].expand(1, *task.shape, OUT))[0]


def stream(n: int, length: int, n_tasks: int, experts, seed: int = 0, mixed: bool = False) -> list[dict]:
    """Examples {input_ids, labels, route_labels}: one task per sequence, or a task per token when ``mixed``."""
    g = torch.Generator().manual_seed(seed)
    task = torch.randint(0, n_tasks, (n, length) if mixed else (n, 1), generator=g).expand(n, length)
    ids = tokens_of(task, n_tasks, g)
    y = targets(ids, task, experts)
    return [{"input_ids": ids[i], "labels": y[i], "route_labels": task[i]} for i in range(n)]


def batch(examples: list[dict]) -> dict:
    return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}


def mse(model: nn.Module, examples: list[dict]) -> float:
    """Mean squared error of ``model`` on ``examples`` (eval mode)."""
    data = batch(examples)
    model.eval()
    with torch.no_grad():
        return model(data["input_ids"], data["labels"]).loss.item()


def train(model: nn.Module, examples: list[dict], steps: int, lr: float = 1e-2, supervise: bool = False, seed: int = 0):
    """``lorakit.train.fit`` with the routing loss hook; ``supervise`` passes each token's task to the router."""
    from lorakit.methods import routing
    from lorakit.train import fit

    keep = ("input_ids", "labels", "route_labels") if supervise else ("input_ids", "labels")
    data = [{k: e[k] for k in keep} for e in examples]
    return fit(model, data, lr=lr, batch_size=32, max_steps=steps, warmup_ratio=0.0, schedule="constant",
               progress=False, seed=seed, loss_fn=routing.loss_fn, collate_fn=batch, max_grad_norm=None)
