"""`lorakit generate`: writes a PEFT directory; user errors are one line and exit 2."""
from __future__ import annotations

import json

import pytest

import lorakit
from lorakit import zoo as models
from lorakit.cli import main


def test_sg_lora_writes_a_loadable_adapter(tiny_zoo, tmp_path, capsys):
    out = tmp_path / "sg"
    assert main(["generate", "sg-lora", "--zoo", str(tiny_zoo), "-o", str(out),
                 "--description", "Is this word the name of an animal or of a food?"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["generator"] == "sg_lora" and len(report["weights"]) == 3
    lorakit.load_peft(models.load("tiny-bert", num_labels=2)[0], out)


def test_icm_lora_reads_examples(tiny_zoo, tmp_path, capsys):
    examples = tmp_path / "task.jsonl"
    examples.write_text("\n".join(json.dumps({"text": f"the {w}", "label": y})
                                  for w, y in (("cat", "animal"), ("soup", "food"), ("dog", "animal"))))
    out = tmp_path / "icm"
    assert main(["generate", "icm-lora", "--zoo", str(tiny_zoo), "-o", str(out), "--examples", str(examples)]) == 0
    assert json.loads(capsys.readouterr().out)["shots"] == 3
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("argv, needle", [
    (["--description", " "], "--description is empty"),
    (["--description", "x", "--zoo", "/nonexistent"], "index.json: no zoo index"),
])
def test_user_errors_are_one_line_and_exit_2(tiny_zoo, tmp_path, capsys, argv, needle):
    args = ["generate", "sg-lora", "--zoo", str(tiny_zoo), "-o", str(tmp_path / "o"), *argv]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_a_model_of_another_base_is_refused_naming_both_fingerprints(tiny_zoo, tmp_path, capsys):
    fingerprint = json.loads((tiny_zoo / "index.json").read_text())["fingerprint"]
    assert main(["generate", "sg-lora", "--zoo", str(tiny_zoo), "-o", str(tmp_path / "o"), "--description", "x",
                 "--model", "tiny-llama"]) == 2
    err = capsys.readouterr().err
    assert fingerprint in err and "has fingerprint" in err and not (tmp_path / "o").exists()


def test_existing_output_needs_overwrite(tiny_zoo, tmp_path, capsys):
    (tmp_path / "o").mkdir()
    assert main(["generate", "sg-lora", "--zoo", str(tiny_zoo), "-o", str(tmp_path / "o"), "--description", "x"]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("generator", ["sg-lora", "icm-lora"])
def test_help(generator, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", generator, "--help"])
    assert exit_.value.code == 0 and f"usage: lorakit generate {generator}" in capsys.readouterr().out


def test_a_zoo_imports_into_a_library_with_held_out_tasks_kept_apart(tiny_zoo, tmp_path, capsys):
    from lorakit.generate.zooindex import Zoo
    from lorakit.library import Library

    lib = tmp_path / "lib"
    assert main(["library", "import-zoo", str(tiny_zoo), "--library", str(lib)]) == 0
    zoo = Zoo.open(tiny_zoo)
    entries = {e.name: e for e in Library(lib).list()}
    assert sorted(entries) == sorted(t["name"] for t in zoo.entries("expert"))
    for task in zoo.entries("expert"):
        assert entries[task["name"]].description == task["description"]
        assert "zoo" in entries[task["name"]].tags
    capsys.readouterr()
    assert main(["library", "import-zoo", str(tiny_zoo), "--library", str(lib)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["library", "import-zoo", str(tiny_zoo), "--library", str(lib), "--split", "heldout"]) == 0
    assert len(Library(lib).list()) == len(zoo.entries())
