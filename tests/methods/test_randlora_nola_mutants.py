"""RandLoRA's stored bases (save_projection=True) are the ones used, in the coefficients' dtype; a config not
applied to a model is refused by name."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit.methods.randlora import RandLoRAConfig, shared_bases
from lorakit.testing import perturb_


def test_stored_bases_are_used_in_the_coefficients_dtype():
    """A file that carries its bases (PEFT's default) may hold other values than this seed regenerates (PEFT draws
    them in fp16 where bf16 is missing), in another dtype (here float64). Catches: the stored bases ignored, or not cast."""
    base = nn.Linear(8, 6)
    model = lorakit.apply(nn.Sequential(base), RandLoRAConfig(r=2, save_projection=True, target_modules=["0"]))
    perturb_(model)
    layer = lorakit.adapters(model)["0"]
    before = lorakit.AdapterState.from_model(model).delta("0", base.weight.detach())
    layer.randlora_A = (2 * layer.randlora_A).double()  # ΔW is linear in A: the update doubles
    layer.randlora_B = layer.randlora_B.double()
    delta = lorakit.AdapterState.from_model(model).delta("0", base.weight.detach())
    assert delta.dtype == torch.float32
    torch.testing.assert_close(delta, 2 * before)
    x = torch.randn(3, 8)
    torch.testing.assert_close(model(x), F.linear(x, base.weight + delta, base.bias), rtol=1e-4, atol=1e-5)


def test_bases_of_an_unapplied_config_are_refused_by_name():
    with pytest.raises(ValueError) as err:
        shared_bases(RandLoRAConfig(r=2), torch.device("cpu"), torch.float32)
    assert str(err.value) == ("RandLoRA's bases are sized from the model: apply the config to a model "
                              "(lorakit.apply / load_peft)")
