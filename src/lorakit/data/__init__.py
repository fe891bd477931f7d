"""Task loaders: the bundled `tweets` task and local JSONL / CSV / `save_to_disk` data, tokenised for training."""

from .byte_tokenizer import byte_tokenizer
from .encode import IGNORE_INDEX, EncodedDataset, collate, encode
from .records import read_splits
from .splits import carve, stable_permutation, subsample
from .task import Task, from_records, load_task
from .tweets import tweets

__all__ = [
    "IGNORE_INDEX",
    "EncodedDataset",
    "Task",
    "byte_tokenizer",
    "carve",
    "collate",
    "encode",
    "from_records",
    "load_task",
    "read_splits",
    "stable_permutation",
    "subsample",
    "tweets",
]
