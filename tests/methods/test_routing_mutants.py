"""Golden values of the routed methods' maths on tiny tensors: the block-gated forward pass, top-k gates, router
losses, SMoRA's load balancing, and experts stacked from LoRA adapters."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import lorakit
from lorakit.core.adapter import NotMergeableError
from lorakit.core.capabilities import CapabilityError
from lorakit.methods import experts, lora_mixer, meteora, routing, smora


def _layer(config, in_features=2, out_features=1, bias=0.0):
    base = torch.nn.Linear(in_features, out_features)
    with torch.no_grad():
        base.weight.zero_()
        base.bias.fill_(bias)
    return lorakit.apply(torch.nn.Sequential(base), config)[0]


def mixer(in_features=2, out_features=1, **fields):
    fields = {"r": 1, "num_experts": 2, "top_k": 1, "lora_alpha": 1, **fields}
    return _layer(lora_mixer.LoRAMixerConfig(target_modules=["0"], **fields), in_features, out_features)


def entropy(p):
    return -sum(q * math.log(q) for q in p if q > 0)


def test_forward_gates_each_block_of_ranks():
    layer = mixer(r=2, num_experts=2, lora_alpha=4)  # scaling 4 / 2 = 2
    layer.base_layer.bias.data.fill_(1.0)
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]]))
        layer.lora_B.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    gates = torch.tensor([[0.25, 0.75]])
    layer.route = lambda x: gates
    # A x = [1, 2, 3, 2]; gated per block [.25, .25, .75, .75] -> [.25, .5, 2.25, 1.5]; B . = 14; · 2 + bias 1
    out = layer(torch.tensor([[1.0, 2.0]]))
    torch.testing.assert_close(out, torch.tensor([[29.0]]))
    assert torch.equal(layer.last_gates, gates)
    layer.disabled = True
    torch.testing.assert_close(layer(torch.tensor([[1.0, 2.0]])), torch.tensor([[1.0]]))


def test_tokens_leave_padding_out():
    layer = mixer()
    t = torch.arange(12.0).reshape(2, 3, 2)
    assert layer.tokens(t).shape == (6, 2)
    layer.token_mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(layer.tokens(t), torch.tensor([[0.0, 1.0], [2.0, 3.0], [6.0, 7.0]]))
    layer.token_mask = torch.ones(2, 2, dtype=torch.bool)  # does not fit: every row
    assert layer.tokens(t).shape == (6, 2)


def test_top_k_gates_golden():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    gates, idx = routing.top_k_gates(logits, 2)
    assert idx.tolist() == [[1, 2]]
    e = math.exp(1.0)
    torch.testing.assert_close(gates, torch.tensor([[0.0, e / (e + 1), 1 / (e + 1), 0.0]]))
    gates, _ = routing.top_k_gates(logits, 2, temperature=0.5)  # logits / T = 6, 4: weights e^2 : 1
    e2 = math.exp(2.0)
    torch.testing.assert_close(gates, torch.tensor([[0.0, e2 / (e2 + 1), 1 / (e2 + 1), 0.0]]))


def test_supervised_loss_per_example_per_token_and_padding():
    layer = mixer()
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])  # [1 example, 3 tokens, 2 experts]
    assert routing.supervised_loss(layer, logits) is None
    flat = logits.reshape(3, 2)
    layer.route_target = torch.tensor([1])  # every token of the example: expert 1
    torch.testing.assert_close(routing.supervised_loss(layer, logits), F.cross_entropy(flat, torch.tensor([1, 1, 1])))
    layer.route_target = torch.tensor([[0, 1, -100]])  # per token, the last one ignored
    want = (F.cross_entropy(flat[:1], torch.tensor([0])) + F.cross_entropy(flat[1:2], torch.tensor([1]))) / 2
    torch.testing.assert_close(routing.supervised_loss(layer, logits), want)
    layer.route_target, layer.token_mask = torch.tensor([0]), torch.tensor([[True, False, True]])
    want = (F.cross_entropy(flat[:1], torch.tensor([0])) + F.cross_entropy(flat[2:], torch.tensor([0]))) / 2
    torch.testing.assert_close(routing.supervised_loss(layer, logits), want)


def two_layer_model(config):
    return lorakit.apply(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)), config)


def test_aux_loss_is_the_mean_over_layers_and_route_context_resets():
    model = two_layer_model(lora_mixer.LoRAMixerConfig(r=1, num_experts=2, top_k=1, target_modules=["0", "1"]))
    assert set(routing.routed_layers(model)) == {"0", "1"}
    assert routing.aux_loss(model).item() == 0.0
    model[0].aux_loss = torch.tensor(1.0)
    assert routing.aux_loss(model).item() == 1.0
    model[1].aux_loss = torch.tensor(4.0)
    assert routing.aux_loss(model).item() == 2.5
    mask, labels = torch.ones(1, 2, dtype=torch.bool), torch.tensor([1])
    with routing.route_context(model, mask, labels) as m:
        assert m is model
        assert all(layer.token_mask is mask and layer.route_target is labels for layer in (model[0], model[1]))
    assert all(layer.token_mask is None and layer.route_target is None for layer in (model[0], model[1]))


class _Out:
    def __init__(self, loss):
        self.loss = loss


class _Model(torch.nn.Module):
    """Returns the sum of its output as the loss and records what the routed layers saw."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(2, 2)
        self.seen = None

    def forward(self, x, attention_mask=None):
        self.seen = (self.proj.route_target, self.proj.token_mask)
        return _Out(self.proj(x).sum())


