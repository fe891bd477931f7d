"""The `lorakit` command: tables, adapter info, help, and one-line user errors with a non-zero exit."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import lorakit
from lorakit.cli import main


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.v = nn.Linear(8, 4)


@pytest.fixture
def adapter_dir(tmp_path):
    torch.manual_seed(0)
    model = lorakit.apply(Net(), lorakit.LoRAConfig(r=2, lora_alpha=4, target_modules=["q", "v"], rank_pattern={"v": 1}))
    return lorakit.save_peft(model, tmp_path / "adapter")


def test_methods_lists_every_registered_method(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in lorakit.METHODS.names():
        assert f"\n{name} " in out
    assert "r·(in+out)" in out


def test_info_describes_the_adapter(adapter_dir, capsys):
    assert main(["info", str(adapter_dir)]) == 0
    out = capsys.readouterr().out
    assert "lora" in out and "q, v" in out
    assert "per module: 1, 2" in out
    # q: 2·(8+8) = 32, v: 1·(8+4) = 12
    assert "44" in out.split("parameters")[1].splitlines()[0]
    assert "KiB" in out or " B" in out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["info", "/nonexistent/adapter"], "no such adapter directory"),
        (["eval", "/nonexistent/adapter"], "no such adapter directory"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err


def test_unknown_model_is_a_one_line_error(adapter_dir, capsys):
    assert main(["eval", str(adapter_dir), "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and err.count("\n") == 1


def test_corrupt_adapter_is_a_one_line_error(adapter_dir, capsys):
    (adapter_dir / "adapter_model.safetensors").write_bytes(b"\x00\x01garbage")
    assert main(["info", str(adapter_dir)]) == 2
    err = capsys.readouterr().err
    assert "adapter_model.safetensors" in err and err.count("\n") == 1


@pytest.mark.parametrize("command", ["train", "eval", "info", "methods", "demo"])
def test_help_for_each_command(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0 and f"usage: lorakit {command}" in capsys.readouterr().out


def test_python_m_lorakit_runs():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", "lorakit", "--help"], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.startswith("usage: lorakit") and "merge" in out.stdout
