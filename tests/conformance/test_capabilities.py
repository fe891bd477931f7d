"""Capability declarations: every method declares them, the suite checks them against forward, callers ask them.

A plug-in that claims a capability its forward lacks must fail ``check_method``; an adapter whose method does not
declare a capability must be refused (with the method's name and what to do) by every path that needs it.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import lorakit
from lorakit.core.adapter import Adapter, NotMergeableError
from lorakit.core.capabilities import LORA_PAIR, LOW_RANK, MERGE_ONLY, Capabilities, CapabilityError
from lorakit.federated import aggregate
from lorakit.merging import combine
from lorakit.merging.protocol import MergeError
from lorakit.methods.dylora import DyLoRAConfig, DyLoRALinear
from lorakit.methods.experts import expert_states
from lorakit.methods.flylora import FlyLoRAConfig, FlyLoRALinear
from lorakit.serve.store import AdapterFitError, linear_shapes, pack_state
from lorakit.testing import ToyLinear, check_method, perturb_


@contextlib.contextmanager
def plugin(cls):
    """Register ``cls`` as a method for the duration of the block (as a third-party plug-in would)."""
    lorakit.METHODS.register()(cls)
    try:
        yield cls.name
    finally:
        del lorakit.METHODS._items[cls.name]


class MergingFlyConfig(FlyLoRAConfig):
    method = "merging_fly"
    peft_type = "LORAKIT_MERGING_FLY"


class MergingFly(FlyLoRALinear):
    """Wrong on purpose: FlyLoRA claiming a fixed update, with the fork's all-ranks ΔW as ``delta``."""

    name = "merging_fly"
    config_class = MergingFlyConfig
    capabilities = LOW_RANK

    @classmethod
    def delta(cls, tensors, config, base_weight):
        return tensors["lora_B.weight"] @ tensors["lora_A.weight"] * config.scaling

    @classmethod
    def low_rank(cls, tensors, config):
        return tensors["lora_A.weight"], tensors["lora_B.weight"], config.scaling


class PairedDyLoRAConfig(DyLoRAConfig):
    method = "paired_dylora"
    peft_type = "LORAKIT_PAIRED_DYLORA"


class PairedDyLoRA(DyLoRALinear):
    """Wrong on purpose: DyLoRA's truncated factors are not its whole tensors, so factor-wise aggregation breaks."""

    name = "paired_dylora"
    config_class = PairedDyLoRAConfig
    capabilities = LORA_PAIR


def test_a_plugin_that_claims_to_merge_an_input_dependent_update_fails_the_suite():
    with plugin(MergingFly) as name, pytest.raises(AssertionError, match="declares mergeable, but delta differs from forward"):
        check_method(name, config=MergingFlyConfig(r=8, lora_alpha=16, top_k=2, target_modules=ToyLinear.targets))


def test_a_plugin_that_claims_aggregatable_without_a_lora_pair_fails_the_suite():
    config = PairedDyLoRAConfig(r=4, lora_alpha=8, target_modules=ToyLinear.targets, active_rank=2)
    with plugin(PairedDyLoRA) as name, pytest.raises(AssertionError, match="declares aggregatable"):
        check_method(name, config=config, toys=[ToyLinear])


def test_a_plugin_without_a_declaration_fails_the_suite():
    class Undeclared(lorakit.METHODS.get("lora").adapter_classes[0]):
        name = "undeclared"
        capabilities = None

    with plugin(Undeclared) as name, pytest.raises(AssertionError, match="declare no common capabilities"):
        check_method(name, config=lorakit.LoRAConfig(r=4, target_modules=ToyLinear.targets), toys=[ToyLinear])


@pytest.mark.parametrize("name", lorakit.METHODS.names())
def test_every_adapter_class_declares_its_capabilities(name):
    for cls in lorakit.METHODS.get(name).adapter_classes:
        declared = next((k.__dict__["capabilities"] for k in cls.__mro__ if "capabilities" in k.__dict__), None)
        assert isinstance(declared, Capabilities), f"{cls.__name__} declares no capabilities"
        assert issubclass(cls, Adapter)
    assert lorakit.METHODS.get(name).capabilities is not None, f"'{name}': its adapter classes disagree"