def test_loss_fn_adds_the_supervised_gate_loss():
    torch.manual_seed(0)
    model = lorakit.apply(_Model(), meteora.MeteoRAConfig(r=1, num_experts=2, top_k=1, gate_loss_coef=3.0,
                                                           target_modules=["proj"]))
    model.train()
    x, labels, mask = torch.randn(1, 3, 2), torch.tensor([1]), torch.ones(1, 3, dtype=torch.bool)
    loss = routing.loss_fn(model, {"x": x, "attention_mask": mask, "route_labels": labels})
    assert model.seen[0] is labels and model.seen[1] is mask
    with torch.no_grad():
        base = model.proj(x).sum()  # experts start at B = 0: the output is the base layer's
        ce = F.cross_entropy(model.proj.moe_gate(x).reshape(3, 2), torch.tensor([1, 1, 1]))
    torch.testing.assert_close(loss, base + 3.0 * ce)
    assert model.proj.route_target is None


def test_meteora_route_golden():
    layer = _layer(meteora.MeteoRAConfig(r=1, num_experts=3, top_k=2, temperature=0.5, gate_loss_coef=2.0,
                                         target_modules=["0"]))
    assert layer.lora_B.weight.abs().sum() == 0 and layer.lora_A.weight.abs().sum() > 0  # PEFT's initialisation
    with torch.no_grad():
        layer.moe_gate.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    x = torch.tensor([[3.0, 2.0]])  # logits 3, 2, 0 -> top 2: 3, 2 -> / T: 6, 4
    layer.eval()
    gates = layer.route(x)
    e2 = math.exp(2.0)
    torch.testing.assert_close(gates, torch.tensor([[e2 / (e2 + 1), 1 / (e2 + 1), 0.0]]))
    assert layer.aux_loss is None
    layer.train()
    layer.route(x)
    assert layer.aux_loss is None  # no labels
    layer.route_target = torch.tensor([2])
    layer.route(x.unsqueeze(0))
    want = 2.0 * F.cross_entropy(torch.tensor([[3.0, 2.0, 0.0]]), torch.tensor([2]))
    torch.testing.assert_close(layer.aux_loss, want)


def test_meteora_gate_starts_standard_normal():
    torch.manual_seed(0)
    layer = _layer(meteora.MeteoRAConfig(r=1, num_experts=64, top_k=1, target_modules=["0"]), in_features=64)
    w = layer.moe_gate.weight
    assert abs(w.mean().item()) < 0.05 and abs(w.std().item() - 1.0) < 0.05


