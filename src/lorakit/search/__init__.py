"""Adapter-ensemble search (NEAS-style): a weight-sharing super-adapter, diversity-guided shrinking, evolution."""
from __future__ import annotations

from .evolve import Result, best_single, evolve, random_search, shrink
from .space import BudgetError, Ensemble, Member, Space, build_space

__all__ = ["BudgetError", "Ensemble", "Member", "Result", "Space", "best_single", "build_space", "evolve",
           "random_search", "shrink"]
