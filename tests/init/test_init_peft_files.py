"""PEFT parity for files: adapters PEFT saves after pissa/olora/lora_ga/eva load in lorakit with the same
outputs, and lorakit's load in PEFT; converted adapters (plain LoRA on the untouched base) both ways."""
import copy
import warnings

import pytest
import torch

import lorakit
from lorakit.init import convert_to_plain_lora

from init_helpers import lm_batches, logits, lorakit_factors, lorakit_model, peft_factors, peft_model, perturb_lora

BATCHES = lm_batches(2, 2, 12)
X = BATCHES[0]


def _peft_load(base, path):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()


def _residual_base(base, factors):
    """``base`` with the (moved) weights of an initialised model: where unconverted LoRA-GA adapters belong."""
    model = copy.deepcopy(base)
    with torch.no_grad():
        for path, f in factors.items():
            model.get_submodule(path).weight.copy_(f["W"])
    return model


def _init_kwargs(init):
    return {"batches": BATCHES} if init in ("lora_ga", "eva") else {}


def _peft_initialised(base, init):
    model = peft_model(base, init, **_init_kwargs(init) if init == "lora_ga" else {})
    if init == "eva":
        from peft.tuners.lora.eva import initialize_lora_eva_weights

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            initialize_lora_eva_weights(model, lm_batches(3, 4, 16), show_progress_bar=False)
    return model.eval()


@pytest.mark.parametrize("init", ["pissa", "olora", "lora_ga", "eva"])
def test_peft_saved_adapter_loads_in_lorakit(base, init, tmp_path):
    model = _peft_initialised(base, init)
    residual = _residual_base(base, peft_factors(model))
    perturb_lora(model)
    expected = logits(model, X)
    model.save_pretrained(tmp_path)
    # unconverted: PiSSA/OLoRA re-run on the original base when loaded; LoRA-GA needs its residual base
    target = residual if init == "lora_ga" else copy.deepcopy(base)
    loaded = lorakit.load_peft(target, tmp_path)
    assert torch.allclose(logits(loaded, X), expected, atol=1e-5), (logits(loaded, X) - expected).abs().max()


@pytest.mark.parametrize("init", ["pissa", "olora", "lora_ga", "eva"])
def test_lorakit_saved_adapter_loads_in_peft(base, init, tmp_path):
    model = lorakit_model(base, init, batches=lm_batches(3, 4, 16) if init == "eva" else _init_kwargs(init).get("batches"))
    residual = _residual_base(base, lorakit_factors(model))
    perturb_lora(model)
    expected = logits(model, X)
    lorakit.save_peft(model, tmp_path)
    loaded = _peft_load(residual if init == "lora_ga" else base, tmp_path)
    assert torch.allclose(logits(loaded, X), expected, atol=1e-5), (logits(loaded, X) - expected).abs().max()


@pytest.mark.parametrize("init", ["pissa", "olora", "lora_ga"])
def test_converted_adapters_match_peft_conversion(base, init, tmp_path):
    model = _peft_initialised(base, init)
    model.peft_config["default"].init_lora_weights = True  # PEFT's recipe for the initial adapter
    model.save_pretrained(tmp_path / "init")
    model.peft_config["default"].init_lora_weights = init
    perturb_lora(model)
    expected = logits(model, X)
    model.save_pretrained(tmp_path / "unconverted")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that base-mutating adapters should not be combined
        model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    # PEFT's converted file is a plain LoRA on the untouched base, in lorakit too
    theirs = lorakit.load_state(tmp_path / "converted")
    assert theirs.config.r == 8 and theirs.config.lora_alpha == 16 and theirs.config.init_lora_weights is True
    loaded = lorakit.load_peft(copy.deepcopy(base), tmp_path / "converted")
    assert torch.allclose(logits(loaded, X), expected, atol=1e-5)
    # our conversion of the same adapter gives PEFT's tensors, and PEFT loads it on the untouched base
    ours = convert_to_plain_lora(lorakit.load_state(tmp_path / "unconverted"), tmp_path / "init")
    for path, tensors in theirs.tensors.items():
        for key, value in tensors.items():
            assert torch.equal(ours.tensors[path][key], value), f"{path} {key}"
    lorakit.save_state(ours, tmp_path / "ours")
    assert torch.allclose(logits(_peft_load(base, tmp_path / "ours"), X), expected, atol=1e-5)
