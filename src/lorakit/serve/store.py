"""Adapter residency below the active pool: names on disk, a host cache of packed adapters, a prefetch thread.

Tiers (S-LoRA's host/device swapping, on one machine): PEFT directories on disk -> the host cache (read with
``lorakit.load_state``, checked against the base model and packed into table layout; LRU under ``host_bytes``) ->
the active pool (``pool.py``). Reading and packing is the slow part, so a background thread does it for the
adapters that queued requests will need, and the step loop only copies packed tensors into the pool.

Every (re)registration of a name gets a new id ``name#version``, so a reloaded adapter never reuses the
previous version's cached tensors. A failed load is remembered with the size and modification time of the
adapter's files: once they change (the file was fixed), the next request loads it again.

Derived adapters (per-request merges, ``combos.py``) have an id and a build function over other adapters' packed
forms instead of a directory: ``load`` loads their components, builds them and caches the result like any other.
"""
from __future__ import annotations

import difflib
import threading
import time
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from ..core.capabilities import CapabilityError
from ..core.state import AdapterState
from ..core.targets import LINEAR_TYPES
from ..formats.peft import CONFIG_NAME, PICKLE_NAME, WEIGHTS_NAME, load_state
from . import moe, truesize
from .devices import host_copy
from .ops import pack_low_rank
from .pool import PackedAdapter


class AdapterFitError(ValueError):
    """An adapter that cannot be served on this base model."""


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(in, out) features of every Linear / Conv1D layer, by module path (quantised layers included)."""
    shapes = {}
    for path, m in model.named_modules():
        if isinstance(m, nn.Linear):  # a 4-bit layer's weight is packed: its shape is not the layer's
            shapes[path] = (m.in_features, m.out_features)
        elif isinstance(m, LINEAR_TYPES):
            shapes[path] = tuple(m.weight.shape)  # Conv1D stores its weight as [in, out]
    return shapes


def _parameter_factors(state: AdapterState, path: str, where: tuple[str, str], params, source: str):
    """(A, B, r, scaling, transposed) of an adapter on a parameter, checked against the parameter's shape."""
    shape, transposed = params[where[0]][where[1]]
    config = state.module_config(path)
    a, b = state.tensors[path]["lora_A.weight"], state.tensors[path]["lora_B.weight"]
    experts = shape[0] if len(shape) == 3 else 1
    out_f, in_f = (shape[2], shape[1]) if transposed else (shape[-2], shape[-1])
    if tuple(a.shape) != (config.r * experts, in_f) or tuple(b.shape) != (out_f, config.r * experts):
        raise AdapterFitError(
            f"{source}: parameter '{where[0]}.{where[1]}' {tuple(shape)}: the adapter's lora_A {tuple(a.shape)} and "
            f"lora_B {tuple(b.shape)} are not rank-{config.r} factors for {experts} expert(s) of {in_f} -> {out_f}. "
            "Was the adapter trained for another base model?")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise AdapterFitError(f"{source}: parameter '{where[0]}.{where[1]}': the adapter's weights contain NaN or inf")
    return a, b, config.r, config.scaling, transposed


