"""Initialiser maths and messages pinned where mutation testing found them loose."""
import pytest
import torch

import lorakit
from lorakit.init import convert_to_plain_lora, pissa as pissa_module
from lorakit.init.orthogonal import orthogonal_factors
from lorakit.testing import ToyLinear


def _toy(init, r=4, **extra):
    torch.manual_seed(0)
    model = ToyLinear()
    return lorakit.apply(model, lorakit.LoRAConfig(r=r, lora_alpha=8, target_modules=["lin0", "lin1"],
                                                   init_lora_weights=init, **extra))


@pytest.mark.parametrize("init", ["olora", "orthogonal", "pissa", "pissa_niter_2"])
def test_rank_errors_name_the_initialiser(init):
    with pytest.raises(ValueError, match=rf"module 'lin\d': {init} needs r <= min\(out, in\) = \d+, found r=18"):
        _toy(init, r=18)


@pytest.mark.parametrize("init", ["olora", "orthogonal"])
def test_non_lora_adapters_are_refused_naming_the_initialiser(init):
    torch.manual_seed(0)
    config = lorakit.METHODS.get("loldu").config_class(r=4, target_modules=["lin0"])
    model = lorakit.apply(ToyLinear(), config)
    with pytest.raises(ValueError, match=rf"init_lora_weights='{init}' initialises LoRA/DoRA factors"):
        lorakit.INITIALIZERS.get(init).run(model, settings=init)


def test_pissa_niter_reaches_the_factorisation(monkeypatch):
    seen = []
    real = pissa_module.pissa_factors
    monkeypatch.setattr(pissa_module, "pissa_factors", lambda w, r, s, niter=None: seen.append(niter) or real(w, r, s, niter))
    _toy("pissa_niter_3")
    _toy("pissa")
    assert seen == [3, 3, None, None]  # two adapted layers each


def test_orthogonal_factors_have_the_scale_of_peft():
    """Entries of (G Q_odd)ᵀ / 10 have mean square (r/2)/r / 100 = 0.005 (rows of Q orthonormal)."""
    torch.manual_seed(0)
    a, b = orthogonal_factors(8, 4096, 4096)
    assert a.pow(2).mean().item() == pytest.approx(0.005, rel=0.05)
    assert b.pow(2).mean().item() == pytest.approx(0.005, rel=0.05)


def test_conversion_messages_and_pattern_checks():
    plain = lorakit.AdapterState.from_model(_toy(True))
    rs_alpha = lorakit.AdapterState(lorakit.LoRAConfig(r=4, lora_alpha=8, use_rslora=True, alpha_pattern={"lin0": 4},
                                                       target_modules=["lin0", "lin1"]), plain.tensors)
    with pytest.raises(ValueError, match=r"^cannot convert an rsLoRA adapter with rank_pattern/alpha_pattern: the doubled "
                                         r"ranks would change its scaling \(PEFT refuses this too\)$"):
        convert_to_plain_lora(rs_alpha, rs_alpha)
    rs_plain = lorakit.AdapterState(lorakit.LoRAConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["lin0", "lin1"]),
                                    plain.tensors)
    assert convert_to_plain_lora(rs_plain, rs_plain).config.lora_alpha == pytest.approx(8 * 2**0.5)
    many = {f"m{i}": plain.tensors["lin0"] for i in range(8)}
    other = lorakit.AdapterState(plain.config, many)
    with pytest.raises(ValueError, match=r"^the initial adapter covers other modules than the trained one: "
                                         r"\['lin0', 'lin1', 'm0', 'm1', 'm2', 'm3'\]$"):
        convert_to_plain_lora(plain, other)
    loldu = lorakit.AdapterState.from_model(lorakit.apply(ToyLinear(), lorakit.METHODS.get("loldu").config_class(
        r=4, target_modules=["lin0"])))
    with pytest.raises(ValueError, match=r"^method 'loldu' is not plain LoRA \(ΔW = s·B A\), so its update cannot be "
                                         r"rewritten as a LoRA relative to the original weight; merge the adapter "
                                         r"into the original model instead$"):
        convert_to_plain_lora(loldu, loldu)
