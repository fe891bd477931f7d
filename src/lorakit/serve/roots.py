"""Where adapters may be loaded from over HTTP: directories under the operator's roots, and nowhere else.

A ``lora_path`` is accepted when it names a directory under one of the roots (relative paths are taken under the
first root) that holds ``adapter_config.json``: no ``..`` component, no absolute path elsewhere, and neither the
directory nor the adapter files in it may resolve (through symlinks) outside the root. Every refusal gives the
same message, so a client learns nothing about paths outside the roots, not even whether they exist. Messages
sent to clients have the roots' server paths replaced by paths relative to them (``redact``).
"""
from __future__ import annotations

import os
from pathlib import Path, PurePath
from typing import Iterable

from ..formats.peft import CONFIG_NAME, PICKLE_NAME, WEIGHTS_NAME


class PathRefused(ValueError):
    """A ``lora_path`` that is not an adapter directory under the roots (one message for every reason)."""


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class AdapterRoots:
    """The directories adapters may be loaded from."""

    def __init__(self, roots: Iterable):
        self.given = [os.path.abspath(str(r)) for r in roots]
        self.real = [os.path.realpath(r) for r in self.given]

    def __bool__(self) -> bool:
        return bool(self.real)

    def resolve(self, lora_path: str) -> Path:
        """The real directory ``lora_path`` names; raises ``PathRefused`` unless it is an adapter under a root."""
        refused = PathRefused(f"lora_path '{lora_path}' is not an adapter directory under this server's adapter "
                              "roots; ask its operator where adapters go")
        if not self.real or not lora_path or "\x00" in lora_path or ".." in PurePath(lora_path.replace("\\", "/")).parts:
            raise refused
        candidate = lora_path if os.path.isabs(lora_path) else os.path.join(self.given[0], lora_path)
        lexical = os.path.normpath(candidate)
        if not any(_inside(lexical, r) for r in self.given + self.real):
            raise refused  # an absolute path elsewhere: not even looked at
        real = os.path.realpath(lexical)
        root = next((r for r in self.real if _inside(real, r)), None)
        if root is None or real == root or not os.path.isdir(real) or not os.path.isfile(os.path.join(real, CONFIG_NAME)):
            raise refused
        for name in (CONFIG_NAME, WEIGHTS_NAME, PICKLE_NAME):  # the files the store will read
            f = os.path.join(real, name)
            if os.path.lexists(f) and not _inside(os.path.realpath(f), root):
                raise refused
        return Path(real)

    def redact(self, message: str) -> str:
        """``message`` with each root's server path removed (paths under it become relative)."""
        for r in sorted(set(self.given + self.real), key=len, reverse=True):
            message = message.replace(r.rstrip(os.sep) + os.sep, "").replace(r, ".")
        return message
