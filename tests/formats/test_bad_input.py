"""Bad input: each error must say what is wrong for a user (the file, the module path, both shapes, the names)."""
from __future__ import annotations

import json
import os

import pytest
import safetensors.torch
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.formats import peft as peft_format

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture
def saved(llama, perturb, tmp_path):
    """A lorakit LoRA adapter on the tiny Llama, saved at tmp_path/'adapter'; returns (path, its output)."""
    model = perturb(lorakit.apply(llama.make(), lorakit.LoRAConfig(r=4, target_modules=TARGETS)))
    path = lorakit.save_peft(model, tmp_path / "adapter")
    return path, llama.run(model)


def _config(path) -> dict:
    return json.loads((path / peft_format.CONFIG_NAME).read_text())


def _write_config(path, data: dict) -> None:
    (path / peft_format.CONFIG_NAME).write_text(json.dumps(data))


def test_missing_weights_file(saved, llama):
    path, _ = saved
    (path / peft_format.WEIGHTS_NAME).unlink()
    with pytest.raises(lorakit.AdapterFileError) as err:
        lorakit.load_peft(llama.make(), path)
    assert str(path) in str(err.value) and "adapter_model.safetensors" in str(err.value)


def test_truncated_weights_file(saved, llama):
    path, _ = saved
    file = path / peft_format.WEIGHTS_NAME
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(lorakit.AdapterFileError) as err:
        lorakit.load_state(path)
    message = str(err.value)
    assert str(file) in message and "truncated" in message and "save the adapter again" in message


def test_pickle_refused_unless_allowed(llama, perturb, tmp_path):
    model = perturb(get_peft_model(llama.make(), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False)))
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file() and not (tmp_path / "adapter_model.safetensors").exists()
    with pytest.raises(lorakit.AdapterFileError) as err:
        lorakit.load_peft(llama.make(), tmp_path)
    assert "adapter_model.bin" in str(err.value) and "allow_pickle=True" in str(err.value)
    loaded = lorakit.load_peft(llama.make(), tmp_path, allow_pickle=True)
    assert torch.allclose(llama.run(loaded), llama.run(model), atol=1e-5, rtol=0)


def test_tensor_shape_does_not_fit_the_base_model(saved):
    path, _ = saved
    torch.manual_seed(0)
    wider = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(lorakit.AdapterShapeError) as err:
        lorakit.load_peft(wider, path)
    message = str(err.value)
    assert "model.layers.0.self_attn.q_proj" in message and "lora_A.weight" in message
    assert "(4, 96)" in message and "(4, 64)" in message


def test_edited_tensor_shape_names_module_and_shapes(saved, llama):
    path, _ = saved
    file = path / peft_format.WEIGHTS_NAME
    tensors = safetensors.torch.load_file(file)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[key] = torch.zeros(31, 4)
    safetensors.torch.save_file(tensors, file)
    with pytest.raises(lorakit.AdapterShapeError) as err:
        lorakit.load_peft(llama.make(), path)
    message = str(err.value)
    assert "model.layers.1.self_attn.v_proj" in message and "(32, 4)" in message and "(31, 4)" in message


def test_target_modules_match_nothing(llama):
    with pytest.raises(ValueError) as err:
        lorakit.apply(llama.make(), lorakit.LoRAConfig(target_modules=["q_prj", "vproj"]))
    message = str(err.value)
    assert "matches no module" in message and "LlamaForCausalLM" in message
    nearest = message.split("Nearest names:")[1].split(".")[0]
    assert "q_proj" in nearest and "v_proj" in nearest


def test_unknown_method_lists_registered_ones():
    with pytest.raises(KeyError) as err:
        lorakit.METHODS.get("lorra")
    message = str(err.value)
    assert "'lorra'" in message and "Did you mean 'lora'" in message
    assert all(name in message for name in lorakit.METHODS.names())


def test_unknown_peft_type_lists_known_ones(saved):
    path, _ = saved
    _write_config(path, {**_config(path), "peft_type": "IA3"})
    with pytest.raises(lorakit.AdapterFileError) as err:
        lorakit.load_state(path)
    message = str(err.value)
    assert "adapter_config.json" in message and "'IA3'" in message and "LORA" in message
    assert all(name in message for name in lorakit.METHODS.names())


