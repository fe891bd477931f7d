"""Parity with the installed ``peft``: files written by one load in the other with the same outputs (atol 1e-5).

Each case is checked in both directions: lorakit ``save_peft`` -> ``peft.PeftModel.from_pretrained``, and peft
``save_pretrained`` (non-zero B) -> ``lorakit.load_peft``. Both sides must also adapt the same modules.
"""
from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

import lorakit

ATOL = 1e-5

CASES = {
    "gpt2-conv1d": ("gpt2", dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    "gpt2-all-linear": ("gpt2", dict(target_modules="all-linear", fan_in_fan_out=True)),
    "llama-list": ("llama", dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
    "llama-regex": ("llama", dict(target_modules=r".*\.layers\.1\.(self_attn\.(q|v)|mlp\.down)_proj")),
    "llama-all-linear": ("llama", dict(target_modules="all-linear")),
    "llama-patterns": ("llama", dict(
        target_modules=["q_proj", "v_proj", "up_proj"],
        rank_pattern={"^model.layers.0.self_attn.q_proj": 2, "v_proj": 6},
        alpha_pattern={"^model.layers.1.mlp.up_proj": 32, "q_proj": 3},
    )),
    "llama-rslora": ("llama", dict(target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16, use_rslora=True)),
    "llama-dora": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)),
    "gpt2-dora": ("gpt2", dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_dora=True)),
    "llama-embedding": ("llama", dict(target_modules=["embed_tokens", "q_proj"], rank_pattern={"embed_tokens": 2})),
    "bert-embedding": ("bert", dict(target_modules=["word_embeddings", "query"])),
    "llama-layers-pattern": ("llama", dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1],
                                           layers_pattern="layers")),
    "llama-layers-int": ("llama", dict(target_modules=["q_proj", "v_proj", "up_proj"], layers_to_transform=0)),
    "llama-exclude-list": ("llama", dict(target_modules=["q_proj", "v_proj", "up_proj"],
                                         exclude_modules=["model.layers.0.self_attn.q_proj", "up_proj"])),
    "llama-exclude-regex": ("llama", dict(target_modules="all-linear", exclude_modules=r".*\.layers\.0\..*")),
    "bert-seq-cls-head": ("bert", dict(target_modules=["query", "value"], task_type="SEQ_CLS",
                                       modules_to_save=["classifier"])),
    "bert-bias-all": ("bert", dict(target_modules=["query", "value"], bias="all", task_type="SEQ_CLS")),
    "bert-bias-lora-only": ("bert", dict(target_modules=["query", "value", "dense"], bias="lora_only")),
    "minilm-seq-cls": ("minilm", dict(target_modules=["query", "value"], task_type="SEQ_CLS")),
    "minilm-dora": ("minilm", dict(target_modules=["query", "key"], use_dora=True, task_type="SEQ_CLS")),
}


def _kwargs(case: str) -> dict:
    kwargs = dict(r=4, lora_alpha=8)
    kwargs.update(copy.deepcopy(CASES[case][1]))  # peft's configs mutate the lists they are given
    return kwargs


def lorakit_config(kwargs: dict) -> lorakit.LoRAConfig:
    return (lorakit.DoRAConfig if kwargs.get("use_dora") else lorakit.LoRAConfig)(**kwargs)


def peft_wrapped(model) -> set[str]:
    """Paths (relative to the base model) of the layers peft put a LoRA adapter on."""
    return {p.removeprefix("base_model.model.") for p, m in model.named_modules() if isinstance(m, LoraLayer)}


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    err = (a - b).abs().max().item()
    assert torch.allclose(a, b, atol=ATOL, rtol=0), f"{what}: max abs difference {err:.3g}"


def assert_changed(out: torch.Tensor, base_out: torch.Tensor) -> None:
    assert (out - base_out).abs().max() > 1e-3, "the adapter must change the output for the comparison to mean anything"


@pytest.mark.parametrize("case", sorted(CASES))
def test_lorakit_to_peft(case, request, perturb, tmp_path):
    tiny = request.getfixturevalue(CASES[case][0])
    model = perturb(lorakit.apply(tiny.make(), lorakit_config(_kwargs(case))))
    out = tiny.run(model)
    assert_changed(out, tiny.run(tiny.make()))
    lorakit.save_peft(model, tmp_path)

    loaded = PeftModel.from_pretrained(tiny.make(), tmp_path)
    assert peft_wrapped(loaded) == set(lorakit.adapters(model))
    assert_close(tiny.run(loaded), out, f"{case}: peft output of a lorakit adapter")


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_to_lorakit(case, request, perturb, tmp_path):
    tiny = request.getfixturevalue(CASES[case][0])
    model = perturb(get_peft_model(tiny.make(), LoraConfig(init_lora_weights=False, **_kwargs(case))))
    out = tiny.run(model)
    assert_changed(out, tiny.run(tiny.make()))
    model.save_pretrained(tmp_path)

    loaded = lorakit.load_peft(tiny.make(), tmp_path)
    assert set(lorakit.adapters(loaded)) == peft_wrapped(model)
    assert_close(tiny.run(loaded), out, f"{case}: lorakit output of a peft adapter")


