"""RandLoRA's stored bases (save_projection=True) are the ones used, in the coefficients' dtype; a config not
applied to a model is refused by name."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit.methods.nola import NOLAConfig, _draw, nola_factors
from lorakit.methods.randlora import RandLoRAConfig, RandLoRALinear, shared_bases
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


@pytest.mark.parametrize("conv1d", [False, True])
def test_largest_shape_is_the_elementwise_max_of_out_and_in(conv1d):
    """Conv1D stores [in, out]; the bases are sized by [max out, max in] over the targeted layers (as PEFT).
    Catches: a layer's shape read in the wrong orientation, or one max taken over the wrong axis."""
    # (out 6, in 8) and (out 10, in 4); Conv1D(nf=out, nx=in) stores [in, out]
    layers = [Conv1D(6, 8), Conv1D(10, 4)] if conv1d else [nn.Linear(8, 6), nn.Linear(4, 10)]
    model = lorakit.apply(nn.Sequential(*layers), RandLoRAConfig(r=2, target_modules=["0", "1"], fan_in_fan_out=conv1d))
    assert list(lorakit.adapters(model)["0"].config.largest_shape) == [10, 8]


def test_a_layer_built_directly_sizes_its_bases_from_itself():
    """RandLoRALinear(layer, config) without apply: the config's largest_shape comes from this layer."""
    layer = RandLoRALinear(nn.Linear(8, 6), RandLoRAConfig(r=2), "x")
    assert list(layer.config.largest_shape) == [6, 8]
    perturb_(layer)
    x = torch.randn(3, 8)
    delta = RandLoRALinear.delta(dict(layer.adapter_tensors()), layer.config, layer.base_layer.weight.detach())
    torch.testing.assert_close(layer(x), F.linear(x, layer.base_layer.weight + delta, layer.base_layer.bias))


def test_nola_fixed_a0_is_the_stream_zero_draw_at_linears_bound():
    """With α = 0, A is A0 = U(-1, 1)(seed, stream 0) / sqrt(in), nn.Linear's bound, apart from the α bases
    (stream 1). Files store only the coefficients and the seed, so this draw must not change. Catches: another
    stream or scale."""
    tensors = {"nola_alpha": torch.zeros(5), "nola_beta": torch.zeros(4), "nola_key": torch.tensor([17, 6, 16])}
    a, b = nola_factors(tensors, NOLAConfig(r=3, num_basis_A=5, num_basis_B=4))
    torch.testing.assert_close(a, _draw(17, 0, (3, 16), a) / 4.0)
    assert a.abs().max() <= 0.25 and a.abs().max() > 0.2 and torch.count_nonzero(b) == 0


def test_nola_factors_follow_the_stored_recipe():
    """A file holds (α, β, seed, out, in) only: A = A0 + Σ α_i A_i / sqrt(k), B = Σ β_j B_j / sqrt(l), every draw
    U(-1, 1) from torch.Generator().manual_seed(3·seed + stream), stream 0 for A0, 1 for the A_i, 2 for the B_j.
    Written out here independently; catches any change to the generator, the range, the streams or the signs."""
    g = torch.Generator().manual_seed(1)
    alpha, beta = torch.randn(5, generator=g), torch.randn(4, generator=g)
    a, b = nola_factors({"nola_alpha": alpha, "nola_beta": beta, "nola_key": torch.tensor([11, 6, 16])},
                        NOLAConfig(r=3, num_basis_A=5, num_basis_B=4))

    def uniform(stream, shape):
        return torch.rand(shape, generator=torch.Generator().manual_seed(3 * 11 + stream)) * 2 - 1

    want_a = uniform(0, (3, 16)) / 4.0 + torch.einsum("k,kij->ij", alpha, uniform(1, (5, 3, 16))) / 5 ** 0.5
    want_b = torch.einsum("k,kij->ij", beta, uniform(2, (4, 6, 3))) / 2.0
    torch.testing.assert_close(a, want_a)
    torch.testing.assert_close(b, want_b)


def test_nola_layer_seed_derivation():
    """Each layer's seed is (nola_seed · 1,000,003 + crc32(path)) mod 2^40, so one config gives the same adapter
    everywhere; pinned with a nola_seed whose product passes 2^40."""
    import zlib

    seed = 2**31 - 1
    model = lorakit.apply(nn.Sequential(nn.Linear(4, 3)), NOLAConfig(r=2, num_basis_A=4, num_basis_B=4, nola_seed=seed,
                                                                     target_modules=["0"]))
    key = lorakit.adapters(model)["0"].nola_key.tolist()
    assert key == [(seed * 1_000_003 + zlib.crc32(b"0")) % 2**40, 3, 4]