def pack_state(state: AdapterState, shapes: dict[str, tuple[int, int]], dtype: torch.dtype, aid: str, source: str,
               true_size: bool = False, shared: Optional[dict] = None, params: Optional[dict] = None) -> PackedAdapter:
    """Check ``state`` against the base model's layers and pack it; errors name the file, module and shapes.
    With ``true_size``, methods of ``truesize.SPECS`` keep their own tensors (``shared`` dedupes frozen ones)."""
    if state.modules_to_save:
        raise AdapterFitError(
            f"{source}: the adapter saves whole modules ({', '.join(list(state.modules_to_save)[:4])}); the server "
            "applies low-rank updates only. Merge it into the base model (lorakit.merge) and serve that instead"
        )
    if state.base_tensors:
        raise AdapterFitError(f"{source}: the adapter trains base-model biases (bias={state.config.bias!r}); merge it instead")
    wanted = list(getattr(state.config, "target_parameters", None) or [])
    targets = {p: moe.locate(p, wanted, params or {}) for p in state.modules() if p not in shapes} if wanted else {}
    parameters = {}
    for path, where in targets.items():  # adapters on parameters (fused MoE experts): served by serve/moe.py
        if where is None:
            raise AdapterFitError(f"{source}: module '{path}' is neither a linear layer nor a targeted parameter "
                                  f"({', '.join(wanted)}) of the base model. Was the adapter trained for another model?")
        parameters[where] = _parameter_factors(state, path, where, params, source)
    spec = truesize.spec_for(state) if true_size else None
    if spec is None and not wanted:  # target_parameters: LoRA, one low-rank pair per expert (checked below)
        try:
            state.require("servable", "serve it")
        except CapabilityError as e:
            raise AdapterFitError(f"{source}: {e}") from None
    modules = {}
    for path in sorted(p for p in state.modules() if p not in targets):
        if any(k.startswith("lora_embedding") for k in state.tensors[path]):
            raise AdapterFitError(f"{source}: module '{path}' is an embedding; the server adapts linear layers only")
        if spec is not None and path in shapes:  # the factors of RandLoRA and SHiRA take the layer's shape
            low_rank = truesize.factors(state, spec, path, state.tensors[path], shapes[path][1], shapes[path][0])
        else:
            low_rank = state.low_rank(path) if spec is None else (None, None, None)
        if low_rank is None:
            raise AdapterFitError(
                f"{source}: method '{state.config.method_name}' is not exactly low-rank on module '{path}'; merge it "
                "into the base model (lorakit.merge) and serve that instead"
            )
        a, b, scale = low_rank
        if path not in shapes:
            near = difflib.get_close_matches(path, list(shapes), n=1)
            hint = f" (closest: '{near[0]}')" if near else ""
            raise AdapterFitError(f"{source}: module '{path}' is not a linear layer of the base model{hint}. Was the adapter trained for another model?")
        d_in, d_out = shapes[path]
        if a.dim() != 2 or a.shape[1] != d_in or b.shape[0] != d_out:
            raise AdapterFitError(
                f"{source}: module '{path}': the adapter maps {a.shape[-1]} -> {b.shape[0]} features, the base layer "
                f"{d_in} -> {d_out}. Was the adapter trained for another base model?"
            )
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterFitError(f"{source}: module '{path}': the adapter's weights contain NaN or inf")
        modules[path] = pack_low_rank(a, b, scale, dtype)
        if not all(torch.isfinite(t).all() for t in modules[path]):
            raise AdapterFitError(f"{source}: module '{path}': the adapter's weights overflow {dtype} once scaled")
    if not modules and not parameters:
        raise AdapterFitError(f"{source}: the adapter adapts no module")
    if parameters:
        return moe.ParameterAdapter(aid, modules, parameters)
    if spec is not None:
        return truesize.TrueSizeAdapter(aid, state, spec, shapes, modules, {} if shared is None else shared)
    return PackedAdapter(aid, modules)


