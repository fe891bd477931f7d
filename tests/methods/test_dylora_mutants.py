"""DyLoRA's helpers where the claim tests do not look: the rank sampler's generator, set_rank's model-level config,
truncate with per-module ranks, modules_to_save and base tensors, and the messages of its refusals."""
import pytest
import torch
from torch import nn

import lorakit
from lorakit.core.apply import config_of
from lorakit.methods.dylora import DyLoRAConfig, rank_sampler, sample_rank, set_rank
from lorakit.testing import perturb_


def _model(r=4, **kw):
    model = lorakit.apply(nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 5)),
                          DyLoRAConfig(r=r, lora_alpha=8, target_modules=["0", "1"], **kw))
    perturb_(model)
    return model


def _draws(seed, n, r):
    g = torch.Generator().manual_seed(seed)
    return [int(torch.randint(1, r + 1, (1,), generator=g)) for _ in range(n)]


def test_sample_rank_draws_from_the_given_generator_only():
    """Catches: the generator not passed to randint (draws from, and advances, torch's global generator)."""
    model = _model(r=6)
    torch.manual_seed(5)
    want_global = torch.rand(3)
    torch.manual_seed(5)
    g = torch.Generator().manual_seed(11)
    drawn = [sample_rank(model, g) for _ in range(8)]
    assert drawn == _draws(11, 8, 6)
    torch.testing.assert_close(torch.rand(3), want_global)
    assert all(a.sampled_rank == drawn[-1] for a in lorakit.adapters(model).values())


@pytest.mark.parametrize("seed", [None, 3])
def test_rank_sampler_is_seeded_and_leaves_the_global_generator_alone(seed):
    """Catches: a generator not made from ``seed`` (default 0), or not passed on the first or later draws."""
    model = _model(r=6)
    torch.manual_seed(5)
    want_global = torch.rand(3)
    torch.manual_seed(5)
    callback = rank_sampler(model) if seed is None else rank_sampler(model, seed=seed)
    drawn = [lorakit.adapters(model)["0"].sampled_rank]
    for step in range(7):
        callback(step, {})
        drawn.append(lorakit.adapters(model)["0"].sampled_rank)
    assert drawn == _draws(0 if seed is None else seed, 8, 6)
    torch.testing.assert_close(torch.rand(3), want_global)


def test_no_dylora_layers_is_refused_by_name():
    with pytest.raises(ValueError, match="^Sequential has no DyLoRA layers: apply a DyLoRAConfig first$"):
        sample_rank(nn.Sequential(nn.Linear(2, 2)))


def test_set_rank_updates_the_models_config():
    """The config the model carries (what save_peft and AdapterState.from_model read) runs at the new rank.
    Catches: only the layers' configs changed."""
    model = _model()
    set_rank(model, 2)
    assert config_of(model).active_rank == 2
    state = lorakit.AdapterState.from_model(model)
    assert state.config.active_rank == 2
    layer = lorakit.adapters(model)["1"]
    want = 8 / 2 * layer.lora_B.weight[:, :2] @ layer.lora_A.weight[:2]
    torch.testing.assert_close(state.delta("1"), want.detach())
    set_rank(model, None)
    assert config_of(model).active_rank is None


def test_truncate_reads_each_modules_rank():
    """Catches: truncate checking the config's default r instead of the module's (rank_pattern), or keeping the
    rank_pattern (which would give a truncated module its old rank)."""
    model = _model(r=4, rank_pattern={"1": 2})
    state = lorakit.AdapterState.from_model(model)
    with pytest.raises(ValueError, match=r"^module '1': cannot truncate .* of rank 2 to rank 3 "
                                         r"\(Linear/Conv1D adapters, 1 <= rank <= r\)$"):
        lorakit.truncate(state, rank=3)
    low = lorakit.truncate(state, rank=1)
    assert low.config.rank_pattern == {} and low.module_config("1").r == 1 and low.module_config("0").r == 1
    layer = lorakit.adapters(model)["1"]
    torch.testing.assert_close(low.delta("1"), (8 * layer.lora_B.weight[:, :1] @ layer.lora_A.weight[:1]).detach())