def test_mixer_route_renormalises_the_top_k_and_passes_gradients_straight_through():
    for straight in (True, False):
        layer = mixer(num_experts=3, top_k=2, straight_through=straight)
        with torch.no_grad():
            layer.lora_router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        x = torch.tensor([[math.log(0.5), math.log(0.3)]])  # logits log .5, log .3, 0: p ∝ .5, .3, 1; top 2: 0, 2
        p = torch.tensor([0.5, 0.3, 1.0]) / 1.8
        layer.eval()
        gates = layer.route(x)
        assert layer.aux_loss is None
        torch.testing.assert_close(gates.detach(), torch.tensor([[0.5 / 1.5, 0.0, 1.0 / 1.5]]))
        gates[0, 1].backward()  # the unselected expert: its dense probability's gradient, or none
        grad = layer.lora_router.weight.grad
        if straight:
            want = torch.zeros(3, 2)
            want[1] = p[1] * (1 - p[1]) * x[0]
            want[0], want[2] = -p[1] * p[0] * x[0], -p[1] * p[2] * x[0]
            torch.testing.assert_close(grad, want)
        else:
            assert grad is None or grad.abs().sum() == 0
        layer.train()
        layer.route(x)
        torch.testing.assert_close(layer.aux_loss, layer.router_loss(p.reshape(1, 3), torch.tensor([[1.0, 0.0, 1.0]])))


def test_mixer_router_loss_golden():
    layer = mixer(num_experts=3, top_k=2, balance_coef=1.0, specialization_coef=2.0, reuse_coef=3.0)
    p = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.5, 0.3]])
    chosen = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    # f = [.5, 1, .5] / 2; P = [.35, .4, .25]; E · Σ f P = 3 · .35
    want = 1.0 * 1.05 + 2.0 * entropy([0.5, 0.3, 0.2]) - 3.0 * entropy([0.35, 0.4, 0.25])
    torch.testing.assert_close(layer.router_loss(p, chosen), torch.tensor(want))
    layer.token_mask = torch.tensor([[True, False]])  # padding: the second token is left out
    want = 1.0 * 3 * (0.5 * 0.5 + 0.5 * 0.3) + 2.0 * entropy([0.5, 0.3, 0.2]) - 3.0 * entropy([0.5, 0.3, 0.2])
    torch.testing.assert_close(layer.router_loss(p[None], chosen[None]), torch.tensor(want))


def test_entropy_golden():
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.25, 0.25, 0.5]])
    torch.testing.assert_close(lora_mixer.entropy(p), torch.tensor([math.log(2.0), 0.0, 1.5 * math.log(2.0)]))


def smora_layer(**fields):
    fields = {"r": 4, "top_k": 2, "lora_alpha": 4, "bias_u": 0.5, **fields}
    return _layer(smora.SMoRAConfig(target_modules=["0"], **fields))


def test_smora_k_default_and_bounds():
    assert smora.SMoRAConfig(r=64).k == 8 and smora.SMoRAConfig(r=4).k == 1 and smora.SMoRAConfig(r=8).k == 1
    assert smora.SMoRAConfig(r=16).k == 2 and smora.SMoRAConfig(r=4, top_k=4).k == 4
    for top_k in (0, 5):
        with pytest.raises(ValueError, match="top_k"):
            smora.SMoRAConfig(r=4, top_k=top_k).k


def test_smora_route_bias_selects_but_does_not_weigh():
    layer = smora_layer()
    assert layer.k == 2 and layer.lora_router_bias.abs().sum() == 0
    with torch.no_grad():
        layer.lora_router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [-1.0, 0.0]]))
    x = torch.tensor([[1.0, 2.0]])  # z = 1, 2, 0, -1
    layer.eval()
    e = math.exp(1.0)
    torch.testing.assert_close(layer.route(x), torch.tensor([[2 / (e + 1), 2 * e / (e + 1), 0.0, 0.0]]))
    assert layer.aux_loss is None and layer.lora_router_bias.abs().sum() == 0  # eval: no balancing
    layer.lora_router_bias.copy_(torch.tensor([0.0, 0.0, 1.5, 0.0]))  # z + b = 1, 2, 1.5, -1: ranks 1 and 2
    w = torch.softmax(torch.tensor([2.0, 0.0]), -1) * 2
    torch.testing.assert_close(layer.route(x), torch.tensor([[0.0, w[0].item(), w[1].item(), 0.0]]))


def test_smora_balance_step_golden():
    layer = smora_layer()
    layer.train()
    layer._balance(torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2]]))  # load 3, 2, 2, 1; mean 2
    torch.testing.assert_close(layer.lora_router_bias, torch.tensor([-0.5, 0.0, 0.0, 0.5]))
    layer.token_mask = torch.tensor([True, False, False, False])  # only the first token counts: load 1, 1, 0, 0
    layer._balance(torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2]]))
    torch.testing.assert_close(layer.lora_router_bias, torch.tensor([-1.0, -0.5, 0.5, 1.0]))


