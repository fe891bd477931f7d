"""`lorakit train` then `lorakit eval` on a tiny model and a local CSV task, end to end through the CLI."""
from __future__ import annotations

import csv
import json

import peft
import torch

import lorakit
from lorakit import zoo
from lorakit.cli import main


def _write_task(path, n=48):
    rows = [{"text": ("good fine great " if i % 2 else "bad awful poor ") * 2 + str(i), "label": "pos" if i % 2 else "neg"} for i in range(n)]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(rows)
    return path


def test_train_then_eval_then_peft_loads(tmp_path, capsys):
    torch.set_num_threads(1)
    data = _write_task(tmp_path / "task.csv")
    out = tmp_path / "run"
    argv = ["train", "--model", "tiny-bert", "--task", str(data), "--targets", "query,value", "-r", "4",
            "--max-steps", "6", "--batch-size", "8", "--eval-every", "3", "--lr", "1e-2", "-o", str(out)]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and 0.0 <= summary["test"]["accuracy"] <= 1.0
    adapter = out / "adapter"
    state = lorakit.load_state(adapter)
    assert state.config.r == 4 and "classifier" in state.modules_to_save
    capsys.readouterr()
    assert main(["eval", str(adapter), "--model", "tiny-bert", "--task", str(data)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert abs(printed["accuracy"] - summary["test"]["accuracy"]) < 1e-9
    # the adapter the CLI wrote loads in PEFT and gives the same logits as lorakit
    base, tok = zoo.load("tiny-bert", task="seq_cls", num_labels=2)
    ours = lorakit.load_peft(zoo.load("tiny-bert", task="seq_cls", num_labels=2)[0], adapter)
    theirs = peft.PeftModel.from_pretrained(base, str(adapter))
    batch = tok(["good fine", "bad awful poor"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, atol=1e-5, rtol=1e-5)


def test_train_rejects_unknown_method(tmp_path, capsys):
    data = _write_task(tmp_path / "task.csv", n=12)
    assert main(["train", "--model", "tiny-bert", "--task", str(data), "--method", "nope", "-o", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'nope'" in err and "lora" in err and err.count("\n") == 1
