"""DyLoRA claims: one training run serves every rank b <= r; truncated adapters are plain LoRA adapters with the
same outputs as the model run at rank b; at rank b only the b-th row/column trains (official recipe)."""
import copy
import warnings

import pytest
import torch
from torch import nn

import lorakit
from lorakit.methods.dylora import DyLoRAConfig, DyLoRALinear, sample_rank, set_rank
from lorakit.testing import ToyLinear, check_method, perturb_

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _trained(tiny, **kw):
    model = lorakit.apply(tiny.make(), DyLoRAConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS, **kw}))
    gen = torch.Generator().manual_seed(0)
    return tiny.train(model, steps=4, before_step=lambda m: sample_rank(m, gen))


def test_conformance():
    assert check_method("dylora")
    at_two = DyLoRAConfig(r=4, lora_alpha=8, target_modules=ToyLinear.targets, active_rank=2)
    assert check_method("dylora", config=at_two, toys=[ToyLinear])


@pytest.mark.parametrize("b", [1, 2, 3, 4])
def test_truncated_state_is_the_adapter_at_rank_b(tiny, tmp_path, b):
    from peft import PeftModel

    model = _trained(tiny)
    lorakit.save_peft(model, tmp_path / "full")
    state = lorakit.AdapterState.from_model(model)
    low = lorakit.truncate(state, rank=b)
    assert type(low.config) is lorakit.LoRAConfig and low.config.r == b and low.config.lora_alpha == 8
    assert all(t["lora_A.weight"].shape[0] == b and t["lora_B.weight"].shape[1] == b for t in low.tensors.values())
    at_b = tiny.logits(set_rank(model, b))
    torch.testing.assert_close(tiny.logits(low.load_into(tiny.make())), at_b)
    config_b = lorakit.load_peft(tiny.make(), tmp_path / "full")  # the full file, run through the config field
    set_rank(config_b, b)
    torch.testing.assert_close(tiny.logits(config_b), at_b)
    lorakit.save_state(low, tmp_path / "low")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(tiny.make(), str(tmp_path / "low"))
    torch.testing.assert_close(tiny.logits(peft_model), at_b, atol=1e-5, rtol=1e-4)


def test_scale_is_alpha_over_b():
    config = DyLoRAConfig(r=6, lora_alpha=12, active_rank=3)
    g = torch.Generator().manual_seed(0)
    tensors = {"lora_A.weight": torch.randn(6, 10, generator=g), "lora_B.weight": torch.randn(7, 6, generator=g)}
    wanted = 12 / 3 * tensors["lora_B.weight"][:, :3] @ tensors["lora_A.weight"][:3]
    torch.testing.assert_close(DyLoRALinear.delta(tensors, config, None), wanted)


@pytest.mark.parametrize("last_only", [True, False])
def test_gradients_reach_the_sampled_components(last_only):
    model = lorakit.apply(nn.Sequential(nn.Linear(8, 8)), DyLoRAConfig(r=4, target_modules=["0"], train_last_only=last_only))
    perturb_(model)
    layer = lorakit.adapters(model)["0"]
    layer.sampled_rank = 3
    model.train()
    model(torch.randn(5, 8)).pow(2).sum().backward()
    rows_a = layer.lora_A.weight.grad.abs().sum(1) > 0
    cols_b = layer.lora_B.weight.grad.abs().sum(0) > 0
    expected = [not last_only, not last_only, True, False]
    assert rows_a.tolist() == expected and cols_b.tolist() == expected


def test_rank_must_fit():
    with pytest.raises(ValueError, match="active_rank"):
        DyLoRAConfig(r=4, active_rank=5)
    model = lorakit.apply(nn.Sequential(nn.Linear(8, 8)), DyLoRAConfig(r=4, target_modules=["0"]))
    with pytest.raises(ValueError, match="active_rank"):
        set_rank(model, 6)
    with pytest.raises(ValueError, match="rank 4 to rank 5"):
        lorakit.truncate(lorakit.AdapterState.from_model(model), rank=5)


def _fit(config, dynamic, base, x, y):
    model = lorakit.apply(copy.deepcopy(base), config)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(250):
        if dynamic:
            sample_rank(model, gen)
        idx = torch.randint(0, len(x), (64,), generator=gen)
        (model(x[idx]) - y[idx]).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    state = lorakit.AdapterState.from_model(model.eval())
    errors = []
    for b in range(1, 9):
        with torch.no_grad():
            errors.append((lorakit.truncate(state, b).load_into(copy.deepcopy(base))(x) - y).pow(2).mean().item())
    return errors


def test_one_run_serves_every_rank():
    """The paper's claim: DyLoRA truncated to b stays good, LoRA trained at r and truncated to b does not."""
    torch.manual_seed(0)
    d, base = 32, nn.Sequential(nn.Linear(32, 32))
    g = torch.Generator().manual_seed(0)
    u, v = (torch.linalg.qr(torch.randn(d, d, generator=g))[0][:, :8] for _ in range(2))
    strengths = torch.tensor([2.0 ** -i for i in range(8)])  # a rank-8 target update with ordered components
    x = torch.randn(2048, d, generator=g)
    with torch.no_grad():
        y = base(x) + x @ ((u * strengths) @ v.T).T
    dylora = _fit(DyLoRAConfig(r=8, lora_alpha=8, target_modules=["0"]), True, base, x, y)
    lora = _fit(lorakit.LoRAConfig(r=8, lora_alpha=8, target_modules=["0"]), False, base, x, y)
    best = [(strengths[b:] ** 2).sum().item() / d for b in range(1, 9)]  # error of the best rank-b update
    for b in (1, 2, 3):
        assert dylora[b - 1] < 0.5 * lora[b - 1], (b, dylora, lora)
    assert dylora[0] < 2 * best[0], (dylora, best)
    assert lora[-1] < 1e-3 and dylora[-1] < 0.01  # both fit at full rank; DyLoRA pays a little there


def test_fit_with_rank_sampler_trains_the_sampled_components(tiny):
    from lorakit.methods.dylora import rank_sampler
    from lorakit.train import fit

    model = lorakit.apply(tiny.make(), DyLoRAConfig(r=8, lora_alpha=8, target_modules=["q_proj"]))
    layer = lorakit.adapters(model)["model.layers.0.self_attn.q_proj"]
    sampler = rank_sampler(model, seed=3)
    used = [layer.sampled_rank]
    data = [{"input_ids": ids, "labels": ids} for ids in tiny.batch(5, size=12)]
    before = layer.lora_B.weight.detach().clone()
    fit(model, data, max_steps=6, batch_size=2, lr=1e-2, warmup_ratio=0.0, progress=False,
        callbacks=[sampler, lambda step, record: used.append(layer.sampled_rank)])
    used = used[:6]  # the draw after the last step is never trained on
    assert len(set(used)) > 1
    moved = (layer.lora_B.weight.detach() - before).abs().sum(0) > 0
    assert moved.tolist() == [b in used for b in range(1, 9)]  # Adam keeps moving a column once it has trained
