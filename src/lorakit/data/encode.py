"""Tokenisation of normalised examples and collation into padded batches (dynamic padding, right side).

Classification features: `input_ids`, `attention_mask`, `labels` (an int). Causal-LM features put the prompt
then the completion and an end-of-sequence token in `input_ids`; `labels` copies the completion tokens and
holds -100 on the prompt and on padding, so the loss covers the completion only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE_INDEX = -100


class EncodedDataset(torch.utils.data.Dataset):
    """Tokenised examples plus the padding id their `collate` needs."""

    def __init__(self, features: list[dict], pad_token_id: int, kind: str):
        self.features, self.pad_token_id, self.kind = features, pad_token_id, kind

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict:
        return self.features[index]

    def collate(self, batch: Sequence[dict]) -> dict[str, torch.Tensor]:
        """Pad a list of features to the longest one and stack them into tensors."""
        return collate(batch, self.pad_token_id)


def collate(batch: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad `input_ids` with pad_token_id, `attention_mask` with 0 and sequence `labels` with -100."""
    width = max(len(f["input_ids"]) for f in batch)
    out = {
        "input_ids": torch.tensor([f["input_ids"] + [pad_token_id] * (width - len(f["input_ids"])) for f in batch]),
        "attention_mask": torch.tensor([f["attention_mask"] + [0] * (width - len(f["attention_mask"])) for f in batch]),
    }
    if "labels" in batch[0]:
        labels = [f["labels"] for f in batch]
        if isinstance(labels[0], list):
            labels = [y + [IGNORE_INDEX] * (width - len(y)) for y in labels]
        out["labels"] = torch.tensor(labels)
    return out


def pad_id(tokenizer) -> int:
    """The tokenizer's padding id, else its end-of-sequence id."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return value
    raise ValueError(f"{type(tokenizer).__name__} has neither a pad nor an eos token; set tokenizer.pad_token first")


def _prompt_completion(prompt_ids: list[int], completion_ids: list[int], max_length: int) -> dict:
    """Features of one prompt/completion pair cut to max_length (labels on the completion only)."""
    # Keep the whole completion when it fits and cut the prompt from the left, so the tokens right before the
    # completion survive; a completion longer than max_length - 1 keeps one prompt token and its own head.
    completion_ids = completion_ids[: max_length - 1]
    keep = max_length - len(completion_ids)
    prompt_ids = prompt_ids[len(prompt_ids) - keep :] if len(prompt_ids) > keep else prompt_ids
    input_ids = prompt_ids + completion_ids
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids,
    }


def encode(examples: Sequence[dict], tokenizer, *, kind: str, max_length: int = 128) -> EncodedDataset:
    """Tokenise normalised examples (see `lorakit.data.task`) into an EncodedDataset."""
    if kind not in ("classification", "causal_lm"):
        raise ValueError(f"kind must be 'classification' or 'causal_lm', not {kind!r}")
    if not examples:
        features = []
    elif kind == "classification":
        enc = tokenizer([e["text"] for e in examples], truncation=True, max_length=max_length)
        features = [
            {"input_ids": ids, "attention_mask": mask, "labels": e["label"]}
            for ids, mask, e in zip(enc["input_ids"], enc["attention_mask"], examples)
        ]
    elif "messages" in examples[0]:
        from .chat import render

        features = [_prompt_completion(*render(tokenizer, e["messages"], i), max_length) for i, e in enumerate(examples)]
    else:
        prompts = tokenizer([e["prompt"] for e in examples])["input_ids"]
        completions = tokenizer([e["completion"] for e in examples], add_special_tokens=False)["input_ids"]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        features = [_prompt_completion(p, c + eos, max_length) for p, c in zip(prompts, completions)]
    return EncodedDataset(features, pad_id(tokenizer), kind)