def test_unknown_config_field_warns_and_loads(saved, llama):
    path, out = saved
    _write_config(path, {**_config(path), "shiny_new_option": 3})
    with pytest.warns(UserWarning, match="shiny_new_option") as caught:
        loaded = lorakit.load_peft(llama.make(), path)
    assert str(path / "adapter_config.json") in str(caught[0].message)
    assert torch.allclose(llama.run(loaded), out, atol=1e-5, rtol=0)
    with pytest.warns(UserWarning, match="shiny_new_option"):
        lorakit.LoRAConfig.from_dict({"r": 4, "shiny_new_option": 3})


def test_config_field_of_wrong_type(saved):
    path, _ = saved
    _write_config(path, {**_config(path), "r": "4"})
    with pytest.raises(TypeError) as err:
        lorakit.load_state(path)
    message = str(err.value)
    assert "adapter_config.json" in message and "LoRAConfig.r" in message and "str" in message
    with pytest.raises(TypeError, match=r"LoRAConfig\.lora_alpha: expected float"):
        lorakit.LoRAConfig(lora_alpha="16")


def test_config_not_json(saved):
    path, _ = saved
    (path / peft_format.CONFIG_NAME).write_text('{"r": 4,')
    with pytest.raises(lorakit.AdapterFileError, match="adapter_config.json: not valid JSON"):
        lorakit.load_state(path)


def test_peft_feature_lorakit_lacks_is_refused(saved):
    path, _ = saved
    _write_config(path, {**_config(path), "layer_replication": [[0, 2], [1, 2]]})
    with pytest.raises(lorakit.AdapterFileError, match="layer_replication.*does not support"):
        lorakit.load_state(path)


def _fail_midway(monkeypatch):
    """Make the tensor writer put half a file on disk and then fail, as a full disk would."""
    real = peft_format.save_file

    def broken(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(peft_format, "save_file", broken)


def _snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def test_interrupted_save_leaves_nothing(llama, monkeypatch, tmp_path):
    model = lorakit.apply(llama.make(), lorakit.LoRAConfig(r=4, target_modules=TARGETS))
    _fail_midway(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        lorakit.save_peft(model, tmp_path / "new")
    with pytest.raises(OSError, match="No space left"):
        lorakit.save_peft(model, tmp_path / "new", adapter_name="other")
    assert not list(tmp_path.iterdir()), "no half-written adapter directory, and no temporary folder, is left"


def test_interrupted_save_keeps_previous_adapter(saved, llama, monkeypatch):
    path, out = saved
    lorakit.save_peft(lorakit.load_peft(llama.make(), path), path, adapter_name="other")
    before = _snapshot(path.parent)
    changed = lorakit.apply(llama.make(), lorakit.LoRAConfig(r=2, target_modules=["k_proj"]))
    _fail_midway(monkeypatch)
    for name in (None, "other"):
        with pytest.raises(OSError, match="No space left"):
            lorakit.save_peft(changed, path, adapter_name=name)
    assert _snapshot(path.parent) == before
    monkeypatch.undo()
    for name in (None, "other"):
        assert torch.allclose(llama.run(lorakit.load_peft(llama.make(), path, adapter_name=name)), out, atol=1e-5)


def test_applying_twice_is_refused(llama):
    config = lorakit.LoRAConfig(r=4, target_modules=TARGETS)
    model = lorakit.apply(llama.make(), config)
    with pytest.raises(ValueError, match="already has a lorakit adapter.*merge\\(model\\) or unwrap\\(model\\)"):
        lorakit.apply(model, config)
    lorakit.apply(lorakit.unwrap(model), config)  # allowed again once removed


def test_missing_config_lists_sub_folder_adapters(saved, llama, tmp_path):
    path, _ = saved
    root = tmp_path / "several"
    model = lorakit.load_peft(llama.make(), path)
    for name in ("beta", "alpha"):
        lorakit.save_peft(model, root, adapter_name=name)
    with pytest.raises(lorakit.AdapterFileError) as err:
        lorakit.load_peft(llama.make(), root)
    message = str(err.value)
    assert str(root / "adapter_config.json") in message and "alpha, beta" in message and "adapter_name=" in message


def test_missing_directory(llama, tmp_path):
    with pytest.raises(lorakit.AdapterFileError, match="no such adapter directory"):
        lorakit.load_peft(llama.make(), tmp_path / "nowhere")
