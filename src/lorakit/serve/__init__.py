"""Multi-adapter serving: a batched LoRA operator, tiered adapter residency, continuous batching, an OpenAI API."""
from __future__ import annotations

from .engine import Engine, EngineConfig, EngineError, QueueFull, Request, Stopped, UnknownAdapter
from .pool import AdapterPool, PackedAdapter, PoolFull
from .sampling import SamplingParams
from .store import AdapterFitError, AdapterStore

__all__ = [
    "AdapterFitError", "AdapterPool", "AdapterStore", "Engine", "EngineConfig", "EngineError", "PackedAdapter",
    "PoolFull", "QueueFull", "Request", "SamplingParams", "Stopped", "UnknownAdapter",
]
