"""convert_to_plain_lora: adapters trained on a moved base weight, saved as plain LoRA on the untouched base
(lorakit and PEFT load them with the trained model's outputs); and the errors around initialisers."""
import copy
import warnings

import pytest
import torch

import lorakit
from lorakit.init import convert_to_plain_lora
from lorakit.init.calibration import Calibration, accumulate_gradients

from init_helpers import lm_batches, logits, lorakit_model

BATCHES = lm_batches(2, 2, 12)
X = BATCHES[1]


def _train(model, steps=3):
    optim = torch.optim.SGD(lorakit.trainable_parameters(model).values(), lr=0.5)
    model.train()
    for step in range(steps):
        optim.zero_grad()
        model(**BATCHES[step % 2]).loss.backward()
        optim.step()
    return model.eval()


@pytest.mark.parametrize("init", ["pissa", "olora", "lora_ga"])
def test_trained_adapter_converts_to_plain_lora_on_the_untouched_base(base, init, tmp_path):
    from peft import PeftModel

    model = lorakit_model(base, init, batches=BATCHES if init == "lora_ga" else None)
    initial = lorakit.AdapterState.from_model(model)
    lorakit.save_state(initial, tmp_path / "initial")
    expected = logits(_train(model), X)
    assert not torch.allclose(expected, logits(base, X), atol=1e-3)
    converted = convert_to_plain_lora(lorakit.AdapterState.from_model(model), tmp_path / "initial")
    assert converted.config.r == 8 and converted.config.lora_alpha == 16 and converted.config.init_lora_weights is True
    lorakit.save_state(converted, tmp_path / "plain")
    ours = lorakit.load_peft(copy.deepcopy(base), tmp_path / "plain")
    assert torch.allclose(logits(ours, X), expected, atol=1e-5), (logits(ours, X) - expected).abs().max()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "plain")).eval()
    assert torch.allclose(logits(theirs, X), expected, atol=1e-5)


def test_conversion_doubles_patterns_and_keeps_rslora_scaling(base):
    model = lorakit_model(base, "pissa", targets=("q_proj", "v_proj"), use_rslora=True)
    state = lorakit.AdapterState.from_model(model)
    converted = convert_to_plain_lora(state, state)
    assert converted.config.lora_alpha == pytest.approx(8 * 2 ** 0.5)
    assert converted.module_config("model.layers.0.self_attn.q_proj").scaling == pytest.approx(8 / 2)
    patterned = lorakit_model(base, "olora", targets=("q_proj", "v_proj"), rank_pattern={"v_proj": 2},
                              alpha_pattern={"v_proj": 4})
    state = lorakit.AdapterState.from_model(patterned)
    converted = convert_to_plain_lora(state, state)
    assert converted.config.rank_pattern == {"v_proj": 4} and converted.config.alpha_pattern == {"v_proj": 8}
    for path in state.modules():  # trained == initial: the converted update is exactly zero
        assert torch.allclose(converted.delta(path), torch.zeros_like(converted.delta(path)), atol=1e-6)


def test_conversion_refuses_what_it_cannot_express(base):
    rs = lorakit.AdapterState.from_model(lorakit_model(base, "pissa", use_rslora=True, rank_pattern={"q_proj": 2}))
    with pytest.raises(ValueError, match="rsLoRA"):
        convert_to_plain_lora(rs, rs)
    dora = lorakit.AdapterState.from_model(lorakit_model(base, "pissa", use_dora=True))
    with pytest.raises(ValueError, match="not plain LoRA"):
        convert_to_plain_lora(dora, dora)
    a = lorakit.AdapterState.from_model(lorakit_model(base, "pissa", targets=("q_proj",)))
    b = lorakit.AdapterState.from_model(lorakit_model(base, "pissa", targets=("v_proj",)))
    with pytest.raises(ValueError, match="other modules"):
        convert_to_plain_lora(a, b)


def test_gradient_accumulation_matches_autograd_and_leaves_no_trace(base):
    model = lorakit_model(base, True, targets=("v_proj",))
    layers = {p: a.base_layer for p, a in lorakit.adapters(model).items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    grads = accumulate_gradients(model, layers, Calibration.of(BATCHES))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    reference = copy.deepcopy(base)
    reference.train()
    (sum(reference(**b).loss for b in BATCHES) / 2).backward()
    for path, g in grads.items():
        assert torch.allclose(g, reference.get_submodule(path).weight.grad, atol=1e-6), path


def test_errors_name_the_problem(base):
    with pytest.raises(ValueError, match="registered initialiser"):
        lorakit_model(base, "loftq")
    model = lorakit_model(base, "lora_ga")
    with pytest.raises(ValueError, match="pass calibration batches"):
        lorakit.initialize(model)
    with pytest.raises(TypeError, match="unknown settings"):
        lorakit.initialize(model, BATCHES, settings={"directoin": "ArBr"})
    with pytest.raises(ValueError, match="2·r <= min"):
        lorakit.initialize(lorakit_model(base, "lora_ga", r=40, targets=("v_proj",)), BATCHES)
    plain = lorakit_model(base, True)
    with pytest.raises(ValueError, match="names no initialiser"):
        lorakit.initialize(plain, BATCHES)


def test_lora_based_methods_take_initialisers_and_the_others_are_refused():
    from lorakit.methods.lora import LoRALinear
    from lorakit.testing import ToyLinear, default_config

    taken, refused = [], []
    for name in lorakit.METHODS.names():
        method = lorakit.METHODS.get(name)
        cls = method.adapter_class_for(torch.nn.Linear(2, 2))
        if cls is None:
            continue
        torch.manual_seed(0)
        model = ToyLinear().eval()
        x = model.example()
        with torch.no_grad():
            before = model(x)
        config = default_config(name, model.targets, init_lora_weights="pissa")
        if issubclass(cls, LoRALinear):  # forward W + s·B A: PiSSA keeps the output, unless the method says no
            try:
                lorakit.apply(model, config)
            except ValueError as e:
                assert "pissa" in str(e), (name, e)  # the method's own refusal, naming the init
                continue
            with torch.no_grad():
                assert torch.allclose(model(x), before, atol=1e-5), name
            taken.append(name)
        else:
            with pytest.raises(ValueError, match="initialises LoRA/DoRA factors"):
                lorakit.apply(model, config)
            refused.append(name)
    assert "lora" in taken and "dora" in taken and refused, (taken, refused)
