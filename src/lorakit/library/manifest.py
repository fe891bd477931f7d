"""A library's manifest (``manifest.json``): one entry per adapter, read with checks and written atomically.

The file is ``{"format": "lorakit-library", "version": 1, "entries": {name: entry}}``; an entry holds ``name``,
``folder`` (its adapter directory under ``adapters/``), ``base`` (``fingerprint``, ``architecture``, ``model``,
``replaced``: the digest of the base model's record from ``core.fingerprint`` without the parameters the adapter
brings in full, its class, its recorded name, and those parameters' names), ``method``,
``description``, ``metrics``, ``tags``, ``provenance`` (``source``, ``command``, ``created``) and ``sha256``
(of the adapter's weights file, so that caches know when an entry changed). A manifest that is not valid JSON
or misses a field is an error naming the file, the entry and the field.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

FORMAT, VERSION = "lorakit-library", 1
MANIFEST = "manifest.json"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class LibraryError(ValueError):
    """A library that cannot be read or changed as asked (the message names the file or entry)."""


@dataclass(frozen=True)
class Entry:
    """One adapter of a library, as its manifest records it."""

    name: str
    folder: str
    base: dict
    method: str
    description: str = ""
    metrics: dict = field(default_factory=dict)
    tags: tuple = ()
    provenance: dict = field(default_factory=dict)
    sha256: str = ""

    @property
    def fingerprint(self) -> Optional[str]:
        """The digest of the base model the adapter was made for."""
        return self.base.get("fingerprint")

    def to_json(self) -> dict:
        return {**asdict(self), "tags": list(self.tags)}


# field -> (JSON types accepted, required)
FIELDS = {"name": (str, True), "folder": (str, True), "base": (dict, True), "method": (str, True),
          "description": (str, False), "metrics": (dict, False), "tags": (list, False), "provenance": (dict, False),
          "sha256": (str, False)}


def check_name(name: str) -> str:
    """``name`` if it can name an entry (letters, digits, '.', '_', '-'; at most 128), else LibraryError."""
    if not isinstance(name, str) or not NAME.match(name):
        raise LibraryError(f"entry name {name!r}: use letters, digits, '.', '_' and '-' (starting with a letter or "
                           "digit, at most 128 characters)")
    return name


def _entry(file: Path, key: str, data) -> Entry:
    where = f"{file}: entry {key!r}"
    if not isinstance(data, dict):
        raise LibraryError(f"{where}: expected an object, found {type(data).__name__}")
    for name, (kind, required) in FIELDS.items():
        if name not in data:
            if required:
                raise LibraryError(f"{where}: missing field {name!r}")
        elif not isinstance(data[name], kind):
            raise LibraryError(f"{where}: field {name!r} should be a {kind.__name__}, found {type(data[name]).__name__}")
    if data["name"] != key:
        raise LibraryError(f"{where}: its name field says {data['name']!r}")
    folder = Path(data["folder"])
    if folder.is_absolute() or ".." in folder.parts or not data["folder"]:
        raise LibraryError(f"{where}: folder {data['folder']!r} is not a path inside the library")
    known = {k: v for k, v in data.items() if k in FIELDS}
    return Entry(**{**known, "tags": tuple(data.get("tags", ()))})


def read(root: Path) -> dict[str, Entry]:
    """The entries of the library at ``root`` by name ({} when it has no manifest yet)."""
    file = root / MANIFEST
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f"line {e.lineno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else "not UTF-8 text"
        raise LibraryError(f"{file}: not valid JSON ({where}); restore it from a copy or rebuild the library") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise LibraryError(f"{file}: not a lorakit library manifest (expected \"format\": \"{FORMAT}\")")
    if data.get("version") != VERSION:
        raise LibraryError(f"{file}: manifest version {data.get('version')!r}, this lorakit reads version {VERSION}")
    if not isinstance(data.get("entries"), dict):
        raise LibraryError(f"{file}: \"entries\" should be an object of entries by name")
    return {key: _entry(file, key, value) for key, value in data["entries"].items()}


def write(root: Path, entries: dict[str, Entry]) -> None:
    """Replace the manifest atomically: written to a temporary file, flushed, then renamed over the old one."""
    body = {"format": FORMAT, "version": VERSION, "entries": {n: entries[n].to_json() for n in sorted(entries)}}
    fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST}.", dir=root)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(body, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, root / MANIFEST)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
