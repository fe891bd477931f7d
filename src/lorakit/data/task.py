"""`Task`: train / validation / test examples in one of two kinds, and `load_task` to build one.

Examples are normalised to `{"text", "label"}` (label an int id) for classification and to
`{"prompt", "completion"}` for causal LM. String labels become ids in sorted order, so the mapping does
not depend on which rows come first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .encode import EncodedDataset, encode
from .records import read_splits
from .splits import carve, subsample

KINDS = ("classification", "causal_lm")


@dataclass(frozen=True)
class Task:
    """Examples by split, with the label names for classification (None for causal LM)."""

    kind: str
    train: list[dict]
    validation: list[dict]
    test: list[dict]
    label_names: tuple[str, ...] | None = None
    source: str = ""

    @property
    def num_labels(self) -> int | None:
        """How many classes, or None for causal LM."""
        return None if self.label_names is None else len(self.label_names)

    def encode(self, tokenizer, max_length: int = 128) -> dict[str, EncodedDataset]:
        """Tokenised splits, ready for `lorakit.train.fit` (each carries its padding collate)."""
        return {
            split: encode(getattr(self, split), tokenizer, kind=self.kind, max_length=max_length)
            for split in ("train", "validation", "test")
        }

    def subsampled(self, max_train: int | None = None, max_eval: int | None = None, seed: int = 0) -> Task:
        """A copy with at most max_train training and max_eval validation / test examples (seeded, stratified)."""
        key = "label" if self.kind == "classification" else None
        return Task(
            kind=self.kind,
            train=subsample(self.train, max_train, seed, key),
            validation=subsample(self.validation, max_eval, seed, key),
            test=subsample(self.test, max_eval, seed, key),
            label_names=self.label_names,
            source=self.source,
        )


def _column(record: dict, column: str, where: str, argument: str):
    if column not in record:
        raise ValueError(f"{where}: no column {column!r}; found columns {sorted(record)}; pass {argument}= to pick one")
    return record[column]


def _label_ids(raw: list, label_names: tuple[str, ...] | None, where: str) -> tuple[list[int], tuple[str, ...]]:
    is_int = all(isinstance(v, int) and not isinstance(v, bool) for v in raw)
    if not is_int and all(isinstance(v, str) and v.strip().lstrip("-").isdigit() for v in raw) and label_names is None:
        raw, is_int = [int(v) for v in raw], True
    if is_int:
        names = label_names or tuple(str(i) for i in range(max(raw) + 1))
        bad = sorted({v for v in raw if not 0 <= v < len(names)})
        if bad:
            raise ValueError(f"{where}: label ids {bad[:5]} outside 0..{len(names) - 1} (label_names={list(names)})")
        return list(raw), tuple(names)
    names = label_names or tuple(sorted({str(v) for v in raw}))
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted({str(v) for v in raw} - set(index))
    if unknown:
        raise ValueError(f"{where}: labels {unknown[:5]} are not in label_names {list(names)}")
    return [index[str(v)] for v in raw], tuple(names)


def from_records(
    splits: dict[str, list[dict]],
    kind: str = "classification",
    *,
    text_column: str = "text",
    label_column: str = "label",
    prompt_column: str = "prompt",
    completion_column: str = "completion",
    label_names: tuple[str, ...] | list[str] | None = None,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    source: str = "",
) -> Task:
    """A Task from raw records by split; missing validation / test splits are carved from train (seeded)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    splits = dict(splits)
    missing = [s for s in ("test", "validation") if not splits.get(s)]
    fractions = {"test": test_fraction, "validation": validation_fraction}
    if missing:
        *carved, splits["train"] = carve(splits["train"], [fractions[s] for s in missing], seed)
        splits.update(zip(missing, carved))
    where = source or "records"
    if kind == "causal_lm" and any("messages" in r for records in splits.values() for r in records[:1]):
        from .chat import check_messages

        normal = {split: [{"messages": check_messages(r, f"{where} ({split})", i)} for i, r in enumerate(records)]
                  for split, records in splits.items()}
        return Task(kind, normal["train"], normal["validation"], normal["test"], None, source)
    if kind == "causal_lm":
        normal = {
            split: [
                {
                    "prompt": str(_column(r, prompt_column, where, "prompt_column") or ""),
                    "completion": str(_column(r, completion_column, where, "completion_column")),
                }
                for r in records
            ]
            for split, records in splits.items()
        }
        return Task(kind, normal["train"], normal["validation"], normal["test"], None, source)
    order = ("train", "validation", "test")
    texts = {s: [str(_column(r, text_column, where, "text_column")) for r in splits[s]] for s in order}
    raw = [_column(r, label_column, where, "label_column") for s in order for r in splits[s]]
    ids, names = _label_ids(raw, tuple(label_names) if label_names else None, where)
    normal, start = {}, 0
    for s in order:
        normal[s] = [{"text": t, "label": y} for t, y in zip(texts[s], ids[start : start + len(texts[s])])]
        start += len(texts[s])
    return Task(kind, normal["train"], normal["validation"], normal["test"], names, source)


def load_task(
    name_or_path: str | Path,
    kind: str = "classification",
    *,
    max_train: int | None = None,
    max_eval: int | None = None,
    seed: int = 0,
    **columns,
) -> Task:
    """A bundled task by name (`tweets`, `fortunes`, `wordnet-category`, `wordnet-pos`) or local data (file or
    directory); see `from_records` for options."""
    from .bundled import BUNDLED

    if str(name_or_path) in BUNDLED:
        task = BUNDLED[str(name_or_path)]()
        if kind == "causal_lm":  # the text as prompt, the label's name as the answer
            from .chat import as_causal

            task = as_causal(task)
    elif not Path(name_or_path).exists():
        raise FileNotFoundError(
            f"{name_or_path}: no such file or directory, and not a bundled task (bundled: {', '.join(BUNDLED)})"
        )
    else:
        task = from_records(read_splits(name_or_path), kind, seed=seed, source=str(name_or_path), **columns)
    return task.subsampled(max_train, max_eval, seed)
