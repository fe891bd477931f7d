"""apply/merge/unwrap/trainable_parameters, with counts compared to peft's get_nb_trainable_parameters."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

import lorakit

COUNT_CASES = [
    ("llama", dict(target_modules=["q_proj", "v_proj"])),
    ("llama", dict(target_modules="all-linear", use_dora=True)),
    ("llama", dict(target_modules=["embed_tokens", "q_proj"], rank_pattern={"embed_tokens": 2})),
    ("llama", dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[1], modules_to_save=["lm_head"])),
    ("gpt2", dict(target_modules="all-linear")),
    ("bert", dict(target_modules=["query", "value"], bias="all", task_type="SEQ_CLS")),
    ("bert", dict(target_modules=["query", "value", "dense"], bias="lora_only", modules_to_save=["classifier"])),
    ("bert", dict(target_modules="all-linear", task_type="SEQ_CLS")),
    ("minilm", dict(target_modules=["query", "value"], r=8, task_type="SEQ_CLS")),
]


@pytest.mark.parametrize("model_name, kwargs", COUNT_CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(COUNT_CASES)])
def test_trainable_counts_equal_peft(model_name, kwargs, request):
    tiny = request.getfixturevalue(model_name)
    kwargs = dict(r=4, **kwargs) if "r" not in kwargs else kwargs
    cls = lorakit.DoRAConfig if kwargs.get("use_dora") else lorakit.LoRAConfig
    ours = lorakit.apply(tiny.make(), cls(**copy.deepcopy(kwargs)))
    trainable = sum(p.numel() for p in lorakit.trainable_parameters(ours).values())
    total = sum(p.numel() for p in ours.parameters())
    assert (trainable, total) == get_peft_model(tiny.make(), LoraConfig(**copy.deepcopy(kwargs))).get_nb_trainable_parameters()


def test_apply_freezes_base_and_unwrap_restores_it(llama):
    model = llama.make()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lorakit.apply(model, lorakit.LoRAConfig(r=4, target_modules=["q_proj"]))
    names = set(lorakit.trainable_parameters(model))
    assert names and all(".lora_" in n for n in names)
    plain = lorakit.unwrap(model)
    after = dict(plain.named_parameters())
    assert sorted(after) == sorted(before) and all(torch.equal(after[n], before[n]) for n in before)
    with pytest.raises(ValueError, match="no lorakit adapter to merge"):
        lorakit.merge(plain)
    with pytest.raises(ValueError, match=r"call lorakit.apply\(model, config\) first"):
        lorakit.config_of(plain)


def test_apply_resolves_and_records_config(gpt2, bert):
    model = lorakit.apply(gpt2.make(), lorakit.LoRAConfig(target_modules="all-linear"))
    config = lorakit.config_of(model)
    assert config.fan_in_fan_out and {p.rsplit(".", 1)[-1] for p in config.target_modules} == {"c_attn", "c_fc", "c_proj"}
    assert sorted(config.target_modules) == sorted(lorakit.adapters(model))  # full paths, as peft saves them
    cls_model = lorakit.apply(bert.make(), lorakit.LoRAConfig(target_modules=["query"], task_type="SEQ_CLS"))
    assert lorakit.config_of(cls_model).modules_to_save == ["classifier"]
    assert isinstance(cls_model.classifier, lorakit.ModulesToSave)


def test_apply_refuses_non_config_and_layers_it_cannot_wrap(llama):
    with pytest.raises(TypeError, match="expected an adapter config"):
        lorakit.apply(llama.make(), {"r": 4})
    with pytest.raises(TypeError, match="module 'model.embed_tokens' is a Embedding; method 'dora' adapts"):
        lorakit.apply(llama.make(), lorakit.DoRAConfig(target_modules=["embed_tokens"]))
