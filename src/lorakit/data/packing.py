"""Sequence packing for causal-LM training: several examples per row, each attending only to itself.

``pack(dataset, max_length)`` fills rows of at most ``max_length`` tokens with whole examples (first fit, in data
order) and records each token's example in ``segments``. Its collate gives ``position_ids`` that restart at 0 for
every example and a 4-D additive attention mask [batch, 1, L, L] that is causal within an example and blocks every
other token (and padding), so a packed row computes what its examples compute alone. The first label of each
example is ignored: unpacked, no token precedes it to predict it. Models that accept 4-D masks (Llama, Gemma,
Qwen, Mistral, GPT-2... in transformers) train on packed rows; the loss is the mean over the same completion
tokens as without packing.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .encode import IGNORE_INDEX, EncodedDataset


class PackedDataset(EncodedDataset):
    """Packed rows; ``collate`` builds the block-diagonal causal masks."""

    def collate(self, batch: Sequence[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in batch)
        n = len(batch)
        ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((n, width), dtype=torch.long)
        segments = torch.full((n, width), -1, dtype=torch.long)  # -1: padding
        for j, f in enumerate(batch):
            k = len(f["input_ids"])
            ids[j, :k] = torch.tensor(f["input_ids"])
            labels[j, :k] = torch.tensor(f["labels"])
            positions[j, :k] = torch.tensor(f["position_ids"])
            segments[j, :k] = torch.tensor(f["segments"])
        same = (segments[:, :, None] == segments[:, None, :]) & (segments[:, :, None] >= 0)
        allowed = same & torch.ones(width, width, dtype=torch.bool).tril()
        allowed |= torch.eye(width, dtype=torch.bool)  # padding rows attend to themselves: no all-masked softmax
        mask = torch.zeros((n, 1, width, width)).masked_fill_(~allowed[:, None], torch.finfo(torch.float32).min)
        return {"input_ids": ids, "labels": labels, "position_ids": positions, "attention_mask": mask}


def pack(dataset: EncodedDataset, max_length: int) -> PackedDataset:
    """Rows of whole examples, at most ``max_length`` tokens each (an example longer than that is refused)."""
    if dataset.kind != "causal_lm":
        raise ValueError(f"packing is for causal-LM data, not {dataset.kind!r}")
    rows: list[dict] = []
    for i, f in enumerate(dataset.features):
        k = len(f["input_ids"])
        if k > max_length:
            raise ValueError(f"example {i} has {k} tokens, more than the packed row's {max_length}; encode with "
                             f"max_length <= {max_length}")
        row = next((r for r in rows if len(r["input_ids"]) + k <= max_length), None)
        if row is None:
            row = {"input_ids": [], "labels": [], "position_ids": [], "segments": [], "examples": []}
            rows.append(row)
        segment = row["segments"][-1] + 1 if row["segments"] else 0
        row["input_ids"] += f["input_ids"]
        row["labels"] += [IGNORE_INDEX] + list(f["labels"][1:])
        row["position_ids"] += list(range(k))
        row["segments"] += [segment] * k
        row["examples"].append(i)  # which example each segment holds
    return PackedDataset(rows, dataset.pad_token_id, "causal_lm")
