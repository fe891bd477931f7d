"""``lorakit library ...`` and the commands that take library names (eval, merge, serve) through ``--library``."""
from __future__ import annotations

import json

import pytest
from library_helpers import Net, one_line_error, save_adapter, snapshot, write_task

import lorakit
from lorakit import zoo
from lorakit.cli import main
from lorakit.core import fingerprint
from lorakit.library import Library
from lorakit.merging import combine


def _lib(tmp_path, *seeds):
    lib = str(tmp_path / "lib")
    for s in seeds:
        assert main(["library", "add", str(save_adapter(tmp_path / f"a{s}", seed=s)), "--library", lib, "--name",
                     f"n{s}", "--description", f"task number {s}", "--tag", "demo", "--metric", "accuracy=0.5"]) == 0
    return lib


def test_add_list_show_search_remove(tmp_path, capsys):
    lib = _lib(tmp_path, 1, 2)
    assert f"added n2 (lora, base {fingerprint.record(Net())['fingerprint']})" in capsys.readouterr().out
    assert main(["library", "list", "--library", lib]) == 0
    out = capsys.readouterr().out
    assert "n1" in out and "n2" in out and "task number 1" in out and "demo" in out
    assert main(["library", "list", "--library", lib, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [e["name"] for e in listed] == ["n1", "n2"] and listed[0]["metrics"] == {"accuracy": 0.5}
    assert main(["library", "show", "n1", "--library", lib]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["path"] == str(Library(lib).path_of("n1")) and shown["description"] == "task number 1"
    assert main(["library", "search", "task number 2", "--library", lib, "-k", "1"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == 3 and " n2 " in rows[2]
    assert main(["library", "remove", "n1", "--library", lib]) == 0
    assert Library(lib).names() == ["n2"]


def test_add_takes_metrics_and_provenance_from_a_train_run(tmp_path, capsys):
    data = write_task(tmp_path / "task.csv", n=16)
    run = tmp_path / "run"
    assert main(["train", "--model", "tiny-bert", "--task", str(data), "--targets", "query,value", "-r", "2",
                 "--max-steps", "1", "--batch-size", "4", "--max-eval", "4", "--max-length", "16", "-o", str(run)]) == 0
    lib = str(tmp_path / "lib")
    assert main(["library", "add", str(run / "adapter"), "--library", lib, "--name", "tiny"]) == 0
    capsys.readouterr()
    entry = Library(lib).get("tiny")
    assert set(entry.metrics) >= {"accuracy", "loss"}
    assert entry.provenance["command"].startswith("lorakit train --model tiny-bert --task ")
    # lorakit eval resolves the name and checks the base; another base (--seed 1) is refused naming both
    assert main(["eval", "tiny", "--library", lib, "--task", str(data), "--max-eval", "4"]) == 0
    assert '"accuracy"' in capsys.readouterr().out
    assert main(["eval", "tiny", "--library", lib, "--task", str(data), "--seed", "1"]) == 2
    one_line_error(capsys, "library entry 'tiny'", entry.fingerprint, "but this model has fingerprint")


def test_a_peft_adapter_is_fingerprinted_from_model(tmp_path, capsys):
    model, _ = zoo.load("tiny-bert", task="seq_cls", num_labels=3)
    lorakit.apply(model, lorakit.LoRAConfig(r=2, target_modules=["query"], modules_to_save=["classifier"],
                                            task_type="SEQ_CLS"))
    path = lorakit.save_peft(model, tmp_path / "p")
    (path / "lorakit_base.json").unlink()
    lib = str(tmp_path / "lib")
    assert main(["library", "add", str(path), "--library", lib]) == 2
    one_line_error(capsys, "records no base model", "--model")
    assert main(["library", "add", str(path), "--library", lib, "--model", "tiny-bert"]) == 0
    Library(lib).path_of("p", base=zoo.load("tiny-bert", task="seq_cls", num_labels=3)[0])


@pytest.mark.parametrize("args, needles", [
    (["library", "add", "{tmp}/a1", "--library", "{lib}", "--name", "n1"], ["entry 'n1' already exists", "--overwrite"]),
    (["library", "show", "nope", "--library", "{lib}"], ["no entry 'nope'"]),
    (["library", "remove", "n", "--library", "{lib}"], ["no entry 'n'", "did you mean 'n1'"]),
    (["library", "list", "--library", "{tmp}/nowhere"], ["no such library"]),
    (["library", "add", "{tmp}/a1", "--library", "{lib}", "--name", "x", "--metric", "acc"], ["--metric 'acc'"]),
    (["library", "add", "{tmp}/missing", "--library", "{lib}"], ["not an adapter directory"]),
    (["library", "search", "q", "--library", "{lib}", "-k", "0"], ["-k must be a whole number"]),
    (["library", "search", "q", "--library", "{lib}", "--by", "weights"], ["at least two different descriptions"]),
    (["library", "search", "q", "--library", "{lib}", "--by", "nope"], ["invalid choice"]),
    (["library", "list"], ["--library"]),
])
def test_user_errors_are_one_line_and_status_2(tmp_path, capsys, args, needles):
    lib = _lib(tmp_path, 1)
    before = _files(tmp_path / "lib")
    capsys.readouterr()
    try:
        code = main([a.format(tmp=tmp_path, lib=lib) for a in args])
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    assert code == 2
    one_line_error(capsys, *needles)
    assert _files(tmp_path / "lib") == before


def _files(root):
    """The library's files but its caches."""
    return {k: v for k, v in snapshot(root).items() if "/.cache/" not in k}


def test_a_corrupt_manifest_is_a_one_line_error_naming_it(tmp_path, capsys):
    lib = _lib(tmp_path, 1)
    (tmp_path / "lib" / "manifest.json").write_text("{oops")
    capsys.readouterr()
    assert main(["library", "list", "--library", lib]) == 2
    one_line_error(capsys, str(tmp_path / "lib" / "manifest.json"), "not valid JSON")


def test_merge_takes_library_names(tmp_path, capsys):
    lib = _lib(tmp_path, 1, 2)
    out = tmp_path / "merged"
    assert main(["merge", "n1", "n2", "--library", lib, "--method", "linear", "-o", str(out)]) == 0
    expected = combine([lorakit.load_state(tmp_path / f"a{s}") for s in (1, 2)], "linear")
    got = lorakit.load_state(out)
    for path in expected.modules():
        assert (got.delta(path) - expected.delta(path)).abs().max() < 1e-6
    Library(lib).add(save_adapter(tmp_path / "other", base_seed=1), name="other")
    capsys.readouterr()
    assert main(["merge", "n1", "other", "--library", lib, "--method", "linear", "-o", str(tmp_path / "m2")]) == 2
    one_line_error(capsys, "different base models", fingerprint.record(Net())["fingerprint"],
                   fingerprint.record(Net(seed=1))["fingerprint"])
    assert main(["merge", "n1", "n9", "--library", lib, "--method", "linear", "-o", str(tmp_path / "m3")]) == 2
    one_line_error(capsys, "no entry 'n9'")


def _llama_adapter(path, base_seed: int):
    model, _ = zoo.load("tiny-llama", task="causal_lm", seed=base_seed)
    return lorakit.save_peft(lorakit.apply(model, lorakit.LoRAConfig(r=2, target_modules=["q_proj", "v_proj"])), path)


def test_serve_registers_library_entries_and_refuses_another_base(tmp_path):
    from lorakit.serve.cli import build_engine

    lib = Library(tmp_path / "lib")
    lib.add(_llama_adapter(tmp_path / "s0", 0), name="chat")
    engine = build_engine("tiny-llama", library=str(lib.root), max_batch=2, max_len=32, pool_bytes=1 << 20)
    assert engine.store.names() == ["chat"] and engine.store.entry("chat").path == lib.path_of("chat")
    other = lib.add(_llama_adapter(tmp_path / "s1", 1), name="foreign")
    with pytest.raises(ValueError) as e:
        build_engine("tiny-llama", library=str(lib.root), max_batch=2, max_len=32, pool_bytes=1 << 20)
    assert "'foreign'" in str(e.value) and other.fingerprint in str(e.value) and lib.get("chat").fingerprint in str(e.value)
