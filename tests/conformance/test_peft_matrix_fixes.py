"""Regression tests for the differences from peft the conformance matrix found and lorakit fixed."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, RandLoraConfig, get_peft_model
from safetensors.torch import load_file

import lorakit
from lorakit.formats.peft import AdapterFileError


def _keys(path) -> dict:
    return load_file(str(path / "adapter_model.safetensors"))


def test_randlora_bases_saved_with_peft_model_level_copy(llama, tmp_path):
    """With save_projection=True peft writes the shared bases once per layer and once as base_model.randlora_A/B."""
    targets = ["q_proj", "v_proj"]
    ours = lorakit.apply(llama.make(), lorakit.METHODS.get("randlora").config_class(
        r=4, randlora_alpha=8, projection_prng_key=3, save_projection=True, target_modules=targets))
    lorakit.save_peft(ours, tmp_path / "lorakit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(llama.make(), RandLoraConfig(r=4, randlora_alpha=8, projection_prng_key=3,
                                                              save_projection=True, target_modules=targets))
    theirs.save_pretrained(tmp_path / "peft")
    mine, ref = _keys(tmp_path / "lorakit"), _keys(tmp_path / "peft")
    assert sorted(mine) == sorted(ref)
    for name in ("randlora_A", "randlora_B"):
        assert torch.equal(mine[f"base_model.{name}"], ref[f"base_model.{name}"])
    # and the copy is read back as what it is: no adapted module of its own
    assert sorted(lorakit.load_state(tmp_path / "lorakit").modules()) == sorted(lorakit.adapters(ours))


def test_peft_dora_embedding_refused_by_name(llama, tmp_path):
    """A peft DoRA adapter on an embedding (which lorakit's DoRA does not adapt) is refused naming the tensor."""
    config = LoraConfig(r=4, target_modules=["embed_tokens"], use_dora=True)
    get_peft_model(copy.deepcopy(llama.template), config).save_pretrained(tmp_path)
    with pytest.raises(AdapterFileError, match=r"'lora_embedding_A' tensor, which lorakit's 'dora' adapter does not "
                                               r"have: lorakit's 'dora' adapts Linear, Conv1D only"):
        lorakit.load_peft(llama.make(), tmp_path)
