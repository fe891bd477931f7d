"""NOLA claim tests: stored size independent of rank and width, bases regenerated (never stored or kept)."""
import math

import torch
from torch import nn

import lorakit
from lorakit.methods.nola import NOLAConfig, _Combination, _draw, nola_factors
from lorakit.testing import check_method, perturb_
from peft_parity import MLP, X

TARGETS = ["up", "down"]


def test_conformance():
    assert len(check_method("nola")) == 26


def stored(config, model=None, tmp_path=None):
    model = lorakit.apply(model or MLP(), config)
    lorakit.save_peft(model, tmp_path)
    return lorakit.load_state(tmp_path)


def test_stored_size_is_independent_of_rank_and_width(tmp_path):
    k, l = 40, 24
    sizes = []
    for i, (r, width) in enumerate([(1, 48), (4, 48), (16, 48), (4, 256)]):
        state = stored(NOLAConfig(r=r, num_basis_A=k, num_basis_B=l, target_modules=TARGETS), MLP(h=width), tmp_path / str(i))
        assert {n for t in state.tensors.values() for n in t} == {"nola_alpha", "nola_beta", "nola_key"}
        sizes.append(state.num_parameters())
    assert sizes == [2 * (k + l + 3)] * 4  # α, β and the (seed, out, in) key per layer
    lora_rank1 = 2 * (32 + 48)  # rank-1 LoRA on the same two layers stores more than this NOLA
    assert sizes[0] < lora_rank1


def test_saved_adapter_reloads_to_the_same_update(tmp_path):
    model = lorakit.apply(MLP(), NOLAConfig(r=4, num_basis_A=16, num_basis_B=16, target_modules=TARGETS, nola_seed=5))
    perturb_(model, scale=0.3)
    with torch.no_grad():
        expected = model(X)
    lorakit.save_peft(model, tmp_path)
    torch.manual_seed(123)  # the global RNG plays no part in the bases
    fresh = lorakit.load_peft(MLP(), tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(X), expected)


def test_layers_draw_distinct_bases_and_the_seed_is_in_the_config():
    def factors(seed):
        model = lorakit.apply(MLP(d=32, h=32), NOLAConfig(r=4, num_basis_A=8, num_basis_B=8, target_modules=TARGETS, nola_seed=seed))
        perturb_(model, scale=1.0)
        return [nola_factors(dict(getattr(model, p).adapter_tensors()), model.up.config) for p in TARGETS]

    (a_up, _), (a_down, _) = factors(0)
    assert not torch.allclose(a_up, a_down)  # same shape, different per-layer seeds
    (a_up_again, _), _ = factors(0)
    (a_up_other, _), _ = factors(1)
    assert torch.equal(a_up, a_up_again) and not torch.allclose(a_up, a_up_other)


def test_regenerating_backward_equals_autograd_through_stored_bases():
    coef = torch.randn(12, dtype=torch.float64, requires_grad=True)
    shape = (3, 7)
    grad_out = torch.randn(shape, dtype=torch.float64)
    (ours,) = torch.autograd.grad(_Combination.apply(coef, 99, 1, shape), coef, grad_out)
    bases = _draw(99, 1, (12, *shape), coef) / math.sqrt(12)
    (reference,) = torch.autograd.grad(torch.einsum("k,kij->ij", coef, bases), coef, grad_out)
    torch.testing.assert_close(ours, reference)


def test_no_basis_tensor_is_kept_for_backward():
    k = l = 256
    model = lorakit.apply(MLP(), NOLAConfig(r=8, num_basis_A=k, num_basis_B=l, target_modules=["up"]))
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
        model(X).sum().backward()
    assert model.up.nola_alpha.grad is not None and model.up.nola_beta.grad.abs().sum() > 0
    assert max(kept) < k * 8 * 32 / 4, max(kept)  # a stack of bases would be k·r·in = 65536


def test_update_is_zero_at_init_but_the_gradient_is_not():
    model = lorakit.apply(MLP(), NOLAConfig(r=4, num_basis_A=16, num_basis_B=16, target_modules=["up"]))
    state = lorakit.AdapterState.from_model(model)
    assert torch.count_nonzero(state.delta("up")) == 0
    model(X).pow(2).sum().backward()
    assert model.up.nola_beta.grad.abs().sum() > 0  # A0 ≠ 0 gives β a gradient at the start
