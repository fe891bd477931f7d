"""Registry: registration by decorator, lookups whose errors list what exists."""
from __future__ import annotations

import dataclasses

import pytest
from torch import nn

import lorakit
from lorakit.core.registry import MethodRegistry, Registry


def test_register_and_get():
    reg = Registry("merger")

    @reg.register()
    class Mean:
        name = "mean"

    @reg.register("ties")
    def ties():
        return None

    assert reg.get("mean") is Mean and reg.get("ties") is ties
    assert reg.names() == ["mean", "ties"] and list(reg) == ["mean", "ties"] and len(reg) == 2
    assert "mean" in reg and "dare" not in reg


def test_unknown_name_lists_registered_and_near_names():
    reg = Registry("merger")
    for key in ("ties", "dare", "mean"):
        reg.register(key)(object())
    with pytest.raises(KeyError) as err:
        reg.get("tie")
    message = str(err.value)
    assert "unknown merger 'tie'" in message and "Did you mean 'ties'" in message
    assert "Registered: ties, dare, mean" in message
    with pytest.raises(KeyError, match=r"Registered: \(none\)"):
        Registry("strategy").get("fedavg")


def test_duplicate_and_nameless_registrations_are_refused():
    reg = Registry("merger")
    first = reg.register("ties")(object())
    reg.register("ties")(first)  # registering the same object again is harmless
    with pytest.raises(ValueError, match="merger 'ties' is already registered"):
        reg.register("ties")(object())
    with pytest.raises(ValueError, match="has no name to register under"):
        reg.register()(object())


def test_method_registry_groups_layer_kinds_and_checks_config_class():
    reg = MethodRegistry("method")

    @dataclasses.dataclass(frozen=True)
    class OtherConfig(lorakit.LoRAConfig):
        pass

    class A(lorakit.Adapter):
        name, config_class, layer_types = "toy", lorakit.LoRAConfig, (nn.Linear,)

    class B(lorakit.Adapter):
        name, config_class, layer_types = "toy", lorakit.LoRAConfig, (nn.Embedding,)

    class C(lorakit.Adapter):
        name, config_class, layer_types = "toy", OtherConfig, (nn.Conv2d,)

    reg.register()(A)
    reg.register()(B)
    method = reg.get("toy")
    assert method.adapter_classes == [A, B] and method.layer_types == (nn.Linear, nn.Embedding)
    assert method.adapter_class_for(nn.Embedding(3, 2)) is B and method.adapter_class_for(nn.Conv2d(1, 1, 1)) is None
    with pytest.raises(ValueError, match="method 'toy': C uses another config class"):
        reg.register()(C)


def test_builtin_methods_are_registered():
    assert {"lora", "dora"} <= set(lorakit.METHODS.names())
    lora = lorakit.METHODS.get("lora")
    assert lora.config_class is lorakit.LoRAConfig
    assert {"Linear", "Embedding", "Conv2d", "Conv1D"} <= {t.__name__ for t in lora.layer_types}
    assert lorakit.METHODS.get("dora").config_class is lorakit.DoRAConfig
