"""``combine(states, method, weights)``: validate the inputs, run a merger on every module, build the new state.

Every module is merged by the method's per-module function (see ``protocol``); an input that does not adapt a
module contributes a zero update there, so inputs with different but overlapping targets merge. The result is an ordinary LoRA state: ``r = lora_alpha`` (scaling 1, the inputs' scalings folded into
the factors, as PEFT does) and ``rank_pattern``/``alpha_pattern`` for modules whose merged rank differs.

One input with weight 1 and no ``rank`` is returned unchanged (a copy) by every method: there is nothing to
combine, and TIES/DARE would otherwise trim or drop a lone adapter (PEFT likewise switches to linear for one
adapter, but rebuilds the config and so rescales rsLoRA adapters: its issue #3761).
"""
from __future__ import annotations

import dataclasses
import math
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from ..core.capabilities import CapabilityError
from ..core.config import LoRAConfig
from ..core.state import AdapterState
from .carry import carry_full_modules
from .protocol import MERGERS, MergeError, Merger, Part

# tensor keys of a LoRA module, by layer kind: (A, B)
LORA_KEYS = (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B"))


def combine(states: Sequence[AdapterState], method: str, weights: Optional[Sequence[float]] = None, *,
            modules_to_save: Union[None, str, int] = None, seed: Optional[int] = None, **knobs) -> AdapterState:
    """Merge ``states`` with ``method`` into one LoRA adapter state (weights default to 1 each)."""
    m: Merger = MERGERS.get(method)
    states = list(states)
    if not states or not all(isinstance(s, AdapterState) for s in states):
        raise MergeError("combine needs a non-empty list of AdapterState (lorakit.load_state(dir) reads one)")
    weights = [1.0] * len(states) if weights is None else [float(w) for w in weights]
    if len(weights) != len(states) or not all(math.isfinite(w) for w in weights):
        raise MergeError(f"expected {len(states)} finite weights (one per adapter), found {weights}")
    unknown = sorted(set(knobs) - set(m.knobs()))
    if unknown:
        raise MergeError(f"method '{method}' has no setting {', '.join(unknown)}; its settings: {', '.join(m.knobs()) or '(none)'}")
    rank = knobs.get("rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise MergeError(f"rank must be a positive integer, found {rank!r}")
    if seed is not None and not m.random:
        raise MergeError(f"method '{method}' is deterministic: a seed does not apply")
    if len(states) == 1 and weights == [1.0] and rank is None:
        return states[0].clone()
    _check_inputs(states)
    paths = list(dict.fromkeys(p for s in states for p in s.tensors))
    tensors = {}
    for path in paths:
        layout = _layout(path, states)
        parts = [_part(s, path, layout) for s in states]
        extra = {"generator": _generator(seed or 0, path)} if m.random else {}
        a, b = m.fn(parts, weights, **knobs, **extra)
        tensors[path] = layout.tensors(a, b)
    full, config_changes = carry_full_modules(states, weights, modules_to_save)
    return AdapterState(_merged_config(states, tensors, config_changes), tensors, *full)


def _generator(seed: int, path: str) -> torch.Generator:
    # one stream per module, independent of the other modules and of the order they are merged in
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(path.encode()))


def _check_inputs(states: list[AdapterState]) -> None:
    for i, s in enumerate(states):
        cfg = s.config
        if getattr(cfg, "use_dora", False):
            raise MergeError(
                f"adapter {i} is DoRA: its update m·(W+sBA)/‖W+sBA‖ − W depends on the base weight and is not low-rank, "
                "so no merge of it is exact except merging it alone with weight 1. Fold it into the model "
                "(lorakit.merge) or merge LoRA adapters"
            )
        try:  # merging (concatenation included) combines s·B·A factors: the method must declare them exact
            s.require("exportable_to_lora", f"merge adapter {i}")
        except CapabilityError as e:
            raise MergeError(str(e)) from None
        if not isinstance(cfg, LoRAConfig):
            not_low_rank = [p for p in s.modules() if s.low_rank(p) is None]
            if not_low_rank:
                raise MergeError(
                    f"adapter {i}: method '{cfg.method_name}' has no exact low-rank form on module "
                    f"'{not_low_rank[0]}', so it cannot be merged; fold it into the model with lorakit.merge"
                )
    bases = {s.config.base_model_name_or_path for s in states} - {None}
    if len(bases) > 1:
        raise MergeError(f"the adapters were made for different base models: {', '.join(sorted(bases))}")
    if len({s.config.fan_in_fan_out for s in states}) > 1:
        raise MergeError("the adapters disagree on fan_in_fan_out, so they were made for different base models")


@dataclass(frozen=True)
class _Layout:
    """How one module's factors are stored: tensor keys, dimensions and trailing (conv kernel) shapes."""

    keys: tuple[str, str]
    out_dim: int
    in_dim: int
    a_tail: tuple[int, ...]
    b_tail: tuple[int, ...]
    dtype: torch.dtype

    def tensors(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        if a.shape[0] == 0:  # PEFT refuses r = 0: store one zero unit instead
            a, b = a.new_zeros(1, a.shape[1]), b.new_zeros(b.shape[0], 1)
        k = a.shape[0]
        a = a.reshape(k, *self.a_tail).to(self.dtype).contiguous()
        b = b.reshape(self.out_dim, k, *self.b_tail).to(self.dtype).contiguous()
        return {self.keys[0]: a, self.keys[1]: b}


def _layout(path: str, states: list[AdapterState]) -> _Layout:
    found = {}
    for i, s in enumerate(states):
        if path not in s.tensors:
            continue
        t = s.tensors[path]
        low = s.low_rank(path) if s.config.method_name != "lora" else None
        if low is not None:  # another exactly low-rank method: its factors define the layout, stored as LoRA
            a, b, _ = low
            found[i] = _Layout(LORA_KEYS[0], b.shape[0], a.shape[1], (a.shape[1],), (), a.dtype)
            continue
        keys = next((k for k in LORA_KEYS if set(k) <= set(t)), None)
        if keys is None or len(t) != 2:
            raise MergeError(f"adapter {i}, module '{path}': expected LoRA tensors {LORA_KEYS[0]}, found {sorted(t)}")
        a, b = t[keys[0]], t[keys[1]]
        found[i] = _Layout(keys, b.shape[0], a[0].numel(), tuple(a.shape[1:]), tuple(b.shape[2:]), a.dtype)
    shapes = {(lay.keys, lay.out_dim, lay.a_tail, lay.b_tail) for lay in found.values()}
    if len(shapes) > 1:
        seen = "; ".join(f"adapter {i}: out {lay.out_dim}, in {lay.a_tail}" for i, lay in found.items())
        raise MergeError(f"module '{path}' has different shapes in the adapters ({seen}): they were made for different base models")
    first = next(iter(found.values()))
    dtype = first.dtype
    for lay in found.values():
        dtype = torch.promote_types(dtype, lay.dtype)
    return dataclasses.replace(first, dtype=dtype)


def _part(state: AdapterState, path: str, layout: _Layout) -> Part:
    if path not in state.tensors:
        return Part(torch.zeros(0, layout.in_dim), torch.zeros(layout.out_dim, 0), 0.0)
    low = state.low_rank(path)
    if low is None:  # LoRA on a convolution with a kernel: ΔW.flatten(1) = B.flatten(1) @ A.flatten(1)
        t = state.tensors[path]
        low = (t[layout.keys[0]], t[layout.keys[1]], state.module_config(path).scaling)
    a, b, scale = low
    return Part(a.flatten(1).float(), b.flatten(1).float(), float(scale))


def _merged_config(states: list[AdapterState], tensors: dict, changes: dict) -> LoRAConfig:
    first = states[0].config
    ranks = {p: next(t[a] for a, _ in LORA_KEYS if a in t).shape[0] for p, t in tensors.items()}
    counts = Counter(ranks.values())
    r = max(counts, key=lambda v: (counts[v], v))
    pattern = {re.escape(p): k for p, k in ranks.items() if k != r}
    task_types = {s.config.task_type for s in states}
    return LoRAConfig(
        r=r, lora_alpha=r, rank_pattern=pattern, alpha_pattern=dict(pattern), target_modules=list(tensors),
        fan_in_fan_out=first.fan_in_fan_out, lora_dropout=getattr(first, "lora_dropout", 0.0),
        task_type=first.task_type if len(task_types) == 1 else None,
        base_model_name_or_path=next((s.config.base_model_name_or_path for s in states if s.config.base_model_name_or_path), None),
        **changes,
    )
