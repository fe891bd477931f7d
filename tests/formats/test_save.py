"""Saving into a directory that already holds things: only the adapter's own files change."""
from __future__ import annotations

import pytest
import torch

import lorakit


def _adapter(llama, perturb, seed: int, targets=("q_proj",)):
    return perturb(lorakit.apply(llama.make(), lorakit.LoRAConfig(r=4, target_modules=list(targets))), seed=seed)


def test_save_over_existing_adapter_keeps_other_files(llama, perturb, tmp_path):
    first, second = _adapter(llama, perturb, 0), _adapter(llama, perturb, 1, ("k_proj", "v_proj"))
    lorakit.save_peft(first, tmp_path)
    lorakit.save_peft(first, tmp_path, adapter_name="other")
    (tmp_path / "README.md").write_text("notes")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step-10.pt").write_bytes(b"\0" * 8)
    (tmp_path / "adapter_model.bin").write_bytes(b"stale pickle")

    lorakit.save_peft(second, tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["README.md", "adapter_config.json", "adapter_model.safetensors", "checkpoints",
                     "lorakit_base.json", "other"]
    assert (tmp_path / "README.md").read_text() == "notes"
    assert (tmp_path / "checkpoints" / "step-10.pt").read_bytes() == b"\0" * 8
    run = lambda name: llama.run(lorakit.load_peft(llama.make(), tmp_path, adapter_name=name))  # noqa: E731
    assert torch.allclose(run(None), llama.run(second), atol=1e-6)
    assert torch.allclose(run("other"), llama.run(first), atol=1e-6)


def test_save_into_current_directory(llama, perturb, tmp_path, monkeypatch):
    model = _adapter(llama, perturb, 0)
    monkeypatch.chdir(tmp_path)
    assert lorakit.save_peft(model, ".") == tmp_path.resolve()
    assert torch.allclose(llama.run(lorakit.load_peft(llama.make(), ".")), llama.run(model), atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                          "lorakit_base.json"]


def test_save_onto_a_file_is_refused(llama, perturb, tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(lorakit.AdapterFileError, match="taken: exists and is not a directory"):
        lorakit.save_peft(_adapter(llama, perturb, 0), tmp_path / "taken")
