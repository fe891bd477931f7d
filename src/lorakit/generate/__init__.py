"""Adapters from adapters: a task zoo, and generators that make an adapter for a new task without training on it.

``GENERATORS`` holds the registered generators (``sg_lora``, ``icm_lora``); each is fitted on a zoo's expert adapters
and writes an ordinary PEFT directory.
"""
from ..core.registry import Registry

GENERATORS = Registry("generator")

from . import icm_lora, sg_lora  # noqa: E402,F401  (register the generators)

__all__ = ["GENERATORS"]
