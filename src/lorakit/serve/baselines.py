"""The systems the serving benchmark compares with, run by the same engine, KV cache and scheduler loop:

- ``PeftMixedRunner``: PEFT's own mixed-batch forward (``PeftModel(..., adapter_names=[...])``, one name per row;
  every adapter is loaded into the PeftModel beforehand), so only the LoRA operator differs from ours;
- ``MergeSwapEngine`` + ``MergedRunner``: one adapter per batch, merged into the base weights before the batch
  and taken out after (S-LoRA's "PEFT" baseline semantics): a request waits until the running batch, of another
  adapter, has drained. Unmerging restores a saved copy of the original weights, so no rounding accumulates.

``peft`` is imported by the caller, not here: it is a benchmark dependency, not a serving one.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Optional, Sequence

import torch

from .engine import Engine, Request
from .pool import AdapterPool
from .runner import ModelRunner
from .store import AdapterStore


class PeftMixedRunner(ModelRunner):
    """Forwards through a PeftModel holding every adapter, passing each row's adapter name."""

    needs_pool = False
    packs = False  # adapter_names names one adapter per batch row: the padded path
    serving_layout = False  # PEFT as its users run it

    def __init__(self, peft_model, store: AdapterStore, max_slots: int, max_len: int):
        super().__init__(peft_model, AdapterPool(0), max_slots, max_len)
        self.store = store
        self._names: list[str] = []

    def _set_adapters(self, rows: Sequence[Optional[str]], real: Optional[torch.Tensor] = None) -> None:
        self._names = ["__base__" if a is None else self.store.by_aid[a].name for a in rows]

    def _forward(self, **inputs):
        return self.model(**inputs, adapter_names=self._names)


class MergedRunner(ModelRunner):
    """Runs with one adapter merged into the base weights; switching adapters restores them and merges anew."""

    needs_pool = False
    serving_layout = False  # the merge-and-swap server as it is usually run

    def __init__(self, model, store: AdapterStore, max_slots: int, max_len: int):
        super().__init__(model, AdapterPool(0), max_slots, max_len)
        self.store = store
        self.current: Optional[str] = None
        self.originals: dict[str, torch.Tensor] = {}
        self.stats = {"switches": 0, "switch_seconds": 0.0}

    def _set_adapters(self, rows: Sequence[Optional[str]], real: Optional[torch.Tensor] = None) -> None:
        if len(set(rows)) != 1:
            raise RuntimeError(f"a merged batch must hold one adapter, found {sorted(map(str, set(rows)))}")
        if rows[0] != self.current:
            self._switch(rows[0])

    def close(self) -> None:
        """Unmerge the current adapter too: the base weights are as they were given."""
        self._switch(None)
        super().close()

    @torch.inference_mode()
    def _switch(self, aid: Optional[str]) -> None:
        start = time.perf_counter()
        for path, original in self.originals.items():  # unmerge the previous adapter
            self.modules[path].weight.copy_(original)
        if aid is not None:
            for path, (at, bt) in self.store.load(aid).modules().items():
                weight = self.modules[path].weight
                if path not in self.originals:
                    self.originals[path] = weight.detach().clone()
                delta = at @ bt  # [in, out]: the update as x @ delta; nn.Linear stores [out, in], Conv1D [in, out]
                weight.add_((delta.T if isinstance(self.modules[path], torch.nn.Linear) else delta).to(weight))
        self.current = aid
        self.stats["switches"] += 1
        self.stats["switch_seconds"] += time.perf_counter() - start


class MergeSwapEngine(Engine):
    """Admits only requests of the running batch's adapter; the next adapter is the oldest waiting request's."""

    def _admit(self) -> list[Request]:
        if self.running:
            current = self.running[0].aid
        elif self.waiting:
            current = self.waiting[0].aid
        else:
            return []
        others = [r for r in self.waiting if r.aid != current]
        self.waiting = deque(r for r in self.waiting if r.aid == current)
        try:
            return super()._admit()
        finally:
            self.waiting = deque(sorted([*self.waiting, *others], key=lambda r: r.arrival))