def test_peft_sub_folder_adapter(llama, perturb, tmp_path):
    model = get_peft_model(llama.make(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=6, target_modules=["v_proj", "up_proj"], init_lora_weights=False))
    perturb(model)  # only the active adapter trains: perturb each in turn
    model.set_adapter("other")
    perturb(model, seed=1)
    out_other = llama.run(model)
    model.set_adapter("default")
    out_default = llama.run(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "other" / "adapter_config.json").is_file()

    other = lorakit.load_peft(llama.make(), tmp_path, adapter_name="other")
    assert sorted(p.rsplit(".", 1)[-1] for p in lorakit.adapters(other)) == ["up_proj", "up_proj", "v_proj", "v_proj"]
    assert_close(llama.run(other), out_other, "the 'other' adapter")
    assert_close(llama.run(lorakit.load_peft(llama.make(), tmp_path)), out_default, "the default adapter")


def test_lorakit_sub_folder_adapter(llama, perturb, tmp_path):
    first = perturb(lorakit.apply(llama.make(), lorakit.LoRAConfig(r=4, target_modules=["q_proj"])))
    second = perturb(lorakit.apply(llama.make(), lorakit.LoRAConfig(r=2, target_modules=["k_proj"])), seed=1)
    lorakit.save_peft(second, tmp_path, adapter_name="other")
    lorakit.save_peft(first, tmp_path)  # the default adapter written after: the sub-folder must survive

    loaded = PeftModel.from_pretrained(llama.make(), tmp_path)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    assert_close(llama.run(loaded), llama.run(first), "peft, default adapter")
    loaded.set_adapter("other")
    assert_close(llama.run(loaded), llama.run(second), "peft, adapter 'other'")
    via_subfolder = PeftModel.from_pretrained(llama.make(), tmp_path, subfolder="other")
    assert_close(llama.run(via_subfolder), llama.run(second), "peft, subfolder='other'")


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("model_name", ["gpt2", "llama"])
def test_merged_model(model_name, use_dora, request, perturb, tmp_path):
    tiny = request.getfixturevalue(model_name)
    config = dict(r=4, lora_alpha=8, target_modules=tiny.targets[:3], use_dora=use_dora, init_lora_weights=False)
    model = perturb(get_peft_model(tiny.make(), LoraConfig(**config)))
    model.save_pretrained(tmp_path)
    ours = lorakit.merge(lorakit.load_peft(tiny.make(), tmp_path))
    theirs = model.merge_and_unload()

    mine, ref = ours.state_dict(), theirs.state_dict()
    assert sorted(mine) == sorted(ref)
    for key in ref:
        assert_close(mine[key], ref[key], f"merged weight {key}")
    assert_close(tiny.run(ours), tiny.run(theirs), f"{model_name}: merged outputs")


