"""LoRA on fused MoE expert weights (PEFT's ``target_parameters``), against the installed ``peft``.

Tiny Mixtral and Qwen3-MoE (experts stored [E, out, in]) and GPT-OSS (``is_transposed``: [E, in, out], with
biases) built from configs. In both directions (peft saves -> lorakit loads, lorakit saves -> peft loads) the
forward agrees to 1e-5, the safetensors files have the same keys and shapes, and merging equals peft's merge.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import lorakit
from lorakit.tiny_models import MOE_EXPERTS as EXPERTS, tiny_moe

ATOL = 1e-5


_BASES: dict = {}
CASES = {
    "mixtral-experts": ("mixtral", dict(target_modules=["q_proj"], target_parameters=EXPERTS)),
    "mixtral-down-only": ("mixtral", dict(target_modules=[], target_parameters=["experts.down_proj"], r=3)),
    "mixtral-2d-router": ("mixtral", dict(target_modules=["v_proj"], target_parameters=["mlp.gate.weight"])),
    "gpt_oss-experts": ("gpt_oss", dict(target_modules=["q_proj"], target_parameters=EXPERTS, use_rslora=True)),
    "qwen3_moe-experts": ("qwen3_moe", dict(target_modules=None, target_parameters=EXPERTS, lora_alpha=5)),
}


def base(name: str):
    """A fresh copy of the seeded tiny MoE model ``name``."""
    if name not in _BASES:
        _BASES[name] = tiny_moe(name)
    return copy.deepcopy(_BASES[name]).eval()


def _kwargs(case: str) -> dict:
    return {"r": 2, "lora_alpha": 4, **copy.deepcopy(CASES[case][1])}


def _run(model) -> torch.Tensor:
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(input_ids=ids).logits


def _close(a, b, what):
    assert torch.allclose(a, b, atol=ATOL), f"{what}: max difference {(a - b).abs().max().item():.2e}"


def _keys(path) -> dict:
    return {k: tuple(v.shape) for k, v in load_file(str(path / "adapter_model.safetensors")).items()}


@pytest.mark.parametrize("case", CASES)
def test_both_directions(case, perturb, tmp_path):
    model_name = CASES[case][0]
    theirs = get_peft_model(base(model_name), LoraConfig(**_kwargs(case), init_lora_weights=False)).eval()
    theirs.save_pretrained(tmp_path / "peft")
    expected = _run(theirs)
    assert not torch.allclose(expected, _run(base(model_name)), atol=1e-3), "the adapter changes the output"

    ours = lorakit.load_peft(base(model_name), tmp_path / "peft")
    _close(_run(ours), expected, f"{case}: peft's file in lorakit")
    ours_fresh = perturb(lorakit.apply(base(model_name), lorakit.LoRAConfig(**_kwargs(case))), seed=4)
    lorakit.save_peft(ours_fresh, tmp_path / "ours")
    assert _keys(tmp_path / "ours") == _keys(tmp_path / "peft"), "the same safetensors keys and shapes"
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert sorted(saved["target_parameters"]) == sorted(CASES[case][1]["target_parameters"])
    back = PeftModel.from_pretrained(base(model_name), tmp_path / "ours").eval()
    _close(_run(back), _run(ours_fresh), f"{case}: lorakit's file in peft")

    merged_theirs = dict(theirs.merge_and_unload().named_parameters())
    merged_ours = dict(lorakit.merge(ours).named_parameters())
    assert sorted(merged_ours) == sorted(merged_theirs)
    for name, p in merged_theirs.items():
        _close(merged_ours[name], p, f"{case}: merged {name}")


def test_state_delta_and_gradients(perturb):
    model = perturb(lorakit.apply(base("gpt_oss"), lorakit.LoRAConfig(r=2, target_parameters=EXPERTS)))
    state = lorakit.AdapterState.from_model(model)
    assert sorted(state.modules()) == ["model.layers.0.mlp.experts", "model.layers.0.mlp.experts.base_layer",
                                       "model.layers.1.mlp.experts", "model.layers.1.mlp.experts.base_layer"]
    assert state.capabilities.names() == ["mergeable"], "one low-rank pair per expert: merge, not LoRA export"
    before = {n: p.detach().clone() for n, p in base("gpt_oss").named_parameters()}
    experts = model.model.layers[0].mlp.experts
    for path, name in (("model.layers.0.mlp.experts.base_layer", "gate_up_proj"),
                       ("model.layers.0.mlp.experts", "down_proj")):
        w = before[f"model.layers.0.mlp.experts.{name}"]
        assert state.delta(path, w).shape == w.shape
        layer = experts if path.endswith("experts") else experts.base_layer
        torch.testing.assert_close(state.delta(path, w), layer.delta_weight())
    ids = torch.randint(0, 64, (2, 6))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in lorakit.trainable_parameters(model).items()}
    assert len(grads) == 8 and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert all(p.grad is None for n, p in model.named_parameters() if n not in grads), "the base stays frozen"


def test_two_adapters_on_the_experts_as_peft(tmp_path):
    kwargs = dict(r=2, lora_alpha=4, target_modules=[], target_parameters=EXPERTS, init_lora_weights=False)
    theirs = get_peft_model(base("mixtral"), LoraConfig(**copy.deepcopy(kwargs))).eval()
    theirs.add_adapter("b", LoraConfig(**{**copy.deepcopy(kwargs), "r": 3}))
    theirs.save_pretrained(tmp_path)
    ours = lorakit.load_peft(base("mixtral"), tmp_path)
    lorakit.load_peft(ours, tmp_path, adapter_name="b")
    _close(_run(ours), _run(theirs), "'default'")
    theirs.set_adapter("b"), lorakit.set_adapter(ours, "b")
    _close(_run(ours), _run(theirs), "'b'")
    theirs.base_model.set_adapter(["default", "b"]), lorakit.set_adapter(ours, ["default", "b"])
    _close(_run(ours), _run(theirs), "both active")
    with pytest.raises(ValueError, match="parameter adapters"):
        ours(input_ids=torch.zeros(2, 3, dtype=torch.long), adapter_names=["b", "default"])
    lorakit.save_peft(ours, tmp_path / "again")
    for folder in ("", "b"):
        assert _keys(tmp_path / "again" / folder) == _keys(tmp_path / folder), f"keys of '{folder or 'default'}'"


def test_refusals(tmp_path):
    with pytest.raises(TypeError, match="method 'dora' cannot adapt parameters.*methods that can: lora"):
        lorakit.apply(base("mixtral"), lorakit.DoRAConfig(target_modules=["q_proj"], target_parameters=EXPERTS))
    from lorakit.methods.lora_xs import LoRAXSConfig

    with pytest.raises(TypeError, match="method 'lora_xs' cannot adapt parameters"):
        lorakit.apply(base("mixtral"), LoRAXSConfig(target_modules=["q_proj"], target_parameters=EXPERTS))
    with pytest.raises(ValueError, match="does not work with lora_dropout"):
        lorakit.apply(base("mixtral"), lorakit.LoRAConfig(target_parameters=EXPERTS, lora_dropout=0.1))
    with pytest.raises(ValueError, match="matches no parameter"):
        lorakit.apply(base("mixtral"), lorakit.LoRAConfig(target_parameters=["experts.up_proj"]))
    with pytest.raises(ValueError, match="per-parameter ranks are not supported"):
        lorakit.apply(base("mixtral"), lorakit.LoRAConfig(target_parameters=EXPERTS, rank_pattern={"down_proj": 4}))
    model = lorakit.apply(base("mixtral"), lorakit.LoRAConfig(target_parameters=["experts.down_proj"]))
    assert [type(m).__name__ for m in lorakit.adapters(model).values()] == ["LoRAParameter"] * 2
    # a method lorakit has without parameter targets, in a file that sets them: refused by name
    lorakit.save_state(lorakit.AdapterState(lorakit.METHODS.get("bone").config_class(target_modules=["q_proj"]), {}),
                       tmp_path / "bone")
    file = tmp_path / "bone" / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "target_parameters": EXPERTS}))
    with pytest.raises(lorakit.AdapterFileError, match="target_parameters.*method 'bone'.*parameter targets work "
                                                       "with LoRA"):
        lorakit.load_state(tmp_path / "bone")


def test_bfloat16_as_peft(tmp_path):
    """A bf16 model: fp32 factors, cast to bf16 and folded in bf16, as PEFT does: the same logits, bit for bit."""
    kwargs = dict(r=2, lora_alpha=4, target_modules=[], target_parameters=EXPERTS, init_lora_weights=False)
    theirs = get_peft_model(base("mixtral").to(torch.bfloat16), LoraConfig(**copy.deepcopy(kwargs))).eval()
    theirs.save_pretrained(tmp_path)
    ours = lorakit.load_peft(base("mixtral").to(torch.bfloat16), tmp_path)
    experts = ours.model.layers[0].mlp.experts
    assert experts.lora_A.weight.dtype == torch.float32 and experts.base_layer.lora_B.weight.dtype == torch.float32
    assert torch.equal(_run(ours), _run(theirs)), "the same bf16 operations give the same logits"
    lorakit.save_peft(ours, tmp_path / "ours")
    saved = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert {k: v.dtype for k, v in saved.items()} == {k: v.dtype for k, v in load_file(
        str(tmp_path / "adapter_model.safetensors")).items()}


def test_tiny_moe_is_seeded_and_leaves_the_random_state_alone():
    before = torch.random.get_rng_state()
    a, b = tiny_moe("mixtral", seed=1), tiny_moe("mixtral", seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(tiny_moe("mixtral", seed=2).lm_head.weight, a.lm_head.weight)
    with pytest.raises(ValueError, match="unknown kind 'llama'"):
        tiny_moe("llama")
