"""Reading example records from local files: JSONL / JSON, CSV, and `datasets.save_to_disk` directories."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}
FILE_SUFFIXES = (".jsonl", ".json", ".csv")


def decode_lines(raw: bytes) -> str:
    """Decode line by line as UTF-8, falling back to latin-1 for lines that are not valid UTF-8."""
    lines = []
    for line in raw.split(b"\n"):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append(line.decode("latin-1"))
    return "\n".join(lines)


def read_file(path: Path) -> list[dict]:
    """The records of one JSONL, JSON (array or lines) or CSV file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; give a .jsonl, .json or .csv file or a dataset directory")
    text = decode_lines(path.read_bytes()).lstrip("\ufeff")
    if not text.strip():
        raise ValueError(f"{path} is empty; it needs at least one example")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        records = list(csv.DictReader(io.StringIO(text, newline="")))
    elif suffix == ".json" and text.lstrip().startswith("["):
        records = json.loads(text)
    elif suffix in (".jsonl", ".json"):
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg})") from None
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; expected one of {', '.join(FILE_SUFFIXES)}")
    if not records:
        raise ValueError(f"{path} has a header but no examples")
    return records


def _split_file(directory: Path, split: str) -> Path | None:
    for alias in SPLIT_ALIASES[split]:
        for suffix in FILE_SUFFIXES:
            if (directory / f"{alias}{suffix}").is_file():
                return directory / f"{alias}{suffix}"
    return None


def _read_saved_dataset(directory: Path) -> dict[str, list[dict]]:
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{directory} was written by `datasets.save_to_disk`; `pip install datasets` to read it") from None
    loaded = datasets.load_from_disk(str(directory))
    if isinstance(loaded, datasets.Dataset):
        return {"train": loaded.to_list()}
    found = {}
    for split, aliases in SPLIT_ALIASES.items():
        name = next((a for a in aliases if a in loaded), None)
        if name is not None:
            found[split] = loaded[name].to_list()
    if "train" not in found:
        raise ValueError(f"{directory}: no train split; found splits {sorted(loaded)}")
    return found


def read_splits(path: str | Path) -> dict[str, list[dict]]:
    """Records by split ('train' and, when present, 'validation' / 'test') from a file or directory."""
    path = Path(path)
    if path.is_file():
        return {"train": read_file(path)}
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path}: no such file or directory; give a .jsonl/.json/.csv file, a directory with "
            "train/validation/test files, or a `datasets.save_to_disk` directory"
        )
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return _read_saved_dataset(path)
    files = {split: _split_file(path, split) for split in SPLIT_ALIASES}
    if files["train"] is None:
        raise FileNotFoundError(
            f"{path}: no train file (train.jsonl, train.json or train.csv) and not a `datasets.save_to_disk` directory; "
            f"found {sorted(p.name for p in path.iterdir())}"
        )
    return {split: read_file(file) for split, file in files.items() if file is not None}
