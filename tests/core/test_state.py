"""AdapterState: the adapter as data. Round trips through files and models, and its tensor maps."""
from __future__ import annotations

import pytest
import torch

import lorakit

CONFIG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], rank_pattern={"v_proj": 2},
              modules_to_save=["lm_head"])


@pytest.fixture(params=["lora", "dora"])
def state(request, llama, perturb) -> lorakit.AdapterState:
    config = dict(CONFIG)
    if request.param == "dora":
        config["target_modules"] = ["q_proj", "v_proj"]  # DoRA wraps Linear layers only
    cls = lorakit.LoRAConfig if request.param == "lora" else lorakit.DoRAConfig
    return lorakit.AdapterState.from_model(perturb(lorakit.apply(llama.make(), cls(**config))))


def assert_same(a: lorakit.AdapterState, b: lorakit.AdapterState, exact: bool = True) -> None:
    assert a.config == b.config
    for group in ("tensors", "modules_to_save", "base_tensors"):
        x, y = getattr(a, group), getattr(b, group)
        assert sorted(x) == sorted(y), group
    for group in ("tensors", "modules_to_save"):
        for path, tensors in getattr(a, group).items():
            other = getattr(b, group)[path]
            assert sorted(tensors) == sorted(other)
            for key, t in tensors.items():
                assert t.dtype == other[key].dtype and (torch.equal(t, other[key]) if exact else torch.allclose(t, other[key]))


def test_save_state_load_state_round_trip(state, tmp_path):
    path = lorakit.save_state(state, tmp_path / "a")
    lorakit.save_state(state, tmp_path / "a", adapter_name="b")
    for loaded in (lorakit.load_state(path), lorakit.load_state(tmp_path / "a", adapter_name="b")):
        assert loaded.config.inference_mode, "files are written for inference, as peft writes them"
        assert_same(loaded.replace(inference_mode=False), state)


def test_from_model_load_into_round_trip(state, llama):
    model = state.load_into(llama.make())
    assert_same(lorakit.AdapterState.from_model(model), state)
    assert sorted(lorakit.adapters(model)) == sorted(state.modules())
    assert lorakit.config_of(model) == state.config


def test_from_model_is_detached_copy(llama):
    model = lorakit.apply(llama.make(), lorakit.LoRAConfig(r=4, target_modules=["q_proj"]))
    state = lorakit.AdapterState.from_model(model)
    tensor = state.tensors["model.layers.0.self_attn.q_proj"]["lora_B.weight"]
    assert not tensor.requires_grad
    tensor.add_(1.0)
    assert lorakit.adapters(model)["model.layers.0.self_attn.q_proj"].lora_B.weight.abs().sum() == 0


def test_map_to_clone(state):
    doubled = state.map(lambda t: t * 2)
    path = state.modules()[0]
    key = next(iter(state.tensors[path]))
    assert torch.equal(doubled.tensors[path][key], state.tensors[path][key] * 2)
    assert torch.equal(doubled.modules_to_save["lm_head"]["weight"], state.modules_to_save["lm_head"]["weight"] * 2)
    assert doubled.config is state.config

    wide = state.to(torch.float64)
    assert all(t.dtype == torch.float64 for d in wide.tensors.values() for t in d.values())
    assert_same(wide.to(torch.float32), state)

    copy = state.clone()
    assert_same(copy, state)
    copy.tensors[path][key].add_(1.0)
    assert not torch.equal(copy.tensors[path][key], state.tensors[path][key]), "clone must not share storage"


def test_replace_and_num_parameters(state, llama):
    assert state.replace(lora_alpha=32).config.lora_alpha == 32 and state.config.lora_alpha == 8
    model = state.load_into(llama.make())
    assert state.num_parameters() == sum(p.numel() for p in lorakit.trainable_parameters(model).values())


def test_delta_and_low_rank_per_module(state, llama):
    base = dict(llama.template.named_parameters())
    model = state.load_into(llama.make())
    for path, layer in lorakit.adapters(model).items():
        weight = base[f"{path}.weight"].detach()
        delta = state.delta(path, weight)
        assert torch.allclose(delta, layer.delta_weight(), atol=1e-6), path
        low = state.low_rank(path)
        if state.config.method_name == "dora":
            assert low is None, "DoRA's update is not low-rank"
            continue
        a, b, scale = low
        dense = (b @ a) * scale
        assert a.shape[0] == state.module_config(path).r == (2 if path.endswith("v_proj") else 4)
        assert torch.allclose(dense.T if "embed" in path else dense, delta, atol=1e-6), path


def test_delta_of_unknown_module_names_the_adapted_ones(state):
    with pytest.raises(KeyError) as err:
        state.delta("model.layers.0.self_attn.k_proj")
    assert "model.layers.0.self_attn.k_proj" in str(err.value) and "model.layers.0.self_attn.q_proj" in str(err.value)


def test_dora_delta_needs_base_weight(llama):
    state = lorakit.AdapterState.from_model(lorakit.apply(llama.make(), lorakit.DoRAConfig(target_modules=["q_proj"])))
    with pytest.raises(ValueError, match="base_weight"):
        state.delta(state.modules()[0])


def test_load_into_model_with_other_modules(state, llama):
    other = lorakit.apply(llama.make(), lorakit.LoRAConfig(target_modules=["k_proj"]))
    with pytest.raises(lorakit.AdapterShapeError) as err:
        state.load_into(other)
    message = str(err.value)
    assert "not in the model" in message and "no tensors for" in message and "k_proj" in message


def test_load_into_adapted_model(llama, perturb):
    config = lorakit.LoRAConfig(r=4, lora_alpha=32, target_modules=["q_proj"])
    trained = perturb(lorakit.apply(llama.make(), config))
    state = lorakit.AdapterState.from_model(trained)
    same = state.load_into(lorakit.apply(llama.make(), config))  # e.g. resuming: tensors are copied in
    assert torch.allclose(llama.run(same), llama.run(trained), atol=1e-6)
    other = lorakit.apply(llama.make(), lorakit.LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    with pytest.raises(ValueError) as err:  # copying the tensors alone would keep the other scaling
        state.load_into(other)
    assert "model.layers.0.self_attn.q_proj" in str(err.value) and "lora_alpha" in str(err.value)
    with pytest.raises(ValueError, match="a 'dora' adapter that differs from the 'lora' adapter"):
        state.load_into(lorakit.apply(llama.make(), lorakit.DoRAConfig(r=4, lora_alpha=32, target_modules=["q_proj"])))
    dora = lorakit.AdapterState.from_model(lorakit.apply(llama.make(), lorakit.DoRAConfig(target_modules=["q_proj"])))
    dora.load_into(lorakit.apply(llama.make(), lorakit.LoRAConfig(target_modules=["q_proj"], use_dora=True)))