def test_declarations_state_what_the_update_is():
    caps = {n: lorakit.METHODS.get(n).capabilities for n in lorakit.METHODS.names()}
    for routed in ("flylora", "meteora", "lora_mixer", "smora"):
        assert caps[routed] == Capabilities(), routed  # the update depends on the input
    assert caps["dora"] == caps["shira"] == caps["randlora"] == caps["bone"] == MERGE_ONLY  # fixed, not s·B·A
    assert caps["lora"] == caps["ffa_lora"] == LORA_PAIR
    assert caps["dylora"] == caps["nola"] == caps["lora_xs"] == LOW_RANK


def test_implied_capabilities_are_enforced():
    with pytest.raises(ValueError, match="servable=True needs exportable_to_lora"):
        Capabilities(mergeable=True, servable=True)
    with pytest.raises(ValueError, match="exportable_to_lora=True needs mergeable"):
        Capabilities(exportable_to_lora=True)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(16, 8)
        self.v = nn.Linear(16, 12)


@pytest.fixture
def fly_state():
    torch.manual_seed(0)
    model = lorakit.apply(Net(), FlyLoRAConfig(r=8, top_k=2, target_modules=["q", "v"]))
    perturb_(model)
    return model, lorakit.AdapterState.from_model(model)


def test_every_fixed_update_path_refuses_flylora_with_the_method_and_what_to_do(fly_state, tmp_path):
    model, state = fly_state
    with pytest.raises(NotMergeableError, match="method 'flylora'.*input-dependent.*unwrap"):
        lorakit.merge(model)
    assert set(lorakit.adapters(model)) == {"q", "v"}  # refused before touching the model
    with pytest.raises(CapabilityError, match="export.*method 'flylora'.*exportable_to_lora.*save_peft"):
        state.to_lora()
    with pytest.raises(MergeError, match="merge adapter 0.*'flylora'.*exportable_to_lora"):
        combine([state, state], "cat")
    with pytest.raises(MergeError, match="'flylora'"):
        combine([state], "linear", weights=[0.5])
    with pytest.raises(AdapterFitError, match="src: cannot serve it: method 'flylora'.*servable.*lorakit.merge"):
        pack_state(state, linear_shapes(Net()), torch.float32, "fly#1", "src")
    for rule in ("flora", "fedavg_dense", "zero_pad", "ffa_lora", "lora_fair"):
        with pytest.raises(CapabilityError, match="method 'flylora'.*aggregatable.*fedit"):
            aggregate(rule, [state, state], [1, 1])
    with pytest.raises(CapabilityError, match="expert 0.*'flylora'"):
        expert_states([state])


def test_exportable_methods_still_export_merge_and_serve():
    torch.manual_seed(0)
    model = lorakit.apply(Net(), DyLoRAConfig(r=4, target_modules=["q", "v"]))
    perturb_(model)
    state = lorakit.AdapterState.from_model(model)
    assert state.to_lora().config.method_name == "lora"
    assert combine([state, state], "cat").config.method_name == "lora"
    assert set(pack_state(state, linear_shapes(Net()), torch.float32, "d#1", "src").modules()) == {"q", "v"}
    with pytest.raises(CapabilityError, match="'dylora'.*aggregatable"):  # low-rank, but not one LoRA pair
        aggregate("flora", [state, state], [1, 1])


def test_the_methods_page_lists_every_declaration():
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "methods.md").read_text()
    yes = lambda b: "yes" if b else "no"  # noqa: E731
    for name in lorakit.METHODS.names():
        c = lorakit.METHODS.get(name).capabilities
        row = f"| `{name}` | {yes(c.mergeable)} | {yes(c.exportable_to_lora)} | {yes(c.servable)} | {yes(c.aggregatable)} |"
        assert row in page, f"docs/methods.md: expected the row {row}"
