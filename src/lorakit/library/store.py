"""``Library``: a folder of PEFT adapter directories (``adapters/<name>-<token>/``) and its ``manifest.json``.

Writes never leave a half-written library. ``add`` copies the adapter into a fresh staging folder, renames it
to a folder no manifest names yet, then replaces the manifest atomically (the commit point); only after that is
an overwritten entry's old folder deleted. A crash before the commit leaves the old manifest, which names only
complete folders; leftovers (staging folders, folders no manifest names) are ignored when reading and removed
by the next write. Writers take an exclusive lock on ``.lock``, so two processes cannot lose each other's
entries. Every entry records the fingerprint of its base model (``core.fingerprint``, from the
``lorakit_base.json`` that ``save_peft`` and ``lorakit train`` write); ``path_of(name, base=model)`` refuses an
entry made for another base, naming both fingerprints. An entry's fingerprint leaves out the parameters the
adapter brings in full (``modules_to_save``, e.g. a classification head): adapters of one base model with heads
of different sizes share it, and are compared (retrieval) and checked as adapters of one base.
"""
from __future__ import annotations

import contextlib
import difflib
import fcntl
import hashlib
import json
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from torch import nn

from ..core import fingerprint
from ..formats.peft import BASE_NAME, CONFIG_NAME, PICKLE_NAME, WEIGHTS_NAME, base_problem, load_state, read_base
from . import manifest
from .manifest import Entry, LibraryError

ADAPTERS, STAGING, LOCK = "adapters", ".staging-", ".lock"


