"""The bundled `fortunes` task: parsing, the fixed split, and the error when the Debian package is missing."""
from collections import Counter

import pytest

from lorakit.data import load_task
from lorakit.data.fortunes import CATEGORIES, FORTUNES_DIR, fortune_records, fortunes

INSTALLED = all((FORTUNES_DIR / c).is_file() for c in CATEGORIES)


def test_records_are_split_and_cleaned(tmp_path):
    raw = b"First one\nspans two lines.\n%\nB\x08Bo\x08ol\x08ld   text, ___\x08\x08\x08run\n%\n\n%\ncaf\xe9 in latin-1\n%\n"
    (tmp_path / "misc").write_bytes(raw)
    assert fortune_records("misc", tmp_path) == ["First one spans two lines.", "Bold text, run", "caf\u00e9 in latin-1"]


def test_missing_files_name_the_debian_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y fortunes"):
        fortunes(directory=tmp_path)
    (tmp_path / "food").write_text("Eat.\n%\n")
    with pytest.raises(FileNotFoundError, match="no such fortune category; categories in .*: food"):
        fortunes(("food", "law"), directory=tmp_path)


@pytest.mark.skipif(not INSTALLED, reason=f"needs the Debian package `fortunes` ({FORTUNES_DIR}): apt-get install -y fortunes")
def test_bundled_split():
    task = load_task("fortunes")
    assert task.label_names == CATEGORIES
    assert (len(task.train), len(task.validation), len(task.test)) == (2627, 328, 328)
    counts = Counter(task.label_names[e["label"]] for e in task.train + task.validation + task.test)
    assert counts == {"computers": 1051, "education": 203, "food": 198, "law": 206, "love": 150, "politics": 703,
                      "science": 625, "sports": 147}
    assert not any("\x08" in e["text"] or "\n" in e["text"] for e in task.train)
    small = load_task("fortunes", max_train=400, max_eval=80)
    assert (len(small.train), len(small.test)) == (400, 80)
