"""SHiRA claim tests: fused switching restores weights bit-exactly, sparse storage, rank above LoRA's, PEFT parity."""
import copy

import peft
import pytest
import torch
from torch import nn

import lorakit
from lorakit.init.shira_masks import calibrate
from lorakit.methods.shira import SHiRAConfig, SHiRALinear, random_support, switch_in, switch_out
from lorakit.testing import check_method, perturb_
from peft_parity import MLP, X, lorakit_to_peft, peft_to_lorakit


def trained_state(r=2, seed=3, mask_type="random", noise_seed=0):
    model = lorakit.apply(MLP(), SHiRAConfig(r=r, target_modules=["up", "down"], random_seed=seed, mask_type=mask_type))
    perturb_(model, scale=0.5, seed=noise_seed)
    return model, lorakit.AdapterState.from_model(model)


def test_conformance():
    assert len(check_method("shira")) == 22


def test_switch_in_matches_adapter_and_switch_out_restores_bits():
    model, state = trained_state()
    with torch.no_grad():
        adapted = model(X)
    base = MLP()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    handle = switch_in(base, state)
    with torch.no_grad():
        torch.testing.assert_close(base(X), adapted, atol=1e-5, rtol=1e-5)
    changed = sum(int((base.state_dict()[k] != before[k]).sum()) for k in before)
    assert 0 < changed <= sum(t["shira_weight"].numel() for t in state.tensors.values())
    switch_out(base, handle)
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_two_adapters_switch_in_and_out_in_reverse_order():
    _, s1 = trained_state(seed=3, noise_seed=1)
    _, s2 = trained_state(seed=4, noise_seed=2)
    base = MLP()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    h1 = switch_in(base, s1)
    h2 = switch_in(base, s2, scale=0.5)
    fused = base.up.weight.clone()
    expected = before["up.weight"] + s1.delta("up", before["up.weight"]) + 0.5 * s2.delta("up", before["up.weight"])
    torch.testing.assert_close(fused, expected)
    switch_out(base, h2)
    switch_out(base, h1)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_switch_into_one_conv1d_layer():
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(24, 16)
    model = lorakit.apply(nn.Sequential(copy.deepcopy(layer)), SHiRAConfig(r=2, target_modules=["0"]))
    perturb_(model)
    x = torch.randn(3, 16)
    with torch.no_grad():
        adapted = model(x)
    tensors = lorakit.AdapterState.from_model(model).tensors["0"]
    before = layer.weight.clone()
    handle = switch_in(layer, tensors)
    torch.testing.assert_close(layer(x), adapted, atol=1e-5, rtol=1e-5)
    switch_out(layer, handle)
    assert torch.equal(layer.weight, before)


def test_storage_is_values_and_indices_only(tmp_path):
    model, state = trained_state(r=2)
    trainable = sum(p.numel() for p in lorakit.trainable_parameters(model).values())
    assert trainable == 2 * (32 + 48) * 2  # r·(in+out) for each of two layers
    lorakit.save_peft(model, tmp_path)
    from safetensors.torch import load_file

    flat = load_file(str(tmp_path / "adapter_model.safetensors"))
    for path in ("up", "down"):
        nnz = 2 * (32 + 48)
        assert flat[f"base_model.model.{path}.shira_weight"].shape == (nnz,)
        assert flat[f"base_model.model.{path}.shira_indices"].shape == (2, nnz)
        assert flat[f"base_model.model.{path}.shira_indices"].dtype == torch.int32
    assert len(flat) == 4
    dense_bytes = 2 * 32 * 48 * 4
    stored = sum(t.numel() * t.element_size() for t in flat.values())
    assert stored == 2 * (2 * (32 + 48)) * (4 + 8)  # fp32 value + two int32 indices per entry
    assert stored < dense_bytes


def test_update_rank_exceeds_lora_rank_at_equal_parameter_count():
    layer = nn.Linear(64, 64)
    r = 2  # LoRA rank 2 has 2·(64+64) = 256 parameters, as many as this SHiRA layer
    model = lorakit.apply(nn.Sequential(layer), SHiRAConfig(r=r, target_modules=["0"], random_seed=0))
    perturb_(model, scale=1.0)
    state = lorakit.AdapterState.from_model(model)
    rank = torch.linalg.matrix_rank(state.delta("0", layer.weight)).item()
    assert state.tensors["0"]["shira_weight"].numel() == r * (64 + 64)
    assert rank > 8 * r, rank


def test_weight_magnitude_support_is_the_largest_entries():
    model = lorakit.apply(MLP(), SHiRAConfig(r=2, target_modules=["up"], mask_type="weight_magnitude"))
    layer = model.up
    w = layer.base_layer.weight.abs()
    rows, cols = layer.shira_indices.long()
    on = torch.zeros_like(w, dtype=torch.bool)
    on[rows, cols] = True
    assert on.sum() == layer.nnz
    assert w[on].min() >= w[~on].max()


@pytest.mark.parametrize("mask_type", ["gradient", "snip"])
def test_calibrated_support_is_top_gradient_score(mask_type):
    batches = [torch.randn(4, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    loss_fn = lambda m, b: m(b).pow(2).mean()  # noqa: E731
    reference = MLP()
    for p in reference.parameters():
        p.requires_grad_(True)
    for b in batches:
        loss_fn(reference, b).backward()
    score = reference.up.weight.grad.abs()
    if mask_type == "snip":
        score = score * reference.up.weight.detach().abs()
    model = calibrate(MLP(), SHiRAConfig(r=2, target_modules=["up"], mask_type=mask_type), batches, loss_fn)
    layer = model.up
    assert layer.base_layer.weight.grad is None
    rows, cols = layer.shira_indices.long()
    on = torch.zeros_like(score, dtype=torch.bool)
    on[rows, cols] = True
    assert score[on].min() >= score[~on].max()
    layer.train()
    model(batches[0]).sum().backward()  # calibrated: trains
    assert layer.shira_weight.grad is not None


def test_uncalibrated_data_driven_support_refuses_to_train():
    model = lorakit.apply(MLP(), SHiRAConfig(r=2, target_modules=["up"], mask_type="gradient"))
    model.train()
    with pytest.raises(RuntimeError, match="calibrate"):
        model(X)


def test_too_large_rank_is_refused():
    with pytest.raises(ValueError, match="r <= "):
        lorakit.apply(MLP(d=4, h=4), SHiRAConfig(r=3, target_modules=["up"]))


# -- PEFT parity -------------------------------------------------------------------------------------
def test_random_support_matches_peft():
    pm = peft.get_peft_model(MLP(), peft.ShiraConfig(r=2, target_modules=["up", "down"], random_seed=11))
    ours = lorakit.apply(MLP(), SHiRAConfig(r=2, target_modules=["up", "down"], random_seed=11))
    for path in ("up", "down"):
        theirs = pm.base_model.model.get_submodule(path).shira_indices["default"]
        assert torch.equal(getattr(ours, path).shira_indices, theirs.to(torch.int32))
    flat = random_support(48, 32, 160, 11)
    assert torch.equal(flat, torch.sort(flat).values)


def test_peft_adapter_loads_with_same_outputs(tmp_path):
    model = peft_to_lorakit(peft.ShiraConfig(r=2, target_modules=["up", "down"], random_seed=3), tmp_path)
    assert isinstance(model.up, SHiRALinear)


def test_lorakit_adapter_loads_in_peft_with_same_outputs(tmp_path):
    lorakit_to_peft(SHiRAConfig(r=2, target_modules=["up", "down"], random_seed=3), tmp_path)