def _signature(path: Path) -> tuple:
    """(name, size, mtime) of the files a load reads: they change when the adapter is fixed or replaced."""
    out = []
    for name in (CONFIG_NAME, WEIGHTS_NAME, PICKLE_NAME):
        try:
            st = (path / name).stat()
            out.append((name, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((name, None, None))
    return tuple(out)


@dataclass(frozen=True)
class AdapterEntry:
    name: str
    path: Path
    version: int

    @property
    def aid(self) -> str:
        return f"{self.name}#{self.version}"


class AdapterStore:
    """Registered adapters, the host cache and the prefetch thread (thread-safe)."""

    def __init__(self, shapes: dict[str, tuple[int, int]], dtype: torch.dtype = torch.float32,
                 host_bytes: int = 4 << 30, prefetch: bool = True, allow_pickle: bool = False,
                 device: torch.device = torch.device("cpu"), true_size: bool = True, params: Optional[dict] = None):
        self.shapes, self.dtype, self.host_budget = shapes, dtype, int(host_bytes)
        self.params = params  # moe.parameter_shapes(model): what adapters on parameters (MoE experts) may target
        self.device = torch.device(device)  # the pool's: host copies are pinned for a CUDA GPU
        self.true_size = true_size  # NOLA, LoRA-XS, ... from their own tensors (truesize.py), not as LoRA
        self.shared: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # frozen tensors, one per content
        self.allow_pickle = allow_pickle
        self.entries: dict[str, AdapterEntry] = {}
        self.by_aid: dict[str, AdapterEntry] = {}
        self.host: OrderedDict[str, PackedAdapter] = OrderedDict()
        self.failures: dict[str, tuple[str, tuple]] = {}  # aid -> (message, the files' signature then)
        self.derived: dict[str, tuple[list[str], Callable]] = {}  # aid -> (component aids, build(packed components))
        self.stats = {"loads": 0, "load_seconds": 0.0, "failures": 0, "host_hits": 0, "host_evictions": 0}
        self._version = 0
        self._lock = threading.Lock()
        self.loaded = threading.Condition(self._lock)  # notified when a load finishes
        self._queue: deque[str] = deque()
        self._queued: set[str] = set()
        self._closed = False
        self._thread = None
        if prefetch:
            self._thread = threading.Thread(target=self._prefetch_loop, name="lorakit-adapter-prefetch", daemon=True)
            self._thread.start()

    # -- registry -----------------------------------------------------------------------------------
    def register(self, name: str, path, check: bool = False) -> AdapterEntry:
        """Serve the adapter at ``path`` as ``name``; with ``check`` it is loaded first, and a failure (raised)
        leaves the name as it was."""
        with self._lock:
            self._version += 1
            entry = AdapterEntry(name, Path(path), self._version)
            self.by_aid[entry.aid] = entry
        if check:
            self.load(entry.aid)
        with self._lock:
            self.entries[name] = entry
        return entry

    def unregister(self, name: str) -> Optional[AdapterEntry]:
        with self._lock:
            entry = self.entries.pop(name, None)
            if entry is not None:
                self.host.pop(entry.aid, None)
            return entry

    def scan(self, directory) -> list[str]:
        """Register every sub-directory of ``directory`` that holds an adapter, under its folder name."""
        root = Path(directory)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no such adapter directory")
        found = sorted(p for p in root.iterdir() if (p / CONFIG_NAME).is_file())
        for p in found:
            self.register(p.name, p)
        return [p.name for p in found]

    def derive(self, aid: str, components: Sequence[str], build: Callable[[list[PackedAdapter]], PackedAdapter]) -> None:
        """Make ``aid`` loadable as ``build([packed component, ...])`` (components: registered adapter ids)."""
        with self._lock:
            self.derived[aid] = (list(components), build)

    def forget(self, aid: str) -> None:
        """Drop a derived adapter: its build, its cached form and its failure."""
        with self._lock:
            self.derived.pop(aid, None)
            self.host.pop(aid, None)
            self.failures.pop(aid, None)

    def known(self, aid: str) -> bool:
        return aid in self.by_aid or aid in self.derived

    def _signature(self, aid: str) -> tuple:
        derived = self.derived.get(aid)
        if derived is not None:
            return tuple(self._signature(c) for c in derived[0])
        return _signature(self.by_aid[aid].path)

    def entry(self, name: str) -> Optional[AdapterEntry]:
        return self.entries.get(name)

    def names(self) -> list[str]:
        return sorted(self.entries)

    # -- host tier ----------------------------------------------------------------------------------
    @property
    def host_bytes(self) -> int:
        return sum(p.nbytes for p in list(self.host.values()))  # list(): read from other threads (metrics)

    def cached(self, aid: str) -> Optional[PackedAdapter]:
        with self._lock:
            packed = self.host.get(aid)
            if packed is not None:
                self.host.move_to_end(aid)
                self.stats["host_hits"] += 1
            return packed

    def failure(self, aid: str) -> Optional[str]:
        """Why ``aid`` failed to load, unless its files changed since (then it may be loaded again)."""
        failed = self.failures.get(aid)
        if failed is None:
            return None
        if self.known(aid) and self._signature(aid) != failed[1]:
            with self._lock:
                self.failures.pop(aid, None)
            return None
        return failed[0]

    def load(self, aid: str) -> PackedAdapter:
        """Read, check and pack ``aid`` into the host cache now (raises with a clear message on failure)."""
        entry, derived = self.by_aid.get(aid), self.derived.get(aid)
        if entry is None and derived is None:
            raise KeyError(f"unknown adapter id '{aid}'")
        cached = self.cached(aid)
        if cached is not None:
            return cached
        start = time.perf_counter()
        signature = self._signature(aid)
        try:
            if derived is not None:
                packed = derived[1]([self.load(c) for c in derived[0]])
            else:
                state = load_state(entry.path, allow_pickle=self.allow_pickle)
                packed = pack_state(state, self.shapes, self.dtype, aid, str(entry.path), self.true_size, self.shared,
                                    self.params)
        except Exception as e:
            message = f"merged adapter cannot be built: {e}" if derived else f"adapter '{entry.name}' cannot be loaded: {e}"
            with self._lock:
                self.failures[aid] = (message, signature)
                self.stats["failures"] += 1
                self.loaded.notify_all()
            raise AdapterFitError(message) from None
        packed.blob = host_copy(packed.blob, self.device)  # pinned for a CUDA pool: asynchronous copies in
        with self._lock:
            self.stats["loads"] += 1
            self.stats["load_seconds"] += time.perf_counter() - start
            while self.host and self.host_bytes + packed.nbytes > self.host_budget:
                self.host.popitem(last=False)  # least recently used first
                self.stats["host_evictions"] += 1
            self.host[aid] = packed
            self.loaded.notify_all()
        return packed

    def want(self, aids: Iterable[str]) -> None:
        """Queue ``aids`` for the prefetch thread (those not cached, failed or queued already)."""
        with self._lock:
            for aid in aids:
                if aid not in self.host and aid not in self._queued and self.known(aid) and not (
                        aid in self.failures and self._failed_unchanged(aid)):
                    self._queue.append(aid)
                    self._queued.add(aid)
            if self._queue:
                self.loaded.notify_all()

    def _failed_unchanged(self, aid: str) -> bool:  # under the lock
        if self._signature(aid) == self.failures[aid][1]:
            return True
        del self.failures[aid]
        return False

    def pending(self, aid: str) -> bool:
        return aid in self._queued

    def _prefetch_loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self.loaded.wait()
                if self._closed:
                    return
                aid = self._queue.popleft()
            try:
                self.load(aid)
            except Exception:  # recorded in self.failures; the requests waiting for it fail with that message
                pass
            finally:
                with self._lock:
                    self._queued.discard(aid)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self.loaded.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