def test_smora_training_pass_moves_the_bias_unless_bias_u_is_zero():
    for bias_u, moved in ((0.5, True), (0.0, False)):
        layer = smora_layer(bias_u=bias_u)
        with torch.no_grad():
            layer.lora_router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [-1.0, 0.0]]))
        layer.train()
        layer(torch.tensor([[1.0, 2.0]]))  # ranks 0 and 1 chosen: load 1, 1, 0, 0, mean .5
        want = torch.tensor([-0.5, -0.5, 0.5, 0.5]) if moved else torch.zeros(4)
        torch.testing.assert_close(layer.lora_router_bias, want)
        assert layer.aux_loss is None


def test_smora_rank_load():
    layer = smora_layer()
    with pytest.raises(ValueError, match="no forward pass"):
        layer.rank_load()
    layer.last_gates = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    torch.testing.assert_close(layer.rank_load(), torch.tensor([1.0, 0.5, 0.5, 0.0]))


def lora_state(modules: dict, r: int, alpha: float, base=None):
    config = lorakit.LoRAConfig(r=r, lora_alpha=alpha, target_modules=sorted(modules), base_model_name_or_path=base)
    return lorakit.AdapterState(config, {p: {"lora_A.weight": a, "lora_B.weight": b} for p, (a, b) in modules.items()})


def test_stacked_experts_fold_scaling_pad_ranks_and_zero_missing_modules():
    a0, b0 = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0], [4.0]])  # rank 1, scaling 2 / 1 = 2
    a1, b1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # rank 2, scaling 1 / 2
    s0 = lora_state({"0": (a0, b0), "1": (a0, b0)}, r=1, alpha=2, base="m")
    s1 = lora_state({"1": (a1, b1)}, r=2, alpha=1, base="m")
    assert experts.max_rank([s0, s1]) == 2
    model = lora_mixer.from_adapters(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)), [s0, s1], top_k=5)
    cfg = model[1].config
    assert (cfg.r, cfg.lora_alpha, cfg.num_experts, cfg.top_k, cfg.train_experts) == (2, 2.0, 2, 2, False)
    assert cfg.base_model_name_or_path == "m" and cfg.target_modules == ["0", "1"]
    assert model[1].scaling == 1.0
    want_a = torch.tensor([[1.0, 2.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    want_b = torch.tensor([[6.0, 0.0, 0.5, 1.0], [8.0, 0.0, 1.5, 2.0]])
    torch.testing.assert_close(model[1].lora_A.weight, want_a)
    torch.testing.assert_close(model[1].lora_B.weight, want_b)
    torch.testing.assert_close(model[0].lora_A.weight, torch.cat([want_a[:2], torch.zeros(2, 2)]))
    torch.testing.assert_close(model[0].lora_B.weight, torch.cat([want_b[:, :2], torch.zeros(2, 2)], 1))
    assert not lorakit.trainable_parameters(model).keys() & {"1.lora_A.weight", "1.lora_B.weight"}
    trainable = meteora.from_adapters(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)),
                                      [s0, s1], freeze=False)
    assert trainable[1].config.train_experts and "1.lora_A.weight" in lorakit.trainable_parameters(trainable)
    torch.testing.assert_close(trainable[1].lora_B.weight, want_b)
    other = lora_state({"1": (a1, b1)}, r=2, alpha=1, base="n")
    mixed = meteora.from_adapters(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)), [s0, other])
    assert mixed[1].config.base_model_name_or_path is None


def test_stacked_factors_and_load_experts_refuse_what_does_not_fit():
    a, b = torch.ones(2, 2), torch.ones(2, 2)
    layer = mixer(in_features=2, out_features=2, r=1, num_experts=1)
    with pytest.raises(ValueError, match="do not fit a block of 1 ranks"):
        experts.stacked_factors([lora_state({"0": (a, b)}, r=2, alpha=2)], layer)
    with pytest.raises(ValueError, match="do not fit"):
        experts.stacked_factors([lora_state({"0": (torch.ones(1, 3), torch.ones(2, 1))}, r=1, alpha=1)], layer)
    with pytest.raises(ValueError, match="do not fit"):
        experts.stacked_factors([lora_state({"0": (torch.ones(1, 2), torch.ones(3, 1))}, r=1, alpha=1)], layer)
    with pytest.raises(ValueError, match="^no experts given: pass LoRA adapter directories or AdapterStates$"):
        experts.expert_states([])
    one = lora_state({"0": (torch.ones(1, 2), torch.ones(2, 1))}, r=1, alpha=1)
    with pytest.raises(ValueError, match="no routed adapter layers"):
        experts.load_experts(torch.nn.Sequential(torch.nn.Linear(2, 2)), [one])
    model = torch.nn.Sequential(layer)
    with pytest.raises(ValueError, match="does not hold: 1"):
        experts.load_experts(model, [lora_state({"1": (torch.ones(1, 2), torch.ones(2, 1))}, r=1, alpha=1)])
    with pytest.raises(ValueError, match="has 1 experts; 2 adapters"):
        experts.load_experts(model, [one, one])


