"""`lorakit prune`, `lorakit train --quantize` and `lorakit train --method loram` end to end on tiny models."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

import lorakit
from lorakit import zoo
from lorakit.cli import main


def _task(path, n=48):
    rows = [{"text": ("good fine great " if i % 2 else "bad awful poor ") * 2 + str(i), "label": "pos" if i % 2 else "neg"}
            for i in range(n)]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(rows)
    return str(path)


def test_prune_writes_a_smaller_model_transformers_loads(tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "run"
    argv = ["prune", "--model", "tiny-llama", "--task", _task(tmp_path / "t.csv"), "--ratio", "0.5", "--max-steps", "6",
            "--prune-freq", "2", "-r", "4", "--batch-size", "8", "--lr", "1e-2", "-o", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "step 6: 50% of head groups and 50% of FFN channels masked" in printed  # progress as pruning goes
    assert printed.count("of FFN channels masked") >= 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sparsity"] == {"groups": 0.5, "channels": 0.5}
    model = AutoModelForSequenceClassification.from_pretrained(out / "model")
    ids = torch.tensor([[5, 9, 13, 2]])
    script = ("import sys, torch; from transformers import AutoModelForSequenceClassification as M; "
              f"m = M.from_pretrained({str(out / 'model')!r}).eval(); "
              "print(m(torch.tensor([[5, 9, 13, 2]])).logits.tolist()); assert 'lorakit' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={
        k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    with torch.no_grad():  # a process without lorakit gives the same logits
        torch.testing.assert_close(torch.tensor(eval(done.stdout.strip().splitlines()[-1])),
                                   model.eval()(ids).logits, atol=1e-5, rtol=1e-5)
    full, _ = zoo.load("tiny-llama", task="seq_cls", num_labels=2)
    assert model.config.intermediate_size == full.config.intermediate_size // 2
    assert sum(p.numel() for p in model.parameters()) == summary["parameters"] < sum(p.numel() for p in full.parameters())


@pytest.mark.parametrize("argv", [["prune", "--ratio", "1.0"], ["prune", "--ratio", "0"],
                                  ["train", "--method", "loram", "--loram-ratio", "1.5"],
                                  ["train", "--quantize", "torchao-int4"]])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv):
    if argv[1] == "--quantize" and torch.cuda.is_available():
        pytest.skip("torchao int4 runs where CUDA does")
    out = tmp_path / "run"
    assert main(argv + ["--model", "tiny-llama", "--task", _task(tmp_path / "t.csv"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("(0, 1)" in err or "does not run on this machine" in err)
    assert not out.exists()


def test_train_over_a_4bit_base_saves_a_peft_adapter(tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "run"
    argv = ["train", "--model", "tiny-llama", "--task", _task(tmp_path / "t.csv"), "--quantize", "nf4", "--targets",
            "q_proj,v_proj", "-r", "4", "--max-steps", "3", "--batch-size", "8", "-o", str(out)]
    assert main(argv) == 0
    assert "quantising the base's linear layers to nf4" in capsys.readouterr().out
    state = lorakit.load_state(out / "adapter")
    assert state.config.r == 4 and any(p.endswith("q_proj") for p in state.modules())


def test_train_method_loram_recovers_an_adapter_for_the_full_base(tmp_path, capsys):
    peft = pytest.importorskip("peft")
    out = tmp_path / "run"
    argv = ["train", "--model", "tiny-llama", "--task", _task(tmp_path / "t.csv"), "--method", "loram", "--targets",
            "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "-r", "4", "--max-steps", "3",
            "--batch-size", "8", "-o", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "pruning a training copy" in printed and "recovered for the full base" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "loram" and (out / "adapter" / "loram.json").is_file()
    full, _ = zoo.load("tiny-llama", task="seq_cls", num_labels=2)
    model = peft.PeftModel.from_pretrained(full, out / "adapter")  # an ordinary PEFT directory for the full base
    assert model.base_model.model.model.layers[0].mlp.up_proj.lora_B["default"].weight.shape[0] == 128


def test_quantize_with_bf16_is_qloras_setup_and_trains(tmp_path):
    import argparse

    from lorakit.compress.cli import quantize_config

    pytest.importorskip("bitsandbytes")
    assert quantize_config(argparse.Namespace(quantize="nf4", bf16=False)).dtype is None
    paper = quantize_config(argparse.Namespace(quantize="nf4", bf16=True))
    assert (paper.kind, paper.compute_dtype, paper.dtype) == ("nf4", torch.bfloat16, torch.bfloat16)
    assert quantize_config(argparse.Namespace(quantize="torchao-int8", bf16=True)).dtype is None
    out = tmp_path / "run"
    argv = ["train", "--model", "tiny-llama", "--task", _task(tmp_path / "t.csv"), "--quantize", "nf4", "--bf16",
            "--targets", "q_proj,v_proj", "-r", "4", "--max-steps", "2", "--batch-size", "8", "-o", str(out)]
    assert main(argv) == 0
    state = lorakit.load_state(out / "adapter")
    assert all(t.dtype == torch.float32 for named in state.tensors.values() for t in named.values())
