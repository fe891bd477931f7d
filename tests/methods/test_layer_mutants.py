"""What every adapter layer owes its base, checked across methods where the conformance suite does not look:
factors built on the base's device (the meta device, as for deferred initialisation) and in its dtype (float64),
float32 factors over a bf16 base with the base's dtype handed back, and dropout on the adapter's input in
training only. Each case is a one-layer model; the reference is the base layer with W + delta."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit.methods.block_lora import BlockLoRAConfig
from lorakit.methods.bone import BoneConfig
from lorakit.methods.dylora import DyLoRAConfig
from lorakit.methods.ffa_lora import FFALoRAConfig
from lorakit.methods.loldu import LoLDUConfig
from lorakit.methods.lora_sb import LoRASBConfig
from lorakit.methods.lora_xs import LoRAXSConfig
from lorakit.methods.nola import NOLAConfig
from lorakit.methods.randlora import RandLoRAConfig
from lorakit.methods.shira import SHiRAConfig
from lorakit.testing import perturb_

T = ["0"]
# name -> (config, base layer, input); dropout cases take the config's dropout field
CASES = {
    "lora": (lambda **kw: lorakit.LoRAConfig(r=2, target_modules=T, **kw), lambda: nn.Linear(8, 6), (3, 8)),
    "lora_embedding": (lambda **kw: lorakit.LoRAConfig(r=2, target_modules=T, **kw), lambda: nn.Embedding(10, 6), None),
    "lora_conv": (lambda **kw: lorakit.LoRAConfig(r=2, target_modules=T, **kw), lambda: nn.Conv2d(3, 4, 3), (1, 3, 6, 6)),
    "dylora": (lambda **kw: DyLoRAConfig(r=4, active_rank=3, target_modules=T, **kw), lambda: nn.Linear(8, 6), (3, 8)),
    "block_lora": (lambda **kw: BlockLoRAConfig(r=2, block_num=2, target_modules=T, **kw), lambda: nn.Linear(8, 6), (3, 8)),
    "loldu": (lambda **kw: LoLDUConfig(r=3, target_modules=T, **kw), lambda: nn.Linear(8, 6), (3, 8)),
    "bone": (lambda **kw: BoneConfig(r=2, target_modules=T, **kw), lambda: nn.Linear(8, 6), (3, 8)),
    "bone_bat": (lambda **kw: BoneConfig(r=2, init_weights="bat", target_modules=T, **kw), lambda: nn.Linear(8, 6), (3, 8)),
    "lora_xs": (lambda **kw: LoRAXSConfig(r=3, target_modules=T, **kw), lambda: nn.Linear(8, 6), (3, 8)),
    "lora_sb": (lambda **kw: LoRASBConfig(r=3, target_modules=T, **kw), lambda: nn.Linear(8, 6), (3, 8)),
    "shira": (lambda **kw: SHiRAConfig(r=1, random_seed=0, target_modules=T, **kw), lambda: nn.Linear(8, 6), (3, 8)),
    "nola": (lambda **kw: NOLAConfig(r=2, num_basis_A=8, num_basis_B=8, target_modules=T, **kw), lambda: nn.Linear(8, 6), (3, 8)),
    "randlora": (lambda **kw: RandLoRAConfig(r=2, target_modules=T, **kw), lambda: nn.Linear(8, 6), (3, 8)),
    "dora": (lambda **kw: lorakit.DoRAConfig(r=2, target_modules=T, **kw), lambda: nn.Linear(8, 6), (3, 8)),
    "ffa_lora": (lambda **kw: FFALoRAConfig(r=2, target_modules=T, **kw), lambda: nn.Linear(8, 6), (3, 8)),
    "randlora_saved": (lambda **kw: RandLoRAConfig(r=2, save_projection=True, target_modules=T, **kw),
                       lambda: nn.Linear(8, 6), (3, 8)),
}
ON_META = ["lora", "lora_embedding", "lora_conv", "dylora", "block_lora", "loldu", "bone", "bone_bat", "lora_xs", "lora_sb", "shira", "nola", "randlora", "dora", "ffa_lora"]
DROPOUT = {"lora": "lora_dropout", "dylora": "lora_dropout", "block_lora": "lora_dropout", "bone": "miss_dropout",
           "lora_xs": "lora_dropout", "lora_sb": "lora_dropout", "nola": "lora_dropout", "randlora": "randlora_dropout",
           "dora": "lora_dropout", "ffa_lora": "lora_dropout"}


def _build(name, dtype=torch.float32, device=None, **kw):
    config, layer, shape = CASES[name]
    torch.manual_seed(0)
    base = layer().to(dtype) if device is None else layer().to_empty(device=device)
    model = lorakit.apply(nn.Sequential(base), config(**kw))
    if device is None:
        perturb_(model)
    ids = torch.tensor([[1, 4, 9], [0, 4, 2]])
    return base, model, ids if shape is None else torch.randn(shape, generator=torch.Generator().manual_seed(1))


def _merged(base, model, x):
    """The base layer's function with W + delta."""
    delta = lorakit.AdapterState.from_model(model).delta("0", base.weight.detach())
    if isinstance(base, nn.Embedding):
        return F.embedding(x, base.weight + delta)
    if isinstance(base, nn.Conv2d):
        return F.conv2d(x, base.weight + delta, base.bias, base.stride, base.padding)
    return F.linear(x, base.weight + delta, base.bias)


