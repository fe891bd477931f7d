"""FFA-LoRA claims: A frozen and shared from the seed, only B trains (half of LoRA's parameters), federated
averaging is exact, and the files are PEFT LoRA files."""
import json
import warnings

import pytest
import torch

import lorakit
from lorakit.methods.ffa_lora import FFALoRAConfig
from lorakit.testing import check_method

TARGETS = ["q_proj", "v_proj", "up_proj"]


def _config(**kw):
    return FFALoRAConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS, **kw})


def _a(model):
    return {p: m.lora_A.weight.detach().clone() for p, m in lorakit.adapters(model).items()}


def test_conformance():
    assert check_method("ffa_lora")


def test_same_seed_same_a_on_every_client(tiny):
    torch.manual_seed(1)
    one = _a(lorakit.apply(tiny.make(), _config()))
    torch.manual_seed(2)  # the global RNG plays no part
    two = _a(lorakit.apply(tiny.make(), _config()))
    other = _a(lorakit.apply(tiny.make(), _config(ffa_seed=1)))
    assert one.keys() == two.keys() and len(one) == 6
    assert all(torch.equal(one[p], two[p]) for p in one)
    assert not any(torch.allclose(one[p], other[p]) for p in one)
    q0, q1 = one["model.layers.0.self_attn.q_proj"], one["model.layers.1.self_attn.q_proj"]
    assert not torch.allclose(q0, q1), "modules of the same shape need different A"
    assert q0.abs().max() <= 1 / 64**0.5 and q0.abs().min() > 0  # Kaiming-uniform bound 1/sqrt(in), non-zero


def test_only_b_trains_half_of_lora(tiny):
    model = lorakit.apply(tiny.make(), _config())
    trainable = lorakit.trainable_parameters(model)
    assert all(n.endswith("lora_B.weight") for n in trainable)
    out_dims = {"q_proj": 64, "v_proj": 32, "up_proj": 128}
    expected = sum(4 * out_dims[p.rsplit(".", 1)[-1]] for p in lorakit.adapters(model))
    assert sum(p.numel() for p in trainable.values()) == expected
    lora = lorakit.apply(tiny.make(), lorakit.LoRAConfig(r=4, target_modules=["q_proj"]))
    ffa = lorakit.apply(tiny.make(), _config(target_modules=["q_proj"]))  # square: in = out = 64
    count = lambda m: sum(p.numel() for p in lorakit.trainable_parameters(m).values())  # noqa: E731
    assert count(ffa) * 2 == count(lora)
    before = _a(model)
    tiny.train(model, steps=3, weight_decay=0.1)  # decoupled weight decay must not touch A either
    assert all(torch.equal(before[p], a) for p, a in _a(model).items())
    assert any(m.lora_B.weight.abs().sum() > 0 for m in lorakit.adapters(model).values())


def _client(tiny, k, config):
    model = lorakit.apply(tiny.make(), config)
    return lorakit.AdapterState.from_model(tiny.train(model, steps=2, seed=k + 1))


def _average(states):
    first = states[0]
    avg = {p: {k: sum(s.tensors[p][k] for s in states) / len(states) for k in t} for p, t in first.tensors.items()}
    return lorakit.AdapterState(first.config, avg)


@pytest.mark.parametrize("config, exact", [(_config(), True), (lorakit.LoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS), False)])
def test_federated_average_is_exact(tiny, config, exact):
    """The paper's point: with A shared and frozen, averaging the clients' B gives the average update exactly."""
    torch.manual_seed(0)  # LoRA clients start from the same A too, as FedIT does
    states = [_client(tiny, k, config) for k in range(3)]
    avg = _average(states)
    errors = []
    for path in avg.modules():
        wanted = sum(s.delta(path) for s in states) / len(states)
        errors.append(((avg.delta(path) - wanted).norm() / wanted.norm()).item())
    if exact:
        assert max(errors) < 1e-6, errors
    else:  # control: averaging A and B separately is biased once A has moved
        assert max(errors) > 1e-3, errors


def test_file_is_a_peft_lora_file(tiny, tmp_path):
    from peft import PeftModel

    model = lorakit.apply(tiny.make(), _config(ffa_seed=7))
    tiny.train(model, steps=2)
    lorakit.save_peft(model, tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA" and data["lorakit_method"] == "ffa_lora" and data["ffa_seed"] == 7
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT notes the two keys it does not know
        peft_model = PeftModel.from_pretrained(tiny.make(), str(tmp_path))
    torch.testing.assert_close(tiny.logits(peft_model), tiny.logits(model), atol=1e-5, rtol=1e-4)
    loaded = lorakit.load_peft(tiny.make(), tmp_path, is_trainable=True)
    assert isinstance(lorakit.config_of(loaded), FFALoRAConfig)
    assert all(n.endswith("lora_B.weight") for n in lorakit.trainable_parameters(loaded))
    torch.testing.assert_close(tiny.logits(loaded), tiny.logits(model))
    assert type(lorakit.load_state(tmp_path).config) is FFALoRAConfig
