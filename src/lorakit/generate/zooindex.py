"""A task zoo on disk: one plain PEFT directory per task plus ``index.json`` (name, description, split, metrics).

Layout: ``<root>/index.json`` and ``<root>/<task>/adapter`` (the final adapter, its head as ``modules_to_save``)
with ``<root>/<task>/snapshots/step-<n>`` (earlier states of the same run, ICM-LoRA's extra training points).
The index records the base model's name and ``fingerprint`` (of its backbone, ``model.base_model``, so heads of any
size match), the LoRA settings and each task's entry. ``lorakit.library`` can import these directories as they are.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..core import fingerprint
from ..core.state import AdapterState
from ..formats.peft import load_state

INDEX = "index.json"


class ZooError(ValueError):
    """A zoo that is missing, malformed or made for another base model."""


def backbone_fingerprint(model) -> str:
    """The fingerprint of ``model``'s backbone (``model.base_model``): heads and adapters left out."""
    return fingerprint.record(getattr(model, "base_model", model))["fingerprint"]


def write_json(path: Path, data) -> None:
    """Write JSON atomically (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


@dataclass
class Zoo:
    """A zoo read from its index: the tasks' entries and where their adapters are."""

    root: Path
    index: dict

    @classmethod
    def open(cls, root) -> Zoo:
        """Read ``<root>/index.json``; a ZooError names the file when it is missing or malformed."""
        root = Path(root)
        file = root / INDEX
        if not file.is_file():
            raise ZooError(f"{file}: no zoo index here; build one with `make zoo` (or lorakit.generate.taskzoo)")
        try:
            index = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ZooError(f"{file}: not valid JSON (line {e.lineno}: {e.msg})") from None
        missing = {"base", "fingerprint", "tasks"} - set(index) if isinstance(index, dict) else {"an object"}
        if missing:
            raise ZooError(f"{file}: not a zoo index (missing {sorted(missing)})")
        return cls(root, index)

    def entries(self, split: str | None = None) -> list[dict]:
        """Task entries, all or those of one split ("expert" or "heldout")."""
        return [t for t in self.index["tasks"] if split is None or t["split"] == split]

    def entry(self, name: str) -> dict:
        """The entry of task ``name``."""
        for t in self.index["tasks"]:
            if t["name"] == name:
                return t
        raise ZooError(f"{self.root / INDEX}: no task {name!r}; tasks: {', '.join(t['name'] for t in self.entries())}")

    def state(self, name: str, snapshot: str | None = None, with_head: bool = False) -> AdapterState:
        """A task's adapter (or one of its snapshots), without its head unless ``with_head``."""
        entry = self.entry(name)
        state = load_state(self.root / (snapshot or entry["path"]))
        if with_head:
            return state
        return AdapterState(dataclasses.replace(state.config, modules_to_save=None), state.tensors)

    def check_base(self, model) -> None:
        """Refuse a model whose backbone is not the zoo's base, naming both fingerprints."""
        ours = backbone_fingerprint(model)
        if ours != self.index["fingerprint"]:
            name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
            raise ZooError(
                f"{self.root / INDEX}: the zoo was built on {self.index['base']} (backbone fingerprint "
                f"{self.index['fingerprint']}), but the model {name} has fingerprint {ours}; use the zoo's base model "
                "or a zoo built on this one")
