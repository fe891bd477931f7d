"""`lorakit transfer`: a DoRA adapter for another base from a LoRA, and one-line errors that write nothing."""
from __future__ import annotations

import json

import pytest
import torch

from lorakit import save_peft, zoo
from lorakit.cli import main

from transfer_helpers import make_teacher

FAST = ["--candidates", "40", "--num-synthetic", "20", "--min-synthetic", "8", "--epochs", "2", "--max-length", "32"]


@pytest.fixture
def adapter(tmp_path):
    teacher, _ = make_teacher("tiny-bert")
    return save_peft(teacher, tmp_path / "source")


def _argv(adapter, task, out, *extra):
    return ["transfer", "--source-model", "tiny-bert", "--adapter", str(adapter), "--target-model", "tiny-bert",
            "--task", str(task), "--seeds", "5", "-o", str(out), *FAST, *extra]


def test_lora_to_dora_on_another_base_writes_a_peft_directory(tmp_path, adapter, task_file, capsys):
    peft = pytest.importorskip("peft")
    out = tmp_path / "moved"
    assert main(_argv(adapter, task_file, out, "--target-method", "dora", "--target-seed", "1")) == 0
    printed = capsys.readouterr().out
    assert "proposing 40 inputs from 5 seeds" in printed and "the discriminator kept 20 of 40" in printed
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["peft_type"] == "LORA" and config["r"] == 4
    record = json.loads((out / "trans_lora.json").read_text())
    assert record["seeds"] == 5 and record["distilled_on"] == 25 and record["kl_after"] < record["kl_before"]
    assert record["generator"].startswith("ngram") and record["config"]["target_method"] == "dora"
    # the target base is tiny-bert drawn with --target-seed 1: another set of weights than the source's (seed 0)
    base, tok = zoo.load("tiny-bert", num_labels=3, seed=1)
    plain = base(**tok(["the crew was kind"], return_tensors="pt")).logits
    model = peft.PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        adapted = model(**tok(["the crew was kind"], return_tensors="pt")).logits
    assert not torch.allclose(adapted, plain)


@pytest.mark.parametrize("case, needle", [
    ("labels", "its classification head has 3 outputs, but --task"),
    ("missing", "no adapter_config.json there"),
    ("untyped", "task_type None"),
    ("exists", "already exists; pass --overwrite"),
    ("background", "--background nowhere.txt: neither a bundled task"),
    ("method", "--target-method nope: not a registered method"),
    ("fraction", "--keep-fraction must be in (0, 1], got 1.5"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, adapter, task_file, capsys, case, needle):
    out, extra, task, source = tmp_path / "out", [], task_file, adapter
    if case == "labels":
        two = tmp_path / "two.jsonl"
        two.write_text("".join(json.dumps({"text": f"x {i}", "label": i % 2}) + "\n" for i in range(20)))
        task = two
    elif case == "missing":
        source = tmp_path / "nothing"
    elif case == "untyped":
        from lorakit import LoRAConfig, apply

        bare, _ = zoo.load("tiny-bert", task="base")
        apply(bare, LoRAConfig(r=4, target_modules=["query"]))
        source = save_peft(bare, tmp_path / "bare")
    elif case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "method":
        extra = ["--target-method", "nope"]
    elif case == "fraction":
        extra = ["--keep-fraction", "1.5"]
    else:
        extra = ["--background", "nowhere.txt"]
    assert main(_argv(source, task, out, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and err.startswith("lorakit transfer: error:")
    assert (not out.exists()) or [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_causal_lm_adapter_moves_to_another_architecture(tmp_path, capsys):
    peft = pytest.importorskip("peft")
    from lorakit import apply
    from lorakit.jobs import method_config

    lm, _ = zoo.load("tiny-llama", task="causal_lm")
    apply(lm, method_config("lora", 4, 8, 0.0, ["q_proj", "v_proj"], "causal_lm", base_model="tiny-llama"))
    source = save_peft(lm, tmp_path / "lm")
    task = tmp_path / "qa.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"question {i}: what is {i} plus one?", "completion": f" {i + 1}"})
                            + "\n" for i in range(30)))
    out = tmp_path / "moved"
    argv = ["transfer", "--source-model", "tiny-llama", "--adapter", str(source), "--target-model", "tiny-gpt2",
            "--targets", "c_attn", "--task", str(task), "--seeds", "5", "-o", str(out), *FAST]
    assert main(argv) == 0
    assert "completing 25 prompts with the source model" in capsys.readouterr().out
    record = json.loads((out / "trans_lora.json").read_text())
    assert record["kind"] == "causal_lm" and record["lm_loss_after"] < record["lm_loss_before"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["target_modules"] == ["c_attn"]
    base, _ = zoo.load("tiny-gpt2", task="causal_lm")
    assert isinstance(peft.PeftModel.from_pretrained(base, str(out)), peft.PeftModel)
