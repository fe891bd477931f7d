"""The bundled `fortunes` task: the topic of a Unix fortune cookie, from the Debian package `fortunes`.

Source: `/usr/share/games/fortunes/<category>` (Debian `fortunes` 1:1.99.1, installed with
`apt-get install -y fortunes`), one file per category, records separated by a line holding `%`. Lines that are not
valid UTF-8 are decoded as latin-1, terminal overstriking (`x\\bx`) is removed and whitespace collapsed; empty
records are dropped.

The task's classes are eight topical categories (`CATEGORIES`): computers 1,051, education 203, food 198,
law 206, love 150, politics 703, science 625, sports 147 records, 3,283 in all. Split, fixed for every machine
(`stable_permutation` with seed 1234, 10% test then 10% validation, the rest train): 2,627 / 328 / 328.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

from .records import decode_lines

FORTUNES_NAME = "fortunes"
FORTUNES_DIR = Path("/usr/share/games/fortunes")
CATEGORIES = ("computers", "education", "food", "law", "love", "politics", "science", "sports")
SPLIT_SEED = 1234
OVERSTRIKE = re.compile(r"[^\x08\n]\x08")


def unstrike(text: str) -> str:
    """Text without terminal overstriking: a character followed by a backspace is dropped, runs included."""
    while True:
        plain = OVERSTRIKE.sub("", text)  # "__\b\bab" loses one pair per pass
        if plain == text:
            return plain.replace("\x08", "")
        text = plain


def fortune_records(category: str, directory: Path = FORTUNES_DIR) -> list[str]:
    """The cleaned records of one category file."""
    path = directory / category
    if not path.is_file():
        found = sorted(p.name for p in directory.iterdir() if "." not in p.name) if directory.is_dir() else []
        if not found:
            raise FileNotFoundError(
                f"{path}: missing. The `fortunes` task reads the Debian package `fortunes`: apt-get install -y fortunes"
            )
        raise FileNotFoundError(f"{path}: no such fortune category; categories in {directory}: {', '.join(found)}")
    text = unstrike(decode_lines(path.read_bytes()))
    records = (" ".join(r.split()) for r in re.split(r"\n%\n", "\n" + text + "\n"))
    return [r for r in records if r and r != "%"]


@functools.lru_cache(maxsize=4)
def fortunes(categories: tuple[str, ...] = CATEGORIES, directory: Path = FORTUNES_DIR):
    """The fortunes Task over ``categories`` with its fixed split."""
    from .task import from_records

    records = [{"text": t, "label": c} for c in categories for t in fortune_records(c, Path(directory))]
    return from_records(
        {"train": records}, "classification", label_names=tuple(categories),
        validation_fraction=0.1, test_fraction=0.1, seed=SPLIT_SEED, source=FORTUNES_NAME,
    )
