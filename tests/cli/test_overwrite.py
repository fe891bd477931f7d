"""No command overwrites an input or an existing output: refusals are one line, exit 2, and write nothing."""
from __future__ import annotations

import json

import pytest
import torch

import lorakit
from lorakit.cli import main
from lorakit.merging import combine

from trust_helpers import one_line_error, save_adapter, snapshot, write_task


@pytest.fixture
def two_adapters(tmp_path):
    return save_adapter(tmp_path / "a", seed=1), save_adapter(tmp_path / "b", seed=2)


def _merge(a, b, out, *extra):
    return main(["merge", str(a), str(b), "--method", "linear", "-o", str(out), *extra])


@pytest.mark.parametrize("where", ["a", "a/sub", "."])
def test_merge_refuses_an_output_that_names_contains_or_lies_in_an_input(two_adapters, tmp_path, capsys, where):
    a, b = two_adapters
    before = snapshot(tmp_path)
    assert _merge(a, b, tmp_path / where if where != "." else tmp_path) == 2
    one_line_error(capsys, "would overwrite the input")
    assert snapshot(tmp_path) == before


def test_merge_refuses_an_existing_output_without_overwrite(two_adapters, tmp_path, capsys):
    a, b = two_adapters
    out = save_adapter(tmp_path / "out", seed=3)
    before = snapshot(tmp_path)
    assert _merge(a, b, out) == 2
    one_line_error(capsys, "already exists", "--overwrite")
    assert snapshot(tmp_path) == before
    # with --overwrite the old output is replaced by the merge (and the inputs stay as they were)
    assert _merge(a, b, out, "--overwrite") == 0
    merged, sa, sb = (lorakit.load_state(p) for p in (out, a, b))
    expected = combine([sa, sb], "linear").delta("q")
    torch.testing.assert_close(merged.delta("q"), expected, atol=1e-6, rtol=1e-6)
    assert {k: v for k, v in snapshot(tmp_path).items() if "/out/" not in k} == \
        {k: v for k, v in before.items() if "/out/" not in k}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_merge_output_under_a_file_is_refused(two_adapters, tmp_path, capsys):
    a, b = two_adapters
    (tmp_path / "file").write_text("x")
    before = snapshot(tmp_path)
    assert _merge(a, b, tmp_path / "file" / "out") == 2
    one_line_error(capsys, "is a file")
    assert snapshot(tmp_path) == before


def test_a_failed_merge_leaves_no_output(two_adapters, tmp_path, capsys):
    a, b = two_adapters
    out = tmp_path / "new" / "deeper" / "out"
    assert main(["merge", str(a), str(b), "--method", "lego", "--rank", "0", "-o", str(out)]) == 2
    capsys.readouterr()
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("argv, needle", [
    (["-r", "0"], "argument -r/--rank: expected a whole number >= 1, found 0"),
    (["--epochs", "1.5"], "argument --epochs: expected a whole number >= 1, found '1.5'"),
    (["--max-steps", "-2"], "argument --max-steps"),
])
def test_train_number_options_are_checked(tmp_path, capsys, argv, needle):
    assert _exit_code(["train", "--model", "tiny-bert", "-o", str(tmp_path / "run"), *argv]) == 2
    one_line_error(capsys, needle)
    assert not (tmp_path / "run").exists()


def _exit_code(argv) -> int:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


def test_train_output_under_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["train", "--model", "tiny-bert", "-o", str(tmp_path / "file" / "run")]) == 2
    one_line_error(capsys, "is a file")
    assert (tmp_path / "file").read_text() == "x"


def _train(data, out, *extra):
    return main(["train", "--model", "tiny-bert", "--task", str(data), "--targets", "query,value", "-r", "2",
                 "--max-steps", "2", "--batch-size", "8", "--eval-every", "1", "--max-eval", "8", "-o", str(out),
                 *extra])


def test_train_refuses_a_directory_holding_another_run_or_files(tmp_path, capsys):
    data = write_task(tmp_path / "task.csv")
    run = tmp_path / "run"
    assert _train(data, run) == 0
    capsys.readouterr()
    before = snapshot(run)
    assert _train(data, run, "-r", "4") == 2
    one_line_error(capsys, "already exists", "--overwrite")
    assert snapshot(run) == before
    # a directory of the user's own files is refused too
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert _train(data, tmp_path / "mine") == 2
    one_line_error(capsys, "already exists")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


def test_resume_with_another_rank_is_refused_and_with_the_same_settings_continues_exactly(tmp_path, capsys, monkeypatch):
    data = write_task(tmp_path / "task.csv")
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert _train(data, full) == 0 and _train(data, cut) == 0
    capsys.readouterr()
    before = snapshot(cut)
    assert _train(data, cut, "--resume", "-r", "4") == 2
    one_line_error(capsys, "--rank 2", "4")
    assert snapshot(cut) == before
    # as if the run had stopped after step 1: drop step 2's checkpoint and the outputs, then resume
    for name in ("checkpoint-00000002.pt", "summary.json"):
        (cut / name).unlink()
    from lorakit.train import loop

    restored, restore = [], loop._Run._restore
    monkeypatch.setattr(loop._Run, "_restore", lambda self, path: (restored.append(path.name), restore(self, path)))
    assert _train(data, cut, "--resume") == 0
    assert restored == ["checkpoint-00000001.pt"]
    assert json.loads((cut / "summary.json").read_text())["steps"] == 2
    got, want = lorakit.load_state(cut / "adapter"), lorakit.load_state(full / "adapter")
    for path in want.tensors:
        for key, value in want.tensors[path].items():
            torch.testing.assert_close(got.tensors[path][key], value, rtol=0, atol=0)


def test_resume_of_a_directory_without_a_run_is_refused(tmp_path, capsys):
    data = write_task(tmp_path / "task.csv", n=8)
    assert _train(data, tmp_path / "nothing", "--resume") == 2
    one_line_error(capsys, "holds no lorakit run")
    assert not (tmp_path / "nothing").exists()


def test_train_overwrite_replaces_the_run(tmp_path, capsys):
    data = write_task(tmp_path / "task.csv")
    run = tmp_path / "run"
    assert _train(data, run) == 0
    assert _train(data, run, "-r", "4", "--overwrite") == 0
    assert lorakit.load_state(run / "adapter").config.r == 4
    assert json.loads((run / "run.json").read_text())["settings"]["rank"] == 4


def test_a_run_written_when_gradient_checkpointing_was_a_switch_resumes_with_full(tmp_path, capsys):
    data = write_task(tmp_path / "task.csv")
    run = tmp_path / "run"
    assert _train(data, run, "--gradient-checkpointing") == 0
    record = json.loads((run / "run.json").read_text())
    assert record["settings"]["gradient_checkpointing"] == "full"
    record["settings"]["gradient_checkpointing"] = True  # as the switch stored it
    (run / "run.json").write_text(json.dumps(record))
    (run / "summary.json").unlink()
    capsys.readouterr()
    assert _train(data, run, "--resume", "--gradient-checkpointing") == 0
    capsys.readouterr()
    assert _train(data, run, "--resume", "--gradient-checkpointing", "selective") == 2
    one_line_error(capsys, "--gradient-checkpointing 'full'", "selective")
