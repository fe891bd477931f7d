"""Fixtures: the base pipeline saved once per module and two LoRA files written by lorakit."""
from __future__ import annotations

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from diffusion_testbed import fresh_pipeline, make_lora  # noqa: E402


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    """{name: directory} of two LoRA files written by lorakit, and the saved base pipeline's directory."""
    from lorakit.diffusion import save_lora

    root = tmp_path_factory.mktemp("diffusion")
    pipe = fresh_pipeline()
    pipe.save_pretrained(root / "model")
    files = {}
    for i, name in enumerate(["cross", "yellow"]):
        make_lora(pipe, name, seed=10 + i)
        files[name] = root / "loras" / name
        save_lora(pipe, name, files[name])
        pipe.unet.delete_adapters(name)
    return root, files


@pytest.fixture
def loaded(lora_files):
    """A fresh base pipeline with both LoRAs loaded through lorakit."""
    from lorakit.diffusion import load_loras

    _, files = lora_files
    pipe = fresh_pipeline()
    names = load_loras(pipe, [files["cross"], files["yellow"]])
    return pipe, names
