"""Adapter libraries: a folder of PEFT adapters with a manifest, and retrieval by description or by weights.

``Library(path)`` adds, lists, removes and resolves entries (``store.py``, ``manifest.py``); ``Library.search``
finds entries for a text query by their descriptions (MiniLM, ``text.py``) or by their weights (described
weight-neighbours, ``neighbours.py``, or AutoLoRA's learned encoder, ``weights.py``); ``lorakit library ...``
is the command (``cli.py``).
"""
from .manifest import Entry, LibraryError
from .store import Library
from .weights import EncoderConfig

__all__ = ["EncoderConfig", "Entry", "Library", "LibraryError"]
