"""Evaluation: loss and accuracy for classification, loss and perplexity for causal LM, plus a metric hook.

The kind follows from the labels: one per example (classification) or one per token (causal LM, -100 ignored).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch

from ..data.encode import IGNORE_INDEX

MetricFn = Callable[[torch.Tensor, dict[str, torch.Tensor]], dict[str, float]]


def collate_for(data, collate_fn: Callable | None) -> Callable:
    """The collate function to use: the given one, else the dataset's own `collate`, else torch's default."""
    return collate_fn or getattr(data, "collate", None) or torch.utils.data.default_collate


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Move every tensor of a batch to `device`."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def batches(data: Sequence, indices: Sequence[int], batch_size: int, collate: Callable):
    """Collated batches of data[indices] in order, batch_size examples each (the last may be smaller)."""
    for start in range(0, len(indices), batch_size):
        yield collate([data[i] for i in indices[start : start + batch_size]])


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data: Sequence,
    *,
    batch_size: int = 32,
    collate_fn: Callable | None = None,
    metric_fn: MetricFn | None = None,
) -> dict[str, float]:
    """Mean loss and accuracy (classification) or perplexity (causal LM); metric_fn(logits, batch) -> dict is
    averaged over batches weighted by their number of examples."""
    if len(data) == 0:
        raise ValueError("evaluate got an empty dataset")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums: dict[str, float] = defaultdict(float)
    examples = weight = correct = 0
    try:
        for batch in batches(data, range(len(data)), batch_size, collate_for(data, collate_fn)):
            batch = to_device(batch, device)
            out = model(**batch)
            labels = batch["labels"]
            if labels.dim() == 1:
                n = labels.numel()
                correct += (out.logits.argmax(-1) == labels).sum().item()
            else:
                # HF causal LMs shift labels by one inside forward: position 0 is never a target.
                n = (labels[:, 1:] != IGNORE_INDEX).sum().item()
            sums["loss"] += out.loss.float().item() * n
            weight += n
            if metric_fn is not None:
                for key, value in metric_fn(out.logits, batch).items():
                    sums[key] += float(value) * labels.shape[0]
            examples += labels.shape[0]
    finally:
        model.train(was_training)
    result = {"loss": sums.pop("loss") / max(weight, 1)}
    if labels.dim() == 1:
        result["accuracy"] = correct / examples
    else:
        result["perplexity"] = math.exp(min(result["loss"], 700.0))  # exp overflows float64 past ~709
    result.update({key: total / examples for key, total in sums.items()})
    return result