def test_delta_is_refused():
    with pytest.raises(NotMergeableError, match="routes each token to its own experts"):
        meteora.MeteoRALinear.delta({}, meteora.MeteoRAConfig(), None)


@pytest.mark.parametrize("config", [
    meteora.MeteoRAConfig(r=1, num_experts=2, top_k=1, target_modules=["0"]),
    lora_mixer.LoRAMixerConfig(r=1, num_experts=2, top_k=1, target_modules=["0"]),
    smora.SMoRAConfig(r=2, top_k=1, target_modules=["0"]),
])
def test_factors_follow_the_base_dtype_and_half_bases_compute_in_fp32(config):
    wide = lorakit.apply(torch.nn.Sequential(torch.nn.Linear(2, 2).double()), config)[0]
    assert all(t.dtype == torch.float64 for t in wide.state_dict().values())
    half = lorakit.apply(torch.nn.Sequential(torch.nn.Linear(2, 2).bfloat16()), config)[0]
    assert half.lora_A.weight.dtype == torch.float32
    assert half(torch.ones(1, 2, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_dropout_only_when_asked():
    assert isinstance(mixer().lora_dropout, torch.nn.Identity)
    dropout = mixer(lora_dropout=0.5).lora_dropout
    assert isinstance(dropout, torch.nn.Dropout) and dropout.p == 0.5


def test_mixer_selected_gates_keep_the_gradient_of_the_renormalised_weight():
    for straight in (True, False):
        layer = mixer(num_experts=3, top_k=2, straight_through=straight)
        w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
        with torch.no_grad():
            layer.lora_router.weight.copy_(w)
        x = torch.tensor([[math.log(0.5), math.log(0.3)]])  # top 2: experts 0 and 2
        layer.route(x)[0, 0].backward()
        ref = w.clone().requires_grad_()
        p = torch.softmax(x @ ref.T, -1)[0]
        (p[0] / (p[0] + p[2])).backward()
        torch.testing.assert_close(layer.lora_router.weight.grad, ref.grad)


def test_gate_losses_only_in_training():
    layer = _layer(meteora.MeteoRAConfig(r=1, num_experts=2, top_k=1, target_modules=["0"]))
    layer.route_target = torch.tensor([1])
    layer.eval()
    layer.route(torch.ones(1, 3, 2))
    assert layer.aux_loss is None
    layer.train()
    layer.route(torch.ones(1, 3, 2))
    assert layer.aux_loss is not None


def test_smora_rank_load_error_names_the_module():
    with pytest.raises(ValueError, match="module '0': no forward pass"):
        smora_layer().rank_load()


def test_expert_states_refuse_non_lora_adapters(tmp_path):
    model = lorakit.apply(torch.nn.Sequential(torch.nn.Linear(2, 2)),
                          meteora.MeteoRAConfig(r=1, num_experts=2, top_k=1, target_modules=["0"]))
    state = lorakit.AdapterState.from_model(model)
    with pytest.raises(CapabilityError, match=r"use expert 0 \(an AdapterState\) as a block"):
        experts.expert_states([state])
    path = lorakit.save_state(state, tmp_path / "routed")
    with pytest.raises(CapabilityError, match=rf"use expert 0 \({path}\) as a block"):
        experts.expert_states([str(path)])


def pair():
    return torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))


