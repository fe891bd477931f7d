"""What the generators and the zoo read off a model: pooled hidden states, sentence embeddings, linear probes.

- ``pooled(model, features)``: a sequence classifier's input to its head (BERT: the pooler output) for encoded
  examples, batched by length.
- ``hidden_mean(model, tokenizer, texts)``: the last hidden state of the backbone (``model.base_model``), mean over
  tokens for an encoder and the last real token for a causal LM (ICM-LoRA's "final token"); one row per text.
- ``embed(texts)``: MiniLM sentence embeddings (mean-pooled, unit length), the description encoder of SG-LoRA.
- ``fit_probe(x, y, classes)``: a linear head trained alone on frozen features (full-batch AdamW).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..data import collate


def _batches(features: list[dict], batch_size: int):
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


@torch.inference_mode()
def pooled(model: nn.Module, features: list[dict], pad_id: int, batch_size: int = 64) -> torch.Tensor:
    """The head's input [N, hidden] for encoded examples, in their order (BERT: pooler output)."""
    model.eval()
    out: list = [None] * len(features)
    for idx in _batches(features, batch_size):
        batch = collate([{k: features[i][k] for k in ("input_ids", "attention_mask")} for i in idx], pad_id)
        hidden = model.base_model(**batch)
        rows = hidden.pooler_output if getattr(hidden, "pooler_output", None) is not None else _last(hidden, batch)
        for i, row in zip(idx, rows):
            out[i] = row.float()
    return torch.stack(out)


def _last(hidden, batch) -> torch.Tensor:
    last = batch["attention_mask"].sum(1) - 1
    return hidden.last_hidden_state[torch.arange(len(last)), last]


@torch.inference_mode()
def hidden_mean(model: nn.Module, tokenizer, texts: list[str], max_length: int = 64, causal: bool = False,
                batch_size: int = 32) -> torch.Tensor:
    """Last hidden state per text [N, hidden]: token mean (encoder) or the last real token (causal LM)."""
    model.eval()
    rows = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], truncation=True, max_length=max_length, padding=True,
                          return_tensors="pt")
        batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        hidden = model.base_model(**batch)
        if causal:
            rows.append(_last(hidden, batch).float())
        else:
            mask = batch["attention_mask"].unsqueeze(-1).float()
            rows.append(((hidden.last_hidden_state * mask).sum(1) / mask.sum(1)).float())
    return torch.cat(rows)


@functools.lru_cache(maxsize=1)
def _minilm():
    from .. import zoo

    return zoo.load("minilm", task="base")


def embed(texts: list[str]) -> torch.Tensor:
    """Unit-length MiniLM sentence embeddings [N, 384] (all-MiniLM-L6-v2's mean pooling)."""
    model, tokenizer = _minilm()
    return F.normalize(hidden_mean(model, tokenizer, list(texts), max_length=128), dim=-1)


def fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int, seed: int = 0, steps: int = 200,
              lr: float = 1e-2) -> nn.Linear:
    """A linear head on frozen features, initialised as BERT's classifier from ``seed`` (N(0, 0.02), zero bias)."""
    x = x.detach().clone()
    head = nn.Linear(x.shape[1], classes)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.02)
        head.bias.zero_()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.cross_entropy(head(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return head.requires_grad_(False)


def accuracy(head: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of rows whose argmax of ``head(x)`` is ``y``."""
    with torch.no_grad():
        return (head(x).argmax(-1) == y).float().mean().item()
