"""Output paths of commands: refuse to overwrite inputs or earlier results, and write results whole or not at all.

``check_output(out, inputs, overwrite)`` raises ``OutputError`` before anything is written when ``out`` lies
under a file, names or contains an input (or lies inside one), or already exists without ``overwrite``.
``staged(out)`` yields a fresh directory beside ``out`` (same filesystem); when the block succeeds it takes
``out``'s place by renames (an old ``out`` is removed only after the new one is in place), when it fails it is
removed with any parent folders it created, so a failed command leaves the disk as it found it.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path


class OutputError(ValueError):
    """An output path that would lose or overwrite something."""


def file_above(path: Path) -> Path | None:
    """The first existing file among ``path``'s parents (a directory cannot be made under it), or None."""
    return next((p for p in path.parents if p.exists() and not p.is_dir()), None)


def check_output(out: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False,
                 flag: str = "-o") -> Path:
    """``out`` resolved, or OutputError naming what it would lose; writes nothing."""
    target = Path(out).resolve()
    above = file_above(target)
    if above is not None:
        raise OutputError(f"{flag} {out}: {above} is a file, so no directory can be made under it")
    for given in inputs:
        source = Path(given).resolve()
        if target == source or source in target.parents or target in source.parents:
            raise OutputError(f"{flag} {out} would overwrite the input {given}; choose another output path")
    if target.exists() and not overwrite and (not target.is_dir() or any(target.iterdir())):
        raise OutputError(f"{flag} {out} already exists; pass --overwrite to replace it, or choose another path")
    return target


@contextlib.contextmanager
def staged(out: str | os.PathLike) -> Iterator[Path]:
    """A temporary directory that replaces ``out`` when the block succeeds (see the module docstring)."""
    target = Path(out).resolve()
    created = [p for p in target.parents if not p.exists()]  # deepest first
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
