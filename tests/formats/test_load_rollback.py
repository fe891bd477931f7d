"""A load that is refused part-way leaves the model exactly as it was: no adapter layers, no changed vocabulary,
the same outputs, and the adapters it had before untouched."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit.core.adapter import AdapterShapeError

IDS = torch.tensor([[1, 5, 42, 7, 99]])


def llama(intermediate: int = 32, tied: bool = False, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=intermediate,
                                            num_hidden_layers=1, num_attention_heads=2, tie_word_embeddings=tied)).eval()


def snapshot(model: nn.Module):
    with torch.no_grad():
        out = model(input_ids=IDS).logits
    return ({k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()], out)


def assert_unchanged(model: nn.Module, before) -> None:
    state, types, out = before
    assert [type(m) for m in model.modules()] == types
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, out)


def saved(tmp_path, model: nn.Module, targets, name="a") -> str:
    lorakit.apply(model, lorakit.LoRAConfig(r=4, target_modules=targets, init_lora_weights=False))
    return str(lorakit.save_peft(model, tmp_path / name))


def test_a_fresh_model_is_left_bare_when_a_later_module_does_not_fit(tmp_path):
    path = saved(tmp_path, llama(intermediate=48), ["q_proj", "down_proj"])
    model = llama()  # same architecture, another FFN width: q_proj fits, down_proj does not
    before = snapshot(model)
    with pytest.raises((AdapterShapeError, lorakit.AdapterFileError)):
        lorakit.load_peft(model, path)
    assert not lorakit.adapters(model)
    assert_unchanged(model, before)


def test_the_vocabulary_resize_is_undone_when_the_load_fails(tmp_path):
    trained = llama(intermediate=48, tied=True)
    with torch.random.fork_rng(devices=[]):
        trained.resize_token_embeddings(108)
    path = saved(tmp_path, trained, ["embed_tokens", "down_proj"])
    model = llama(tied=True)  # the file carries the 108-row embeddings, so the load resizes before down_proj fails
    before = snapshot(model)
    with pytest.raises((AdapterShapeError, lorakit.AdapterFileError)):
        lorakit.load_peft(model, path)
    assert model.get_input_embeddings().num_embeddings == 100
    assert_unchanged(model, before)


def test_an_added_adapter_that_does_not_fit_leaves_the_others(tmp_path):
    good = saved(tmp_path, llama(), ["q_proj", "down_proj"], name="good")
    bad = saved(tmp_path, llama(intermediate=48), ["q_proj", "down_proj"], name="bad")
    model = lorakit.load_peft(llama(), good)
    before = snapshot(model)
    with pytest.raises((AdapterShapeError, lorakit.AdapterFileError)):
        lorakit.load_peft(model, bad, adapter_name="other")
    assert lorakit.adapter_names(model) == ["default"]
    assert_unchanged(model, before)
