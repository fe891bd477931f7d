"""A small MovieLens-format data set whose users split into two taste groups (written as recbole atomic files)."""
from __future__ import annotations

import random

import pytest

GENRES = ("Action", "Drama")


def write_movielens(directory, users: int = 24, items: int = 20, per_user: int = 12, seed: int = 0):
    """Even users like Action and dislike Drama, odd users the reverse; times increase within each user."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    lines = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
    lines += [f"{i}\tMovie {i}\t1990\t{GENRES[0] if i % 2 else GENRES[1]}" for i in range(1, items + 1)]
    (directory / "ml-100k.item").write_text("\n".join(lines) + "\n")
    rows = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for user in range(1, users + 1):
        for t, item in enumerate(rng.sample(range(1, items + 1), per_user)):
            likes = (item % 2 == 1) == (user % 2 == 0)  # odd items are Action
            rows.append(f"{user}\t{item}\t{5 if likes else 2}\t{1000 + t}")
    (directory / "ml-100k.inter").write_text("\n".join(rows) + "\n")
    return directory


@pytest.fixture()
def movielens_dir(tmp_path):
    return write_movielens(tmp_path / "ml")
