"""Federated LoRA: aggregation strategies (pure maths on AdapterStates) and the Flower binding.

``aggregate(name, states, num_examples)`` is the entry point; ``STRATEGIES`` lists the registered rules.
The Flower apps live in ``lorakit.federated.server_app`` / ``client_app`` (imported only when used, so the
maths needs no Flower install); ``python -m lorakit.federated`` runs the bundled experiment.
"""
from __future__ import annotations

from . import strategies as _strategies  # noqa: F401  (registers the built-in strategies)
from .aggregation import (
    STRATEGIES, Strategy, aggregate, aggregation_error, exact_update, normalised, relative_error, strategy, update_of,
)

__all__ = ["STRATEGIES", "Strategy", "aggregate", "aggregation_error", "exact_update", "normalised", "relative_error", "strategy", "update_of"]
