"""``check_initializer(name)``: the conformance properties of a registered initialiser, on toy models.

tests/init parametrises it over ``INITIALIZERS.names()``; third-party initialisers can call it too. Each
property raises ``AssertionError`` naming the initialiser, toy and numbers.
"""
from __future__ import annotations

import copy
import tempfile
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..core.apply import adapters, apply, config_of, trainable_parameters
from ..core.config import LoRAConfig
from ..core.registry import INITIALIZERS
from ..core.state import AdapterState
from ..formats.peft import load_peft, save_peft, save_state
from ..testing import ToyConv1D, ToyLinear, _close
from .conversion import convert_to_plain_lora
from .initializer import initialize


def toy_batches(model: nn.Module, n: int = 3, seed: int = 0) -> list:
    """``n`` calibration batches (input, target class per position) for a toy model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        shape = model(model.example()).shape
    out = []
    for _ in range(n):
        x = torch.randn(8, 6, 16, generator=g) if isinstance(model, ToyConv1D) else torch.randint(0, 40, (8, 6), generator=g)
        out.append((x, torch.randint(0, shape[-1], (8, 6), generator=g)))
    return out


def toy_forward(model: nn.Module, batch) -> torch.Tensor:
    return model(batch[0])


def toy_loss(model: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(toy_forward(model, batch).flatten(0, -2), batch[1].flatten())


def _initialised(base: nn.Module, config: LoRAConfig, batches: list) -> nn.Module:
    model = copy.deepcopy(base)
    torch.manual_seed(0)  # initialisers that draw random numbers (orthogonal) repeat under the same seed
    apply(model, config)
    return initialize(model, batches, forward_fn=toy_forward, loss_fn=toy_loss)


def check_initializer(name: str, value: Optional[str] = None, use_dora: bool = False) -> list[str]:
    """Run the conformance properties of initialiser ``name`` (``init_lora_weights=value``) on the toy models."""
    entry = INITIALIZERS.get(name)
    checked = []
    for toy in (ToyLinear, ToyConv1D):
        torch.manual_seed(0)
        base = toy().eval()
        label = f"{value or name}/{toy.__name__}{'/dora' if use_dora else ''}"
        batches = toy_batches(base)
        x = batches[0][0]
        config = LoRAConfig(r=4, lora_alpha=8, target_modules=toy.targets, init_lora_weights=value or name,
                            use_dora=use_dora)
        with torch.no_grad():
            base_out = base(x)
        model = _initialised(base, config, batches)
        # 1. the output at step 0 is the base model's
        with torch.no_grad():
            _close(model(x), base_out, f"{label}: output after initialisation")
        # 2. finite factors of the configured shapes; base moved iff the initialiser says so, by exactly s·B A
        for path, a in adapters(model).items():
            r = config_of(model).for_module(path).r
            weight0 = base.get_submodule(path).weight.detach()
            w = a.base_layer.weight.detach()
            out_f, in_f = (w.shape[1], w.shape[0]) if config_of(model).fan_in_fan_out else w.shape
            ta = a.adapter_tensors()
            assert ta["lora_A.weight"].shape == (r, in_f), f"{label} {path}: A {tuple(ta['lora_A.weight'].shape)}"
            assert ta["lora_B.weight"].shape == (out_f, r), f"{label} {path}: B {tuple(ta['lora_B.weight'].shape)}"
            assert all(torch.isfinite(t).all() for t in ta.values()), f"{label} {path}: non-finite factors"
            assert (not torch.equal(w, weight0)) == entry.mutates_base, f"{label} {path}: base moved={not torch.equal(w, weight0)}"
            if not use_dora:
                _close(w + a.delta_weight(), weight0, f"{label} {path}: W_res + s·B A vs W")
        # 3. deterministic given the same batches and seed
        again = _initialised(base, config, batches)
        for (p, t1), t2 in zip(AdapterState.from_model(model).tensors.items(), AdapterState.from_model(again).tensors.values()):
            assert all(torch.equal(t1[k], t2[k]) for k in t1), f"{label} {p}: a second run gave other factors"
        for (n1, p1), p2 in zip(model.named_parameters(), again.parameters()):
            assert torch.equal(p1, p2), f"{label}: a second run gave another {n1}"
        # 4. a data-driven initialiser refuses to run twice; a weight-only one is left alone
        if entry.needs_data:
            try:
                initialize(model, batches, forward_fn=toy_forward, loss_fn=toy_loss)
            except ValueError:
                pass
            else:
                raise AssertionError(f"{label}: initialize ran twice on the same adapters")
        else:
            before = [t.clone() for t in model.parameters()]
            initialize(model, batches, forward_fn=toy_forward, loss_fn=toy_loss)
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), f"{label}: initialize re-ran"
        # 5. trains: a few steps change the output and only adapter tensors move
        initial = AdapterState.from_model(model)
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        optim = torch.optim.SGD(trainable_parameters(model).values(), lr=0.1)
        model.train()
        for batch in batches * 2:
            optim.zero_grad()
            toy_loss(model, batch).backward()
            optim.step()
        model.eval()
        with torch.no_grad():
            trained_out = model(x)
        assert not torch.allclose(trained_out, base_out), f"{label}: training did not change the output"
        assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen), f"{label}: frozen moved"
        # 6. the saved adapter reproduces the trained model on the untouched base
        if not use_dora:
            state = AdapterState.from_model(model)
            if entry.mutates_base:
                state = convert_to_plain_lora(state, initial)
            with tempfile.TemporaryDirectory() as d:
                save_state(state, d)
                fresh = load_peft(copy.deepcopy(base), d)
                with torch.no_grad():
                    _close(fresh(x), trained_out, f"{label}: saved adapter on the untouched base", atol=1e-4)
                # unconverted files load as PEFT loads them: weight-only inits re-run on the original base
                save_peft(model, d)
                target = copy.deepcopy(base) if not entry.needs_data else _residual(model, base)
                with torch.no_grad():
                    _close(load_peft(target, d)(x), trained_out, f"{label}: unconverted file", atol=1e-4)
        checked.append(label)
    return checked


def _residual(model: nn.Module, base: nn.Module) -> nn.Module:
    """A copy of ``base`` whose adapted weights are the (possibly moved) base weights of ``model``."""
    residual = copy.deepcopy(base)
    with torch.no_grad():
        for path, a in adapters(model).items():
            residual.get_submodule(path).weight.copy_(a.base_layer.weight)
    return residual
