"""A KV cache with one row (slot) per running request, for iteration-level batching of a Hugging Face model.

Per layer, keys and values live in ``[slots, kv_heads, max_len, head_dim]`` tensors, allocated on first use.
Column ``j`` of a row holds the token at position ``j`` of that request, so rows of different lengths share one
tensor and a decode step writes each row's new token at its own column. Running requests occupy slots
``[0, n)``; when one finishes, the last row moves into its place, so a step reads a prefix of the tensor.

The model calls ``update`` once per layer; before each forward the runner says what the call is:
``prefill(start, offsets, lengths)`` (left-padded prompts going into fresh slots; attention sees only the new
tokens) or ``decode(lengths)`` (one token per running slot, written at column ``lengths[b]``).
"""
from __future__ import annotations

from typing import Optional

import torch


class SlotKVCache:
    """Transformers-compatible cache object (``update``) over fixed slots."""

    is_compileable = False

    def __init__(self, num_layers: int, max_slots: int, max_len: int):
        self.num_layers, self.max_slots, self.max_len = num_layers, max_slots, max_len
        self.keys: list[Optional[torch.Tensor]] = [None] * num_layers
        self.values: list[Optional[torch.Tensor]] = [None] * num_layers
        self._mode = None

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.keys + self.values if t is not None)

    def prefill(self, start: int, offsets: list[int], lengths: list[int]) -> None:
        """The next forward holds ``len(lengths)`` prompts, left-padded by ``offsets``, for slots from ``start``."""
        self._mode = ("prefill", start, offsets, lengths)

    def decode(self, lengths: torch.Tensor) -> None:
        """The next forward holds one new token for each of slots ``[0, len(lengths))``."""
        self._mode = ("decode", lengths, int(lengths.max()) + 1)

    def _tensors(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is None:
            shape = (self.max_slots, like.shape[1], self.max_len, like.shape[3])
            self.keys[layer] = torch.zeros(shape, dtype=like.dtype, device=like.device)
            self.values[layer] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return self.keys[layer], self.values[layer]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        k, v = self._tensors(layer_idx, key_states)
        if self._mode[0] == "prefill":
            _, start, offsets, lengths = self._mode
            for b, (off, n) in enumerate(zip(offsets, lengths)):
                k[start + b, :, :n] = key_states[b, :, off:off + n]
                v[start + b, :, :n] = value_states[b, :, off:off + n]
            return key_states, value_states
        _, lengths, width = self._mode
        rows = torch.arange(lengths.numel(), device=lengths.device)
        k[rows, :, lengths] = key_states[:, :, 0]
        v[rows, :, lengths] = value_states[:, :, 0]
        return k[: rows.numel(), :, :width], v[: rows.numel(), :, :width]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot ``src``'s first ``length`` columns into slot ``dst`` (every layer)."""
        for t in self.keys + self.values:
            if t is not None:
                t[dst, :, :length] = t[src, :, :length]

    def clear(self, slot: int) -> None:
        """Zero every column of ``slot`` (every layer)."""
        for t in self.keys + self.values:
            if t is not None:
                t[slot].zero_()

    # Transformers may ask these; positions are always passed explicitly, so the cache never decides them.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return query_length, 0