def _adapter_tensors(model):
    return dict(lorakit.adapters(model)["0"].adapter_tensors())


@pytest.mark.parametrize("name", ON_META)
def test_adapter_is_built_on_the_base_layers_device(name):
    """Catches: the factors created on the default device instead of the base weight's."""
    base, model, _ = _build(name, device="meta")
    assert {t.device.type for t in _adapter_tensors(model).values()} == {"meta"}
    if name == "nola":  # its factors are regenerated from a key read with .item(): no delta on the meta device
        return
    adapter = lorakit.adapters(model)["0"]
    delta = type(adapter).delta(_adapter_tensors(model), adapter.config, base.weight)
    assert delta.device.type == "meta" and delta.shape == base.weight.shape


@pytest.mark.parametrize("name", list(CASES))
def test_float64_base_gets_float64_adapter_tensors(name):
    """Catches: adapter tensors built in torch's default dtype (float32) instead of the base's."""
    base, model, x = _build(name, torch.float64)
    tensors = _adapter_tensors(model)
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.float64}
    x = x.double() if x.is_floating_point() else x
    out = model(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, _merged(base, model, x))


@pytest.mark.parametrize("name", list(CASES))
def test_bf16_base_computes_in_float32_and_returns_bf16(name):
    """Catches: the input not cast to the adapter's dtype (a dtype error), or the update not cast back."""
    base, model, x = _build(name, torch.bfloat16)
    assert {t.dtype for t in _adapter_tensors(model).values() if t.is_floating_point()} == {torch.float32}
    half = x.to(torch.bfloat16) if x.is_floating_point() else x
    out = model(half)
    assert out.dtype == torch.bfloat16
    full = _merged(base.float(), model, half.float() if x.is_floating_point() else x)
    torch.testing.assert_close(out.float(), full, rtol=0.03, atol=0.03)


@pytest.mark.parametrize("name", list(DROPOUT))
def test_dropout_acts_in_training_only(name):
    """Catches: dropout never built for p > 0 (the condition inverted or moved), or applied in eval."""
    base, model, x = _build(name, **{DROPOUT[name]: 0.5})
    x = torch.randn(64, x.shape[-1], generator=torch.Generator().manual_seed(2))
    model.eval()
    torch.testing.assert_close(model(x), _merged(base, model, x))
    model.train()
    noisy, clean = model(x), _merged(base, model, x)
    assert (noisy - clean).abs().max() > 0.1 * (clean - base(x)).abs().max()  # not rounding: half the inputs dropped
    _, plain, _ = _build(name)
    plain.train()
    torch.testing.assert_close(plain(x), _merged(plain[0].base_layer, plain, x))


@pytest.mark.parametrize("name", list(CASES))
def test_adapter_knows_its_module_path(name):
    """The path names the module in the layer's errors and in the printed model (catches: the path not handed
    on to the Adapter base class)."""
    _, model, _ = _build(name)
    adapter = lorakit.adapters(model)["0"]
    assert adapter.module_path == "0" and "path='0'" in repr(adapter)


@pytest.mark.parametrize("name", ["lora", "dylora", "block_lora", "loldu", "lora_xs", "lora_sb", "dora"])
def test_rank_one_adapts(name):
    """Catches: a rank-1 adapter treated as an empty one (the base output returned)."""
    config, layer, shape = CASES[name]
    base = layer()
    kw = {"active_rank": 1} if name == "dylora" else {}
    model = lorakit.apply(nn.Sequential(base), dataclasses.replace(config(), r=1, **kw))
    perturb_(model)
    x = torch.randn(shape)
    out = model(x)
    assert not torch.allclose(out, base(x))
    torch.testing.assert_close(out, _merged(base, model, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["bone", "shira", "randlora", "dora"])
def test_delta_without_the_base_weight_is_refused(name):
    """These updates take their shape from the base weight; delta(..., None) says so."""
    _, model, _ = _build(name)
    adapter = lorakit.adapters(model)["0"]
    want = {"bone": "Bone's update takes its shape (and, for 'bat', its values) from the base weight; pass base_weight",
            "shira": "SHiRA's ΔW takes its shape from the base weight: pass base_weight",
            "randlora": "RandLoRA slices its shared bases by the layer's shape: pass base_weight",
            "dora": "DoRA's update depends on the base weight: pass base_weight"}[name]
    with pytest.raises(ValueError) as err:
        type(adapter).delta(_adapter_tensors(model), adapter.config, None)
    assert str(err.value) == want
