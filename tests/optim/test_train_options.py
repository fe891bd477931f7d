"""`lorakit optimizers` and `lorakit train --optimizer/--schedule/--bf16/--gradient-checkpointing/--device`."""
import json

import pytest

import lorakit
from lorakit.cli import main
from lorakit.train.schedules import SCHEDULES

TINY = ["train", "--model", "tiny-llama", "--task", "tweets", "--max-train", "24", "--max-eval", "8",
        "--max-length", "16", "--targets", "q_proj,v_proj", "--batch-size", "4", "--eval-every", "2", "--device", "cpu"]


def test_optimizers_lists_every_optimiser_and_schedule(capsys):
    assert main(["optimizers"]) == 0
    out = capsys.readouterr().out
    for name in lorakit.OPTIMIZERS.names() + SCHEDULES.names():
        assert f" {name} " in out
    assert "lr_ratio=16.0" in out and "gamma=2" in out


@pytest.mark.parametrize("argv, needle", [
    (["--optimizer", "lora_pr"], "unknown optimiser 'lora_pr'. Did you mean 'lora_pro'"),
    (["--schedule", "lisaa"], "unknown schedule 'lisaa'. Did you mean 'lisa'"),
    (["--schedule", "lisa", "--schedule-option", "gamma=9"], "gamma=9 sampled layers, but 'model.layers' has only 2"),
    (["--schedule", "increlora", "--schedule-option", "budget=3"], "budget 3 (total rank) is below the starting"),
    (["--bf16", "--fp16"], "exclude each other"),
    (["--optimizer", "lora_plus", "--optimizer-option", "ratio=2"], "has no option ratio"),
])
def test_bad_options_are_one_line_errors_before_training(argv, needle, tmp_path, capsys):
    assert main(TINY + ["-o", str(tmp_path)] + argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err
    assert not (tmp_path / "metrics.jsonl").exists()


def test_train_with_optimizer_schedule_bf16_and_checkpointing(tmp_path, capsys):
    argv = TINY + ["-o", str(tmp_path), "--max-steps", "4", "--optimizer", "lora_plus", "--schedule", "increlora",
                   "-r", "2", "--schedule-option", "budget=10", "--schedule-option", "init_warmup=1",
                   "--schedule-option", "interval=1", "--bf16", "--gradient-checkpointing"]
    assert main(argv) == 0
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sum(saved["rank_pattern"].values()) == 10  # 4 modules from rank 2 grown to the budget
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 4


def test_selective_gradient_checkpointing_from_the_command_line(tmp_path):
    import argparse

    from lorakit.optim.cli import add_train_arguments, fit_options

    p = argparse.ArgumentParser()
    add_train_arguments(p)
    assert fit_options(p.parse_args([]))["gradient_checkpointing"] is False
    assert fit_options(p.parse_args(["--gradient-checkpointing"]))["gradient_checkpointing"] == "full"
    assert fit_options(p.parse_args(["--gradient-checkpointing", "selective"]))["gradient_checkpointing"] == "selective"
    assert main(TINY + ["-o", str(tmp_path), "--max-steps", "2", "--gradient-checkpointing", "selective"]) == 0
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 2