def weights_digest(folder: Path) -> str:
    """SHA-256 of an adapter directory's weights file (what caches compare to see that an entry changed)."""
    file = folder / WEIGHTS_NAME if (folder / WEIGHTS_NAME).is_file() else folder / PICKLE_NAME
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Library:
    """A folder of adapters with a manifest: add, list, get, remove, path_of, search."""

    def __init__(self, path):
        self.root = Path(path)
        if self.root.exists() and not self.root.is_dir():
            raise LibraryError(f"{self.root}: is a file, not a library directory")

    # -- reading -----------------------------------------------------------------------------------------
    def _entries(self) -> dict[str, Entry]:
        if not self.root.exists():
            raise LibraryError(f"{self.root}: no such library (adding an adapter creates one)")
        if self.root.is_dir() and not (self.root / manifest.MANIFEST).is_file():
            stray = sorted(p.name for p in self.root.iterdir() if not p.name.startswith(".") and p.name != ADAPTERS)
            if stray:
                raise LibraryError(f"{self.root}: holds {', '.join(stray[:3])} but no {manifest.MANIFEST}: not a "
                                   "lorakit library; give an empty or new directory")
        return manifest.read(self.root)

    def list(self) -> list[Entry]:
        """Every entry, by name."""
        return [e for _, e in sorted(self._entries().items())]

    def names(self) -> list[str]:
        return sorted(self._entries())

    def get(self, name: str) -> Entry:
        """The entry called ``name`` (LibraryError naming close names when there is none)."""
        entries = self._entries()
        if name not in entries:
            near = difflib.get_close_matches(name, list(entries), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else (f"; entries: {', '.join(sorted(entries)[:8])}"
                                                                 if entries else " (the library is empty)")
            raise LibraryError(f"no entry {name!r} in the library {self.root}{hint}")
        return entries[name]

    def path_of(self, name: str, base=None) -> Path:
        """The adapter directory of ``name``; with ``base`` (a model, a base record or a fingerprint) it must be
        the base the entry was made for."""
        entry = self.get(name)
        folder = self.root / ADAPTERS / entry.folder
        if not (folder / CONFIG_NAME).is_file():
            raise LibraryError(f"{self.root / manifest.MANIFEST}: entry {name!r} names {folder}, which holds no "
                               f"{CONFIG_NAME}; remove the entry and add the adapter again")
        if base is not None:
            self.check_base(entry, folder, base)
        return folder

    def check_base(self, entry: Entry, folder: Path, base) -> None:
        """Refuse ``entry`` unless ``base`` (model, record or fingerprint) is the base it records."""
        where = f"library entry {entry.name!r} ({self.root})"
        if isinstance(base, nn.Module):
            problem = base_problem(base, read_base(folder), entry.base.get("model"), where,
                                   frozenset(entry.base.get("replaced", ())))
            if problem is not None:
                raise LibraryError(problem[1])
            return
        ours = base.get("fingerprint") if isinstance(base, dict) else str(base)
        if ours != entry.fingerprint:
            raise LibraryError(f"{where}: made for base model {entry.base.get('model') or entry.base.get('architecture')}"
                               f" (fingerprint {entry.fingerprint}), but the base in use has fingerprint {ours}")

    # -- writing -----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self):
        """Exclusive access for one read-modify-write; leftovers of crashed writers are cleared first."""
        if self.root.exists():
            self._entries()  # refuse a directory that is not a library before creating anything in it
        (self.root / ADAPTERS).mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                entries = self._entries()
                self._collect(entries)
                yield entries
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _collect(self, entries: dict[str, Entry]) -> None:
        """Delete staging folders and adapter folders the manifest does not name (left by a crash)."""
        named = {e.folder for e in entries.values()}
        for p in (self.root / ADAPTERS).iterdir():
            if p.name not in named:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def add(self, adapter_dir, name: Optional[str] = None, description: str = "", tags: Sequence[str] = (),
            metrics: Optional[dict] = None, overwrite: bool = False, base: Optional[nn.Module] = None,
            command: Optional[str] = None, allow_pickle: bool = False) -> Entry:
        """Copy the adapter at ``adapter_dir`` in as ``name`` (default: its folder name) and return its entry.

        ``base``: the model the adapter was made for, needed when the adapter records none (no
        ``lorakit_base.json``, e.g. made by peft) and checked against the record when it does."""
        source = Path(adapter_dir)
        if not (source / CONFIG_NAME).is_file():
            raise LibraryError(f"{source}: not an adapter directory (no {CONFIG_NAME})")
        name = manifest.check_name(source.resolve().name if name is None else name)
        state = load_state(source, allow_pickle=allow_pickle)  # a file lorakit cannot read is refused here
        record = read_base(source)
        if record is None and base is None:
            raise LibraryError(f"{source}: records no base model ({BASE_NAME} is missing); pass the base model "
                               "(base=model, or --model NAME) so that its fingerprint can be recorded")
        if record is not None and base is not None:
            problem = base_problem(base, record, state.config.base_model_name_or_path, str(source), replaced(state))
            if problem is not None:
                raise LibraryError(problem[1])
        record = record or fingerprint.record(base)
        shared = fingerprint.without(record, replaced(state))
        with self._locked() as entries:
            if name in entries and not overwrite:
                raise LibraryError(f"entry {name!r} already exists in {self.root}; pass overwrite=True "
                                   "(--overwrite) to replace it, or choose another name")
            folder = self._stage(source, name, record)
            entry = Entry(name=name, folder=folder.name, method=state.config.method_name, description=description,
                          base={"fingerprint": shared["fingerprint"], "architecture": record["architecture"],
                                "model": state.config.base_model_name_or_path, "replaced": sorted(replaced(state))},
                          metrics=dict(metrics or {}), tags=tuple(tags), sha256=weights_digest(folder),
                          provenance={"source": str(source.resolve()), "command": command,
                                      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            old = entries.get(name)
            manifest.write(self.root, {**entries, name: entry})  # the commit point
            if old is not None:
                shutil.rmtree(self.root / ADAPTERS / old.folder, ignore_errors=True)
        return entry

    def _stage(self, source: Path, name: str, record: dict) -> Path:
        """A complete copy of ``source`` in a folder under adapters/ that no manifest names yet."""
        tmp = Path(tempfile.mkdtemp(prefix=STAGING, dir=self.root / ADAPTERS))
        try:
            copy_adapter(source, tmp)
            if not (tmp / BASE_NAME).is_file():
                (tmp / BASE_NAME).write_text(json.dumps(record) + "\n")
            folder = self.root / ADAPTERS / f"{name}-{secrets.token_hex(4)}"
            tmp.rename(folder)
            return folder
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def remove(self, name: str) -> Entry:
        """Delete an entry (the manifest first, then its folder) and return it."""
        with self._locked() as entries:
            entry = entries.get(name) or self.get(name)
            manifest.write(self.root, {n: e for n, e in entries.items() if n != name})
            shutil.rmtree(self.root / ADAPTERS / entry.folder, ignore_errors=True)
        return entry

    def search(self, query: str, k: int = 5, by: str = "description", **options) -> list[tuple[Entry, float]]:
        """The ``k`` entries closest to the text ``query``, with their cosine scores (see ``retrieval``)."""
        from .retrieval import search

        return search(self, query, k, by, **options)


def replaced(state) -> set[str]:
    """Base parameters the adapter brings in full (``modules_to_save``, e.g. a classification head): left out of an
    entry's fingerprint, so that adapters of one base with heads of different sizes share a fingerprint."""
    return {f"{path}.{k}" for path, tensors in state.modules_to_save.items() for k in tensors}


def copy_adapter(source: Path, target: Path) -> None:
    """Copy an adapter directory's files (sub-folders too: other adapters of a multi-adapter directory)."""
    shutil.copytree(source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".*"))
