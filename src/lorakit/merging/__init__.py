"""Merging: pure functions that combine several adapters (AdapterStates) into one ordinary LoRA adapter.

``combine(states, method, weights=None, **knobs)`` is the entry point; ``MERGERS`` lists the methods (linear,
task_arithmetic, cat, svd, ties, dare_linear, dare_ties, magnitude_prune, knots, lego). See docs/merging.md for
what each computes, its knobs, and where it differs from PEFT's ``add_weighted_adapter``.

Why the package is ``lorakit.merging`` and not ``lorakit.merge``: ``lorakit/__init__.py`` binds the name
``lorakit.merge`` to the function that folds an adapter into its model. Importing a subpackage ``lorakit.merge``
would make Python set the attribute ``merge`` of the ``lorakit`` package to that subpackage (the import system
binds every imported submodule on its parent), silently replacing the function for every caller. A distinct name
keeps both.
"""
from __future__ import annotations

from . import linear, task_vectors, knots, lego  # noqa: F401,I001  (register the mergers, in this order)
from .cli import cli_main
from .combine import combine
from .protocol import MERGERS, MergeError, Merger, Part

__all__ = ["MERGERS", "MergeError", "Merger", "Part", "cli_main", "combine"]