@pytest.mark.parametrize("case", ["gpt2-conv1d", "llama-patterns", "llama-rslora", "llama-embedding"])
def test_state_delta_equals_peft_delta_weight(case, request, perturb, tmp_path):
    tiny = request.getfixturevalue(CASES[case][0])
    model = perturb(get_peft_model(tiny.make(), LoraConfig(init_lora_weights=False, **_kwargs(case))))
    model.save_pretrained(tmp_path)
    state = lorakit.load_state(tmp_path)  # no model involved

    layers = {p.removeprefix("base_model.model."): m for p, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert sorted(state.modules()) == sorted(layers)
    for path, layer in layers.items():
        ref = layer.get_delta_weight("default")
        got = state.delta(path, layer.get_base_layer().weight.detach())
        assert got.shape == layer.get_base_layer().weight.shape
        assert_close(got, ref, f"{case}: delta of {path}")


@pytest.mark.parametrize("model_name", ["gpt2", "llama"])
def test_dora_state_delta_equals_peft_merge(model_name, request, perturb, tmp_path):
    """PEFT's get_delta_weight is the LoRA part only; DoRA's full update is what its merge adds to W."""
    tiny = request.getfixturevalue(model_name)
    config = LoraConfig(r=4, target_modules=tiny.targets[:2], use_dora=True, init_lora_weights=False)
    model = perturb(get_peft_model(tiny.make(), config))
    model.save_pretrained(tmp_path)
    state = lorakit.load_state(tmp_path)
    base = dict(tiny.template.named_parameters())
    merged = dict(model.merge_and_unload().named_parameters())
    assert state.modules()
    for path in state.modules():
        weight = base[f"{path}.weight"].detach()
        assert_close(state.delta(path, weight), merged[f"{path}.weight"].detach() - weight, f"DoRA delta of {path}")


FULL_CONFIG = dict(
    r=6, lora_alpha=12, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "up_proj"],
    exclude_modules=["model.layers.1.self_attn.v_proj"], layers_to_transform=[0, 1], layers_pattern="layers",
    rank_pattern={"^model.layers.0.self_attn.q_proj": 2}, alpha_pattern={"up_proj": 3}, use_rslora=True,
    bias="lora_only", modules_to_save=["lm_head"], init_lora_weights="gaussian", task_type="CAUSAL_LM",
)


def _normal(value):
    """Compare peft's set-valued fields with lorakit's lists (order carries no meaning), enums with strings."""
    if isinstance(value, (set, frozenset, list)):
        return sorted(value)
    return value.value if hasattr(value, "value") and not isinstance(value, (int, float)) else value


@pytest.mark.parametrize("config_class", [lorakit.LoRAConfig, lorakit.DoRAConfig])
def test_config_file_reads_in_peft(config_class, llama, tmp_path):
    config = config_class(**FULL_CONFIG)
    lorakit.save_peft(lorakit.apply(llama.make(), config), tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generic = PeftConfig.from_pretrained(tmp_path)
        lora = LoraConfig.from_pretrained(tmp_path)
    assert not [str(w.message) for w in caught]
    for parsed in (generic, lora):
        assert isinstance(parsed, LoraConfig)
        for name, value in config.to_dict().items():
            if name == "inference_mode":
                continue  # files are written for inference, as peft writes them
            assert _normal(getattr(parsed, name)) == _normal(value), f"field {name}"
    assert lora.use_dora is (config_class is lorakit.DoRAConfig)


def test_peft_config_file_reads_in_lorakit(llama, tmp_path):
    config = LoraConfig(**copy.deepcopy(FULL_CONFIG))
    get_peft_model(llama.make(), config).save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = lorakit.load_state(tmp_path)
    assert not [str(w.message) for w in caught]
    assert type(state.config) is lorakit.LoRAConfig
    for name, value in state.config.to_dict().items():
        if name != "inference_mode":
            assert _normal(getattr(config, name)) == _normal(value), f"field {name}"
    assert state.modules_to_save and list(state.modules_to_save) == ["lm_head"]


def test_peft_adapter_with_other_initialiser(llama, perturb, tmp_path):
    model = perturb(get_peft_model(llama.make(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="orthogonal")))
    model.save_pretrained(tmp_path)
    assert_close(llama.run(lorakit.load_peft(llama.make(), tmp_path)), llama.run(model), "orthogonal-initialised adapter")


def test_peft_version_is_the_installed_one():
    assert peft.__version__ == "0.21.2", "these parity tests pin peft 0.21.2 (pyproject's dev extra)"


def test_distilbert_pre_classifier_saved_in_full(perturb, tmp_path):
    """PEFT's modules_to_save matches by plain suffix: SEQ_CLS's 'classifier' also takes 'pre_classifier'."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    base = DistilBertForSequenceClassification(
        DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=2, hidden_dim=64, num_labels=3)).eval()
    x = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    model = perturb(get_peft_model(copy.deepcopy(base), LoraConfig(task_type="SEQ_CLS", target_modules=["q_lin"],
                                                                    r=2, init_lora_weights=False)))
    model.save_pretrained(tmp_path / "peft")
    ours = lorakit.load_peft(copy.deepcopy(base), tmp_path / "peft")
    assert sorted(lorakit.AdapterState.from_model(ours).modules_to_save) == ["classifier", "pre_classifier"]
    with torch.no_grad():
        assert_close(ours(x).logits, model(x).logits, "DistilBERT, peft -> lorakit")
        lorakit.save_peft(ours, tmp_path / "lorakit")
        back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lorakit")
        assert_close(back(x).logits, model(x).logits, "DistilBERT, lorakit -> peft")
