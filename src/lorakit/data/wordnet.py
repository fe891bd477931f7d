"""The bundled WordNet tasks: a gloss (definition and examples) classified by its synset's lexicographer category
(`wordnet-category`) or by its part of speech (`wordnet-pos`).

Source: WordNet 3.0 (Princeton University; WordNet 3.0 licence) from the Debian package `wordnet-base`
(`apt-get install -y wordnet-base`): `/usr/share/wordnet/data.{noun,verb,adj,adv}`, one synset per line after the
licence header (lines starting with two spaces), `offset lex_filenum ss_type ... | gloss`. The lexicographer file
numbers map to the 45 names of WordNet's `lexnames` table (`LEXNAMES`).

- `wordnet-category`: the 82,115 noun glosses, labelled by their 26 noun categories (noun.Tops ... noun.time);
  split 65,691 / 8,212 / 8,212.
- `wordnet-pos`: glosses labelled noun / verb / adjective / adverb (adjective satellites count as adjectives),
  balanced to the 3,621 adverbs per class by a fixed draw (`stable_permutation`, seed 1234): 14,484 in all, split
  11,588 / 1,448 / 1,448.
Splits are fixed for every machine (`stable_permutation` with seed 1234, 10% test then 10% validation).
"""
from __future__ import annotations

import functools
from pathlib import Path

from .splits import stable_permutation

WORDNET_DIR = Path("/usr/share/wordnet")
CATEGORY_NAME, POS_NAME = "wordnet-category", "wordnet-pos"
PARTS = ("noun", "verb", "adj", "adv")
SPLIT_SEED = 1234
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant", "noun.possession",
    "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition", "verb.consumption",
    "verb.contact", "verb.creation", "verb.emotion", "verb.motion", "verb.perception", "verb.possession",
    "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)


@functools.lru_cache(maxsize=8)
def synsets(part: str, directory: Path = WORDNET_DIR) -> tuple[tuple[str, str], ...]:
    """(lexicographer category, gloss) of every synset in ``data.<part>``."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, not {part!r}")
    path = Path(directory) / f"data.{part}"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: missing. The WordNet tasks read the Debian package `wordnet-base`: apt-get install -y wordnet-base"
        )
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line or line.startswith("  "):
            continue  # the licence header
        head, sep, gloss = line.partition(" | ")
        fields = head.split()
        if not sep or len(fields) < 3 or not fields[1].isdigit() or int(fields[1]) >= len(LEXNAMES):
            raise ValueError(f"{path}, line {number}: not a WordNet data line (offset lex_filenum ss_type ... | gloss)")
        out.append((LEXNAMES[int(fields[1])], gloss.strip()))
    return tuple(out)


def _task(records: list[dict], label_names: tuple[str, ...], source: str):
    from .task import from_records

    return from_records({"train": records}, "classification", label_names=label_names, validation_fraction=0.1,
                        test_fraction=0.1, seed=SPLIT_SEED, source=source)


@functools.lru_cache(maxsize=2)
def wordnet_category(directory: Path = WORDNET_DIR):
    """Noun glosses labelled by their lexicographer category (26 classes), with the fixed split."""
    records = [{"text": gloss, "label": cat} for cat, gloss in synsets("noun", Path(directory))]
    return _task(records, tuple(n for n in LEXNAMES if n.startswith("noun.")), CATEGORY_NAME)


@functools.lru_cache(maxsize=2)
def wordnet_pos(directory: Path = WORDNET_DIR):
    """Glosses labelled by part of speech, the same number per class (that of the adverbs), with the fixed split."""
    by_part = {part: [g for _, g in synsets(part, Path(directory))] for part in PARTS}
    size = min(len(g) for g in by_part.values())
    records = []
    for part, glosses in by_part.items():
        keep = sorted(stable_permutation(len(glosses), SPLIT_SEED)[:size])
        records += [{"text": glosses[i], "label": part} for i in keep]
    return _task(records, PARTS, POS_NAME)