def test_truncate_keeps_modules_to_save_and_base_tensors():
    state = lorakit.AdapterState.from_model(_model())
    head = {"weight": torch.randn(3, 3)}
    carried = {"embed.weight": torch.randn(4, 2)}
    full = lorakit.AdapterState(state.config, state.tensors, {"head": head}, carried)
    low = lorakit.truncate(full, rank=2)
    assert low.modules_to_save == {"head": head} and low.base_tensors == carried


def test_truncate_refuses_other_methods_by_name():
    model = lorakit.apply(nn.Sequential(nn.Linear(4, 4)), lorakit.DoRAConfig(r=2, target_modules=["0"]))
    with pytest.raises(TypeError, match="^truncate takes a DyLoRA or LoRA adapter state, found method 'dora'$"):
        lorakit.truncate(lorakit.AdapterState.from_model(model), rank=1)


@pytest.mark.parametrize("b", [1, 2])
def test_only_the_last_sampled_component_trains_at_low_ranks(b):
    """Catches: the earlier components detached from rank 3 on only (b = 2 trains both)."""
    model = lorakit.apply(nn.Sequential(nn.Linear(8, 8)), DyLoRAConfig(r=4, target_modules=["0"]))
    perturb_(model)
    layer = lorakit.adapters(model)["0"]
    layer.sampled_rank = b
    model.train()
    model(torch.randn(5, 8)).pow(2).sum().backward()
    expected = [i == b - 1 for i in range(4)]
    assert (layer.lora_A.weight.grad.abs().sum(1) > 0).tolist() == expected
    assert (layer.lora_B.weight.grad.abs().sum(0) > 0).tolist() == expected


def test_rank_one_adapts():
    """Catches: a rank-1 adapter treated as an empty one (returns the base output)."""
    base = nn.Linear(8, 8)
    model = lorakit.apply(nn.Sequential(base), DyLoRAConfig(r=1, target_modules=["0"]))
    perturb_(model)
    x = torch.randn(3, 8)
    assert not torch.allclose(model(x), base(x))


def test_rslora_scale_is_alpha_over_sqrt_b_in_forward_and_delta():
    """use_rslora: alpha / sqrt(b) at rank b, in the forward and in delta alike."""
    base = nn.Linear(8, 6)
    model = lorakit.apply(nn.Sequential(base), DyLoRAConfig(r=4, lora_alpha=8, use_rslora=True, active_rank=2,
                                                            target_modules=["0"]))
    perturb_(model)
    model.eval()
    layer = lorakit.adapters(model)["0"]
    want = (8 / 2 ** 0.5 * layer.lora_B.weight[:, :2] @ layer.lora_A.weight[:2]).detach()
    torch.testing.assert_close(lorakit.AdapterState.from_model(model).delta("0"), want)
    x = torch.randn(3, 8)
    torch.testing.assert_close(model(x), base(x) + x @ want.T)


def test_a_module_rank_below_active_rank_is_refused_by_module():
    """Catches: the module's own rank (rank_pattern) not looked up, or the message lost."""
    with pytest.raises(ValueError, match=r"^module '1': DyLoRAConfig.active_rank must be in \[1, r=2\], found 3$"):
        lorakit.apply(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)),
                      DyLoRAConfig(r=4, active_rank=3, rank_pattern={"1": 2}, target_modules=["0", "1"]))


def test_layer_errors_name_the_module():
    """Catches: the module path not handed to the layer (its errors would name no module)."""
    with pytest.raises(ValueError, match="^module '0': init_lora_weights='bogus'"):
        lorakit.apply(nn.Sequential(nn.Linear(4, 4)), DyLoRAConfig(r=4, init_lora_weights="bogus", target_modules=["0"]))


def test_bf16_base_keeps_its_dtype_with_float32_factors():
    """Catches: the input not cast to the factors' dtype, or the update not cast back to the base's."""
    base = nn.Linear(8, 6).to(torch.bfloat16)
    model = lorakit.apply(nn.Sequential(base), DyLoRAConfig(r=4, active_rank=2, target_modules=["0"]))
    perturb_(model)
    layer = lorakit.adapters(model)["0"]
    assert layer.lora_A.weight.dtype == torch.float32
    x = torch.randn(3, 8).to(torch.bfloat16)
    out = model(x)
    assert out.dtype == torch.bfloat16
    want = base(x).float() + x.float() @ lorakit.AdapterState.from_model(model).delta("0").T
    torch.testing.assert_close(out.float(), want, rtol=0.02, atol=0.02)