def test_from_adapters_defaults_and_fields():
    one = lora_state({"1": (torch.ones(1, 2), torch.ones(2, 1))}, r=1, alpha=1)
    for module, extra in ((meteora, {"temperature": 0.5}), (lora_mixer, {"balance_coef": 0.5})):
        model = module.from_adapters(pair(), [one, one, one], **extra)
        cfg = model[1].config
        assert cfg.top_k == 2 and not cfg.train_experts
        assert all(getattr(cfg, k) == v for k, v in extra.items())
    direct = experts.from_adapters(pair(), meteora.MeteoRAConfig, [one], top_k=1)
    assert not direct[1].config.train_experts


def test_stacked_factors_skip_a_first_expert_without_the_module_and_fold_the_layer_scaling():
    a0, b0 = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0], [4.0]])
    s0 = lora_state({"0": (a0, b0), "1": (a0, b0)}, r=1, alpha=2)  # scaling 2
    s1 = lora_state({"1": (a0, b0)}, r=1, alpha=1)  # scaling 1
    model = meteora.from_adapters(pair(), [s1, s0])
    torch.testing.assert_close(model[0].lora_A.weight, torch.cat([torch.zeros(1, 2), a0]))
    torch.testing.assert_close(model[0].lora_B.weight, torch.cat([torch.zeros(2, 1), 2 * b0], 1))
    layer = mixer(in_features=2, out_features=2, r=1, num_experts=2, lora_alpha=4)  # scaling 4
    only = [lora_state({"0": (a0, b0)}, r=1, alpha=alpha) for alpha in (2, 1)]
    experts.load_experts(torch.nn.Sequential(layer), only)
    torch.testing.assert_close(layer.lora_B.weight, torch.cat([b0 / 2, b0 / 4], 1))


def test_load_experts_messages():
    with pytest.raises(ValueError, match="Sequential has no routed adapter layers"):
        experts.load_experts(pair(), [lora_state({"0": (torch.ones(1, 2), torch.ones(2, 1))}, r=1, alpha=1)])
    many = lora_state({name: (torch.ones(1, 2), torch.ones(2, 1)) for name in "abcdefghi"}, r=1, alpha=1)
    with pytest.raises(ValueError, match="does not hold: a, b, c, d, e, f, g, h$"):
        experts.load_experts(torch.nn.Sequential(mixer(out_features=2, num_experts=1)), [many])


def test_mixer_from_adapters_passes_top_k_and_freeze():
    one = lora_state({"1": (torch.ones(1, 2), torch.ones(2, 1))}, r=1, alpha=1)
    model = lora_mixer.from_adapters(pair(), [one])  # top_k 2 capped at one expert
    assert model[1].config.top_k == 1
    assert lora_mixer.from_adapters(pair(), [one, one], freeze=False)[1].config.train_experts


def test_from_adapters_keeps_the_experts_layout():
    from transformers.pytorch_utils import Conv1D

    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0], [4.0]])
    state = lorakit.AdapterState(lorakit.LoRAConfig(r=1, lora_alpha=1, fan_in_fan_out=True, target_modules=["0"]),
                                 {"0": {"lora_A.weight": a, "lora_B.weight": b}})
    model = meteora.from_adapters(torch.nn.Sequential(Conv1D(2, 2)), [state], top_k=1)
    assert model[0].config.fan_in_fan_out
    x = torch.tensor([[1.0, 1.0]])
    with torch.no_grad():
        torch.testing.assert_close(model[0](x) - model[0].base_layer(x), x @ (b @ a).T)


@pytest.mark.parametrize("config", [
    meteora.MeteoRAConfig(r=1, num_experts=2, top_k=1, target_modules=["0"]),
    lora_mixer.LoRAMixerConfig(r=1, num_experts=2, top_k=1, target_modules=["0"]),
    smora.SMoRAConfig(r=2, top_k=1, target_modules=["0"]),
])
def test_factors_losses_and_labels_follow_the_base_device(config):
    # the meta device stands in for an accelerator: a tensor left on the CPU shows up, or fails to combine
    model = lorakit.apply(torch.nn.Sequential(torch.nn.Linear(2, 2, device="meta")), config)
    assert {t.device.type for t in model.state_dict().values()} == {"meta"}
    assert routing.aux_loss(model).device.type == "meta"
    layer = model[0]
    layer.route_target, layer.token_mask = torch.tensor([1]), torch.ones(1, 3, dtype=torch.bool)  # on the CPU
    assert routing.supervised_loss(layer, torch.ones(1, 3, 2, device="meta")).device.type == "meta"
