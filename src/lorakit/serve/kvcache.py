"""A KV cache with one row (slot) per running request, for iteration-level batching of a Hugging Face model.

Per layer, keys and values live in ``[slots, kv_heads, max_len, head_dim]`` tensors, allocated on first use.
Column ``j`` of a row holds the token at position ``j`` of that request, so rows of different lengths share one
tensor and a decode step writes each row's new token at its own column. Running requests occupy slots
``[0, n)``; when one finishes, the last row moves into its place, so a step reads a prefix of the tensor.

The model calls ``update`` once per layer; before each forward the runner says what the call is:
``prefill(start, offsets, lengths)`` (left-padded prompts going into fresh slots; attention sees only the new
tokens) or ``decode(lengths)`` (one token per running slot, written at column ``lengths[b]``).

The packed step (``packed(step)``, a ``PackedStep``) is the fast path: one sequence of ``T`` tokens with no padding,
the decode tokens of slots ``[0, n)`` first, then each new prompt in full. ``update`` writes every token's key and
value into its slot and column, and the attention function registered here as ``lorakit_slots`` reads the slots:
decode queries attend over their own row up to the longest decode length (a mask per row), prompts over their own
new keys (causal, one call per prompt). The linear layers thus see every real token once and nothing
else, prefill and decode share one forward, and the model's own mask builder is skipped (transformers builds no
mask for an attention implementation it does not know).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

ATTENTION = "lorakit_slots"


@dataclass
class PackedStep:
    """Where each token of a packed forward goes: ``n_dec`` decode tokens, then prompts of ``pre_lens`` tokens."""

    n_dec: int
    dec_len: torch.Tensor  # [n_dec] column of each decode token (its position)
    dec_mask: Optional[torch.Tensor]  # [n_dec, 1, 1, width] keys each decode token sees; None: no decode tokens
    pre_start: int  # slot of the first prompt
    pre_slot: torch.Tensor  # [P] slot offset (from pre_start) of each prompt token
    pre_col: torch.Tensor  # [P] its column (position)
    pre_lens: list[int]  # tokens of each prompt
    _rows: dict = field(default_factory=dict, repr=False)  # (heads, max_len) -> flat cache rows, built once a step

    @classmethod
    def build(cls, dec_lengths: list[int], pre_start: int, pre_lengths: list[int], device=None) -> "PackedStep":
        host = torch.device("cpu")  # built on the host, then moved in one copy each
        dec_len = torch.tensor(dec_lengths, dtype=torch.long, device=host)
        mask = None
        if dec_lengths:
            k = torch.arange(max(dec_lengths) + 1, device=host)
            mask = (k[None, :] <= dec_len[:, None])[:, None, None, :].to(device)
        lens = torch.tensor(pre_lengths, dtype=torch.long, device=host)
        slot = torch.repeat_interleave(torch.arange(len(pre_lengths), device=host), lens)
        starts = torch.cumsum(lens, 0) - lens
        col = torch.arange(int(lens.sum()), device=host) - torch.repeat_interleave(starts, lens)
        return cls(len(dec_lengths), dec_len.to(device), mask, pre_start, slot.to(device), col.to(device), list(pre_lengths))

    @property
    def positions(self) -> torch.Tensor:
        """[T] position of every token of the step."""
        return torch.cat([self.dec_len, self.pre_col])

    def rows(self, cache: torch.Tensor) -> torch.Tensor:
        """[T * heads] row of every (token, head) in ``cache [slots, heads, max_len, dim]`` seen as ``[-1, dim]``:
        one ``index_copy_`` per layer writes the step's keys (the same rows serve every layer)."""
        _, heads, max_len, _ = cache.shape
        rows = self._rows.get((heads, max_len))
        if rows is None:
            slots = torch.cat([torch.arange(self.n_dec, device=self.dec_len.device), self.pre_slot + self.pre_start])
            first = (slots * heads) * max_len + self.positions  # head 0 of each token
            rows = (first[:, None] + torch.arange(heads, device=first.device)[None, :] * max_len).reshape(-1)
            self._rows[(heads, max_len)] = rows
        return rows


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, lorakit_step=None, **kwargs):
    """Attention of a packed step (``query [1, heads, T, dim]``) over the slots of ``lorakit_step``'s cache."""
    if lorakit_step is None:
        raise RuntimeError("the lorakit_slots attention runs only inside lorakit's packed forward")
    cache, step = lorakit_step
    k, v = cache.keys[module.layer_idx], cache.values[module.layer_idx]
    q = query[0].transpose(0, 1)  # [T, heads, dim]
    gqa = q.shape[1] != k.shape[1]
    parts = []
    if step.n_dec:
        width = step.dec_mask.shape[-1]
        out = F.scaled_dot_product_attention(q[:step.n_dec, :, None], k[:step.n_dec, :, :width], v[:step.n_dec, :, :width],
                                             attn_mask=step.dec_mask, scale=scaling, enable_gqa=gqa)
        parts.append(out[:, :, 0])
    start = step.n_dec
    for n in step.pre_lens:  # each prompt over its own new keys (``update`` returned them), causal: no padding
        span = slice(start, start + n)
        out = F.scaled_dot_product_attention(query[:, :, span], key[:, :, span], value[:, :, span], is_causal=True,
                                             scale=scaling, enable_gqa=gqa)
        parts.append(out[0].transpose(0, 1))
        start += n
    return torch.cat(parts)[None], None


AttentionInterface.register(ATTENTION, slot_attention)


class SlotKVCache:
    """Transformers-compatible cache object (``update``) over fixed slots."""

    is_compileable = False

    def __init__(self, num_layers: int, max_slots: int, max_len: int):
        self.num_layers, self.max_slots, self.max_len = num_layers, max_slots, max_len
        self.keys: list[Optional[torch.Tensor]] = [None] * num_layers
        self.values: list[Optional[torch.Tensor]] = [None] * num_layers
        self._mode = None

    @property
    def device(self) -> Optional[torch.device]:
        """Where the cache lives (None before the first forward allocates it)."""
        return next((t.device for t in self.keys if t is not None), None)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.keys + self.values if t is not None)

    def prefill(self, start: int, offsets: list[int], lengths: list[int]) -> None:
        """The next forward holds ``len(lengths)`` prompts, left-padded by ``offsets``, for slots from ``start``."""
        self._mode = ("prefill", start, offsets, lengths)

    def packed(self, step: PackedStep) -> None:
        """The next forward is a packed step (``slot_attention`` reads the slots)."""
        self._mode = ("packed", step)

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
        if self._mode[0] == "packed":
            rows, dim = self._mode[1].rows(k), k.shape[-1]
            k.view(-1, dim).index_copy_(0, rows, key_states[0].transpose(0, 1).reshape(-1, dim))  # [T * heads, dim]
            v.view(-1, dim).index_copy_(0, rows, value_states[0].transpose(0, 1).reshape(-1, dim))
            return key_states, value_states
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
