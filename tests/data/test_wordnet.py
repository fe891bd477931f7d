"""The bundled WordNet tasks: parsing data files, the fixed splits, and the error when the Debian package is missing."""
from collections import Counter

import pytest

from lorakit.data import load_task
from lorakit.data.wordnet import PARTS, WORDNET_DIR, synsets, wordnet_pos

INSTALLED = all((WORDNET_DIR / f"data.{p}").is_file() for p in PARTS)
SKIP = pytest.mark.skipif(not INSTALLED, reason=f"needs the Debian package `wordnet-base` ({WORDNET_DIR}): apt-get install -y wordnet-base")

HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  \n"
LINES = {
    "noun": "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived to exist  \n"
            "00002137 05 n 01 dog 0 000 | a domesticated canid; \"the dog barked\"  \n",
    "verb": "00001740 29 v 01 breathe 0 000 01 + 02 00 | draw air into, and expel out of, the lungs  \n",
    "adj": "00001740 00 a 01 able 0 000 | having the necessary means  \n",
    "adv": "00001740 02 r 01 quickly 0 000 | with speed  \n"
           "00001741 02 r 01 slowly 0 000 | without speed  \n",
}


def write_wordnet(directory):
    for part, lines in LINES.items():
        (directory / f"data.{part}").write_text(HEADER + lines)


def test_data_lines_give_category_and_gloss(tmp_path):
    write_wordnet(tmp_path)
    assert synsets("noun", tmp_path) == (
        ("noun.Tops", "that which is perceived to exist"), ("noun.animal", 'a domesticated canid; "the dog barked"'))
    assert synsets("verb", tmp_path) == (("verb.body", "draw air into, and expel out of, the lungs"),)
    pos = wordnet_pos(tmp_path)
    assert pos.label_names == PARTS
    assert Counter(e["label"] for e in pos.train + pos.validation + pos.test) == {0: 1, 1: 1, 2: 1, 3: 1}  # balanced


def test_bad_line_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y wordnet-base"):
        synsets("noun", tmp_path / "none")
    (tmp_path / "data.noun").write_text(HEADER + "00001740 xx n 01 entity | gloss\n")
    with pytest.raises(ValueError, match=r"data.noun, line 2: not a WordNet data line"):
        synsets("noun", tmp_path)


@SKIP
def test_bundled_category_split():
    task = load_task("wordnet-category")
    assert len(task.label_names) == 26 and task.label_names[0] == "noun.Tops"
    assert (len(task.train), len(task.validation), len(task.test)) == (65691, 8212, 8212)
    counts = Counter(task.label_names[e["label"]] for e in task.train + task.validation + task.test)
    assert counts["noun.artifact"] == 11587 and counts["noun.motive"] == 42


@SKIP
def test_bundled_pos_split():
    task = load_task("wordnet-pos", max_train=1000, max_eval=200)
    full = wordnet_pos()
    assert (len(full.train), len(full.validation), len(full.test)) == (11588, 1448, 1448)
    assert Counter(e["label"] for e in full.train + full.validation + full.test) == {i: 3621 for i in range(4)}
    assert all(abs(n - 250) <= 5 for n in Counter(e["label"] for e in task.train).values())
