"""Adapters trained on a resized vocabulary (``resize_token_embeddings``) reload onto a fresh base, both ways.

As peft's ``save_embedding_layers="auto"``: when an embedding is targeted, or the vocabulary differs from the base
model's config.json, the embedding weights go into the file. lorakit resizes a fresh base on load when the file
carries them (and the head is tied or saved), and otherwise says what to do; peft loads lorakit's files once the
base is resized, as it asks of its own.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

import lorakit

VOCAB, NEW = 100, 108
_BASES: dict = {}


def base(tied: bool) -> nn.Module:
    if tied not in _BASES:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        _BASES[tied] = LlamaForCausalLM(LlamaConfig(
            vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            tie_word_embeddings=tied)).eval()
    return copy.deepcopy(_BASES[tied])


def resized(tied: bool) -> nn.Module:
    model = base(tied)
    torch.manual_seed(1)
    model.resize_token_embeddings(NEW)  # mean-resizing draws the new rows at random
    return model


IDS = torch.tensor([[1, 5, NEW - 1, 42, NEW - 3, 7]])  # new tokens included


def run(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def close(a, b, what):
    err = (a - b).abs().max().item()
    assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=0), f"{what}: max abs difference {err:.3g}"


TARGETS = ["embed_tokens", "q_proj"]


def saved_keys(path) -> dict:
    return {k: tuple(v.shape) for k, v in load_file(str(path / "adapter_model.safetensors")).items()}


def test_lorakit_saves_what_peft_saves(tmp_path, perturb):
    ours = perturb(lorakit.apply(resized(True), lorakit.LoRAConfig(r=2, target_modules=TARGETS)))
    lorakit.save_peft(ours, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(resized(True), LoraConfig(r=2, target_modules=TARGETS, init_lora_weights=False))
        theirs.save_pretrained(tmp_path / "theirs")
    assert saved_keys(tmp_path / "ours") == saved_keys(tmp_path / "theirs")
    assert saved_keys(tmp_path / "ours")["base_model.model.model.embed_tokens.base_layer.weight"] == (NEW, 16)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_lorakit_adapter_reloads_in_lorakit_and_peft(tied, tmp_path, perturb):
    model = perturb(lorakit.apply(resized(tied), lorakit.LoRAConfig(r=2, target_modules=TARGETS)))
    out = run(model)
    lorakit.save_peft(model, tmp_path)
    if tied:  # the head is the embedding: the fresh base is resized on load and every row comes from the file
        close(run(lorakit.load_peft(base(tied), tmp_path)), out, "lorakit, fresh base")
    else:  # the untied head's new rows are in no file (peft saves the targeted layers only): refuse to invent them
        with pytest.raises(lorakit.AdapterShapeError, match=f"'lm_head' is not tied.*resize_token_embeddings\\({NEW}\\)"):
            lorakit.load_peft(base(tied), tmp_path)
    close(run(lorakit.load_peft(resized(tied), tmp_path)), out, "lorakit, base resized as in training")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(resized(tied), tmp_path)
    close(run(theirs), out, "peft, base resized as it requires")


def test_peft_adapter_reloads_in_lorakit_on_a_fresh_base(tmp_path, perturb):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = perturb(get_peft_model(resized(True), LoraConfig(r=2, target_modules=TARGETS, init_lora_weights=False)))
        theirs.save_pretrained(tmp_path)
    out = run(theirs)
    ours = lorakit.load_peft(base(True), tmp_path)
    assert ours.get_input_embeddings().base_layer.num_embeddings == NEW
    close(run(ours), out, "lorakit output of a peft adapter on a resized vocabulary")


def test_without_the_embedding_weights_the_error_says_what_to_do(tmp_path, perturb):
    model = perturb(lorakit.apply(resized(True), lorakit.LoRAConfig(r=2, target_modules=TARGETS)))
    lorakit.save_peft(model, tmp_path, save_embedding_layers=False)
    assert not any("base_layer" in k for k in saved_keys(tmp_path))
    with pytest.raises(lorakit.AdapterShapeError, match=f"vocabulary of {NEW} tokens, the model {VOCAB}.*"
                                                        f"resize_token_embeddings\\({NEW}\\)"):
        lorakit.load_peft(base(True), tmp_path)


def test_a_resize_is_detected_against_the_base_models_config_when_embeddings_are_not_targeted(tmp_path, perturb):
    base(True).save_pretrained(tmp_path / "base")
    model = resized(True)
    model.config._name_or_path = str(tmp_path / "base")
    model = perturb(lorakit.apply(model, lorakit.LoRAConfig(r=2, target_modules=["q_proj"])))
    out = run(model)
    lorakit.save_peft(model, tmp_path / "adapter")
    keys = saved_keys(tmp_path / "adapter")
    assert keys["base_model.model.model.embed_tokens.weight"] == (NEW, 16) and keys["base_model.model.lm_head.weight"] == (NEW, 16)
    close(run(lorakit.load_peft(base(True), tmp_path / "adapter")), out, "lorakit, fresh base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        close(run(PeftModel.from_pretrained(resized(True), tmp_path / "adapter")), out, "peft, resized base")
