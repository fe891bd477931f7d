"""Targeting follows PEFT's rules: checked against peft's own ``check_target_module_exists`` and get_peft_model."""
from __future__ import annotations

import copy

import pytest
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists

import lorakit
from lorakit.core.targets import is_module_to_save, is_target, layer_index, matches

PATHS = [
    "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj",
    "model.layers.1.mlp.experts.0.up_proj", "model.layers.0.mlp.experts.1.up_proj", "layers.1.q_proj",
    "blocks.0.layers.1.q_proj", "transformer.h.1.attn.q_proj", "classifier.dense", "classifier.out_proj",
    "model.q_proj", "xq_proj", "encoder.layer.2.attention.self.query", "decoder.layers.0.q_proj", "q_proj",
]
CONFIGS = [
    dict(target_modules=["q_proj", "up_proj", "dense"]),
    dict(target_modules=["model.layers.0.self_attn.q_proj", "out_proj"]),
    dict(target_modules=r".*\.layers\.1\..*_proj"),
    dict(target_modules=r"q_proj"),
    dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[1]),
    dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[0]),
    dict(target_modules=["q_proj", "up_proj"], layers_to_transform=1, layers_pattern="layers"),
    dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[0, 1], layers_pattern=["layers", "h"]),
    dict(target_modules=["query", "q_proj"], layers_to_transform=[2], layers_pattern="layer"),
    dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[]),
    dict(target_modules=["q_proj", "dense", "out_proj"], modules_to_save=["classifier"]),
    dict(target_modules=r".*q_proj", exclude_modules=r"model\..*"),
    dict(target_modules=["q_proj", "up_proj"], exclude_modules=["layers.1.q_proj", "experts.0.up_proj"]),
]


def peft_says(config: LoraConfig, path: str) -> bool:
    found = check_target_module_exists(config, path)
    return bool(found) and not isinstance(found, _ExcludedModule)


@pytest.mark.parametrize("kwargs", CONFIGS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_is_target_agrees_with_peft(kwargs):
    ours, theirs = lorakit.LoRAConfig(**copy.deepcopy(kwargs)), LoraConfig(**copy.deepcopy(kwargs))
    disagree = {p: (is_target(p, ours), peft_says(theirs, p)) for p in PATHS if is_target(p, ours) != peft_says(theirs, p)}
    assert not disagree, f"(lorakit, peft) per path: {disagree}"
    assert any(is_target(p, ours) for p in PATHS), "each case should select something"


@pytest.mark.parametrize("model_name, kwargs", [
    ("llama", dict(target_modules="all-linear")),
    ("gpt2", dict(target_modules="all-linear")),
    ("bert", dict(target_modules="all-linear", task_type="SEQ_CLS")),
    ("bert", dict(target_modules=["dense", "query"], modules_to_save=["classifier"])),
    ("llama", dict(target_modules=["q_proj", "down_proj", "embed_tokens"], layers_to_transform=[1])),
    ("llama", dict(target_modules=r"model\.layers\.0\.(self_attn|mlp)\.(q|up)_proj")),
    ("llama", dict(target_modules="all-linear", exclude_modules=["o_proj", "model.layers.1.mlp.up_proj"])),
])
def test_wrapped_modules_agree_with_peft(model_name, kwargs, request):
    tiny = request.getfixturevalue(model_name)
    ours = set(lorakit.adapters(lorakit.apply(tiny.make(), lorakit.LoRAConfig(**copy.deepcopy(kwargs)))))
    peft_model = get_peft_model(tiny.make(), LoraConfig(**copy.deepcopy(kwargs)))
    theirs = {p.removeprefix("base_model.model.") for p, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    assert ours == theirs


def test_list_entries_match_whole_segments():
    assert matches("model.layers.0.q_proj", ["q_proj"]) and matches("q_proj", ["q_proj"])
    assert not matches("model.layers.0.xq_proj", ["q_proj"])
    assert matches("model.layers.0.q_proj", ["layers.0.q_proj"])
    assert not matches("model.layers.0.q_proj", "q_proj"), "a string is a regex matched against the whole path"
    assert not matches("anything", None) and not matches("anything", [])


def test_layer_index_is_the_first_numbered_segment():
    assert layer_index("model.layers.3.mlp.experts.7.up_proj", None) == 3
    assert layer_index("model.layers.3.mlp.experts.7.up_proj", "experts") == 7
    assert layer_index("layers.2.q_proj", "layers") == 2
    assert layer_index("q_proj", None) is None


def test_modules_to_save_uses_peft_suffix_rule():
    assert is_module_to_save("classifier", ["classifier"]) and is_module_to_save("pre_classifier", ["classifier"])
    assert not is_module_to_save("classifier.dense", ["classifier"]) and not is_module_to_save("", ["classifier"])


@pytest.mark.parametrize("kwargs", [
    dict(target_modules=".*q_proj", layers_to_transform=[0]),
    dict(target_modules=".*q_proj", layers_pattern="layers", layers_to_transform=[0]),
    dict(target_modules=["q_proj"], layers_pattern="layers"),
])
def test_configs_peft_refuses_are_refused(kwargs):
    with pytest.raises(ValueError):
        LoraConfig(**kwargs)
    with pytest.raises(ValueError, match="layers_"):
        lorakit.LoRAConfig(**kwargs)
