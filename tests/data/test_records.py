"""Reading local files: JSONL, JSON, CSV (with latin-1 lines), split directories, save_to_disk directories."""

import json

import pytest

from lorakit.data.records import decode_lines, read_file, read_splits


def test_decode_lines_falls_back_per_line():
    raw = "café\n".encode() + b"caf\xe9\n"
    assert decode_lines(raw) == "café\ncafé\n"


def test_jsonl_json_and_csv_give_the_same_records(tmp_path):
    rows = [{"text": "a, b", "label": "x"}, {"text": "c\nd", "label": "y"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text('text,label\n"a, b",x\n"c\nd",y\n')
    for suffix in ("jsonl", "json", "csv"):
        assert read_file(tmp_path / f"d.{suffix}") == rows, suffix


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.jsonl"):
        read_file(tmp_path / "nothere.jsonl")
    with pytest.raises(FileNotFoundError, match="nothere"):
        read_splits(tmp_path / "nothere")


@pytest.mark.parametrize("content", ["", "  \n", "text,label\n"])
def test_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / ("e.csv" if content.startswith("text") else "e.jsonl")
    path.write_text(content)
    with pytest.raises(ValueError, match="e\\.(csv|jsonl)"):
        read_file(path)


def test_bad_json_line_names_file_and_line(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2"):
        read_file(tmp_path / "d.jsonl")


def test_unsupported_suffix(tmp_path):
    (tmp_path / "d.parquet").write_text("x")
    with pytest.raises(ValueError, match="parquet"):
        read_file(tmp_path / "d.parquet")


def test_split_directory(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": 0}\n')
    (tmp_path / "dev.csv").write_text("text,label\nb,1\n")
    splits = read_splits(tmp_path)
    assert sorted(splits) == ["train", "validation"]
    assert splits["validation"] == [{"text": "b", "label": "1"}]


def test_directory_without_train_lists_its_files(tmp_path):
    (tmp_path / "other.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="other.txt"):
        read_splits(tmp_path)


def test_save_to_disk_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}),
        test=datasets.Dataset.from_dict({"text": ["c"], "label": [1]}),
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    datasets.Dataset.from_dict({"text": ["z"], "label": [0]}).save_to_disk(str(tmp_path / "single"))
    splits = read_splits(tmp_path / "dd")
    assert splits == {"train": [{"text": "a", "label": 0}, {"text": "b", "label": 1}], "test": [{"text": "c", "label": 1}]}
    assert read_splits(tmp_path / "single") == {"train": [{"text": "z", "label": 0}]}
