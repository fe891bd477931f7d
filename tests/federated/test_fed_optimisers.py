"""Server optimisers (FedAdam / FedYogi / FedAdagrad) against hand-computed steps, FedProx's gradient, refusals."""
from __future__ import annotations

import math

import pytest
import torch
from fedutil import aggregate_of, run, toy

from lorakit.core.config import LoRAConfig
from lorakit.core.state import AdapterState
from lorakit.federated.cli import cli_main
from lorakit.federated.experiment import Settings
from lorakit.federated.optimisers import ServerOptimiser, proximal


def _state(a: float, b: float, head: float = 0.0) -> AdapterState:
    t = lambda x: torch.tensor([[x]], dtype=torch.float64)  # noqa: E731
    return AdapterState(LoRAConfig(r=1, target_modules=["q"]), {"q": {"lora_A.weight": t(a), "lora_B.weight": t(b)}},
                        {"head": {"weight": t(head)}})


def _a(state):
    return state.tensors["q"]["lora_A.weight"].item()


# eta 0.1, tau 0.5, beta1 = beta2 = 0.5, x0 = 1; round 1 aggregate 1.4 (delta 0.4), round 2 delta 0.6.
# m1 = 0.2, v0 = tau^2 = 0.25; m2 = 0.5 * 0.2 + 0.5 * 0.6 = 0.4.
HAND = {
    "adam": (0.5 * 0.25 + 0.5 * 0.16, lambda v1: 0.5 * v1 + 0.5 * 0.36),
    "adagrad": (0.25 + 0.16, lambda v1: v1 + 0.36),
    "yogi": (0.25 - 0.5 * 0.16, lambda v1: v1 + 0.5 * 0.36),  # sign(v - delta^2): +1, then -1 (0.17 < 0.36)
}


@pytest.mark.parametrize("kind", sorted(HAND))
def test_two_server_steps_equal_the_closed_form(kind):
    opt = ServerOptimiser(kind, eta=0.1, beta1=0.5, beta2=0.5, tau=0.5)
    x1 = opt.step(_state(1.0, 0.0), _state(1.4, 0.0))
    v1, v2 = HAND[kind][0], HAND[kind][1](HAND[kind][0])
    want1 = 1.0 + 0.1 * 0.2 / (math.sqrt(v1) + 0.5)
    assert _a(x1) == pytest.approx(want1, abs=1e-14)
    assert x1.tensors["q"]["lora_B.weight"].item() == 0.0  # no pseudo-gradient, no move
    x2 = opt.step(x1, _state(want1 + 0.6, 0.0))
    assert _a(x2) == pytest.approx(want1 + 0.1 * 0.4 / (math.sqrt(v2) + 0.5), abs=1e-14)


def test_beta1_zero_adam_moves_by_eta_delta_over_abs_delta_plus_tau():
    opt = ServerOptimiser("adam", eta=0.1, beta1=0.0, beta2=0.0, tau=0.5)  # m = delta, v = delta^2
    x1 = opt.step(_state(1.0, -2.0, 3.0), _state(1.5, -2.5, 3.0))
    assert _a(x1) == pytest.approx(1.0 + 0.1 * 0.5 / 1.0, abs=1e-15)
    assert x1.tensors["q"]["lora_B.weight"].item() == pytest.approx(-2.0 - 0.1 * 0.5 / 1.0, abs=1e-15)
    assert x1.modules_to_save["head"]["weight"].item() == 3.0


def test_frozen_tensors_are_copied_not_moved():
    opt = ServerOptimiser("adam", frozen=("lora_A.weight",))
    x1 = opt.step(_state(1.0, 0.0), _state(1.0, 0.3))
    assert _a(x1) == 1.0 and not any(k.endswith("lora_A.weight") for k in opt.state)


def test_the_run_applies_fedadam_to_the_aggregate_of_the_replies():
    settings = toy(num_rounds=1, server_opt="adam", server_lr=0.05, server_beta1=0.9, server_beta2=0.99, server_tau=1e-3)
    strategy, sent, _ = run(settings)
    plain = aggregate_of(strategy, sent, 1, {0, 1, 2, 3})
    start = strategy.reference
    for path, tensors in plain.tensors.items():
        for key, agg in tensors.items():
            x0, d = start.tensors[path][key].double(), agg.double() - start.tensors[path][key].double()
            want = x0 + 0.05 * 0.1 * d / ((0.99 * 1e-6 + 0.01 * d * d).sqrt() + 1e-3)
            assert torch.allclose(strategy.state.adapter.tensors[path][key].double(), want, atol=1e-6)
            assert not torch.allclose(want, agg.double(), atol=1e-6)  # the server step changed the aggregate


def test_proximal_term_adds_its_exact_gradient():
    torch.manual_seed(0)
    model, x = torch.nn.Linear(3, 2), torch.randn(4, 3)
    frozen_bias = model.bias.requires_grad_(False)
    start = [p.detach().clone() for p in model.parameters()]
    with proximal(model, mu=0.7):
        with torch.no_grad():
            model.weight.add_(torch.randn(2, 3))  # as if training had moved away from the global weights
        model(x).pow(2).sum().backward()
    got = model.weight.grad.clone()
    model.weight.grad = None
    w = model.weight
    (model(x).pow(2).sum() + 0.35 * (w - start[0]).pow(2).sum()).backward()
    assert torch.allclose(got, model.weight.grad, atol=1e-6) and frozen_bias.grad is None
    model.weight.grad = None
    model(x).pow(2).sum().backward()  # outside the context the hook is gone
    assert not torch.allclose(got, model.weight.grad, atol=1e-3)


@pytest.mark.parametrize("changes,match", [
    (dict(strategy="flora", server_opt="adam"), "does not apply to strategy 'flora'"),
    (dict(server_opt="sgd"), "server-opt 'sgd' is not one of"),
    (dict(server_opt="adam", server_beta1=1.0), "server-beta1"),
    (dict(server_opt="yogi", server_tau=0.0), "server-tau"),
    (dict(proximal_mu=-0.1), "proximal-mu"),
    (dict(dirichlet_alpha=0.0), "dirichlet-alpha"),
])
def test_invalid_options_are_refused_before_the_run(changes, match):
    with pytest.raises(ValueError, match=match):
        Settings(**changes)


def test_cli_refuses_a_server_optimiser_with_flora_in_one_line(tmp_path, capsys):
    code = cli_main(["run", "--engine", "inprocess", "--strategy", "flora", "--server-opt", "adam", "-o", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "does not apply to strategy 'flora'" in err
