"""Reusable checks for adapter methods: ``check_method(name)`` runs the conformance properties.

Third-party methods registered in ``lorakit.METHODS`` can call it from their own tests. Each property raises
``AssertionError`` with the method, layer kind and numbers when it fails.
"""
from __future__ import annotations

import dataclasses
import tempfile
from typing import Callable, Optional

import torch
from torch import nn

from .core.adapter import Adapter, NotMergeableError
from .core.apply import adapters, apply, disabled, merge, trainable_parameters, unwrap
from .core.capabilities import Capabilities, CapabilityError
from .core.config import AdapterConfig, LoRAConfig
from .core.registry import METHODS
from .core.state import AdapterState
from .formats.peft import load_peft, save_peft

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None


class ToyLinear(nn.Module):
    """Embedding -> two Linear layers: the Linear toy."""

    targets = ["lin0", "lin1"]

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 16)
        self.lin0 = nn.Linear(16, 24)
        self.lin1 = nn.Linear(24, 12)
        self.head = nn.Linear(12, 3)

    def example(self) -> torch.Tensor:
        return torch.randint(0, 40, (3, 5))

    def forward(self, x):
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(self.emb(x))))))


class ToyEmbedding(ToyLinear):
    targets = ["emb"]


class ScaledEmbedding(nn.Embedding):
    """An embedding that multiplies its lookup by ``embed_scale`` (as Gemma 3's and BART's scaled embeddings)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, scale: float):
        super().__init__(num_embeddings, embedding_dim)
        self.register_buffer("embed_scale", torch.tensor(scale), persistent=False)

    def forward(self, x):
        return super().forward(x) * self.embed_scale.to(self.weight.dtype)


class ToyScaledEmbedding(ToyLinear):
    """The Embedding toy with a scaled embedding: an adapter's update must be scaled like the lookup."""

    targets = ["emb"]

    def __init__(self):
        super().__init__()
        self.emb = ScaledEmbedding(40, 16, scale=4.0)


class ToyConv1D(nn.Module):
    """GPT-2-style ``Conv1D`` layers (weights stored [in, out])."""

    targets = ["c0", "c1"]

    def __init__(self):
        super().__init__()
        self.c0, self.c1 = Conv1D(24, 16), Conv1D(8, 24)
        for c in (self.c0, self.c1):
            nn.init.normal_(c.weight, std=0.2)

    def example(self) -> torch.Tensor:
        return torch.randn(3, 5, 16)

    def forward(self, x):
        return self.c1(torch.tanh(self.c0(x)))


class ToyConv2d(nn.Module):
    """Two convolutions (3x3 and 1x1)."""

    targets = ["conv0", "conv1"]

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 4, 1)

    def example(self) -> torch.Tensor:
        return torch.randn(2, 3, 6, 6)

    def forward(self, x):
        return self.conv1(torch.relu(self.conv0(x)))


LINEAR = (nn.Linear, Conv1D) if Conv1D is not None else (nn.Linear,)
TOYS: dict[type, Callable[[], nn.Module]] = {nn.Linear: ToyLinear, nn.Embedding: ToyEmbedding, nn.Conv2d: ToyConv2d,
                                             ScaledEmbedding: ToyScaledEmbedding}
if Conv1D is not None:
    TOYS[Conv1D] = ToyConv1D


def toys_for(name: str) -> list[Callable[[], nn.Module]]:
    """The toy models whose targeted layer kind method ``name`` can wrap."""
    method = METHODS.get(name)
    return [toy for kind, toy in TOYS.items() if any(issubclass(kind, t) or t is kind for t in method.layer_types)]


def perturb_(model: nn.Module, scale: float = 0.1, seed: int = 0) -> None:
    """Add seeded noise to every adapter tensor so that updates are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in adapters(model).values():
            for t in a.adapter_tensors().values():
                if t.is_floating_point():
                    t.add_(torch.randn(t.shape, generator=g).to(t.dtype) * scale)


def _close(a: torch.Tensor, b: torch.Tensor, what: str, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    err = (a.float() - b.float()).abs().max().item()
    assert torch.allclose(a.float(), b.float(), atol=atol, rtol=rtol), f"{what}: max abs difference {err:.3g}"


def _layer_delta_check(adapter: Adapter, name: str) -> None:
    """``delta`` equals what ``forward`` adds on every probe (``mergeable``); ``low_rank`` equals ``delta``."""
    tensors = {k: v.detach() for k, v in adapter.adapter_tensors().items()}
    base = adapter.base_layer
    delta = type(adapter).delta(tensors, adapter.config, base.weight.detach())
    shifted = _with_weight(base, base.weight + delta)
    with torch.no_grad():
        for i, probe in enumerate(_probes_for(base)):
            _close(adapter(probe) - base(probe), shifted(probe) - base(probe),
                   f"{name} {adapter.module_path}: declares mergeable, but delta differs from forward on probe {i}")
    if not adapter.capabilities_for(adapter.config).exportable_to_lora:
        return
    lr = type(adapter).low_rank(tensors, adapter.config)
    if lr is not None:
        a, b, s = lr
        dense = (b @ a) * s
        if isinstance(base, nn.Embedding):
            dense = dense.T
        elif getattr(adapter.config, "fan_in_fan_out", False):
            dense = dense.T
        _close(dense.reshape(delta.shape), delta, f"{name} {adapter.module_path}: low_rank vs delta")


def _probes_for(layer: nn.Module) -> list[torch.Tensor]:
    """Inputs that differ in scale, sign and support, so that any input-dependent routing differs between them."""
    g = torch.Generator().manual_seed(1)
    if isinstance(layer, nn.Embedding):
        return [torch.arange(layer.num_embeddings).reshape(-1, 1), torch.randint(0, layer.num_embeddings, (4, 3), generator=g)]
    if isinstance(layer, nn.Conv2d):
        return [torch.randn(2, layer.in_channels, 5, 5, generator=g) * c for c in (1.0, -3.0, 0.01)]
    fan_in = layer.weight.shape[0] if Conv1D is not None and isinstance(layer, Conv1D) else layer.weight.shape[1]
    one_hot = torch.eye(fan_in)  # each token one feature: a top-k router picks a different set per token
    return [torch.randn(4, fan_in, generator=g), -10 * torch.randn(3, 2, fan_in, generator=g), 0.01 * torch.randn(4, fan_in, generator=g),
            one_hot, torch.randn(fan_in, fan_in, generator=g) * one_hot.cumsum(0)]


def _with_weight(layer: nn.Module, weight: torch.Tensor) -> nn.Module:
    import copy

    clone = copy.deepcopy(layer)
    with torch.no_grad():
        clone.weight.copy_(weight)
    return clone


def _check_merge_refused(model: nn.Module, x: torch.Tensor, out: torch.Tensor, label: str) -> None:
    """``merge`` raises NotMergeableError and leaves the adapters and the output as they were."""
    import copy

    twin = copy.deepcopy(model)
    try:
        merge(twin)
    except NotMergeableError:
        pass
    else:
        raise AssertionError(f"{label}: does not declare mergeable, but merge(model) did not refuse")
    assert sorted(adapters(twin)) == sorted(adapters(model)), f"{label}: a refused merge removed adapter layers"
    with torch.no_grad():
        _close(twin(x), out, f"{label}: output after a refused merge")


def _fresh(toy: Callable[[], nn.Module], base_params: dict[str, torch.Tensor]) -> nn.Module:
    model = toy()
    model.load_state_dict(dict(base_params))
    return model


def _refuses(fn: Callable[[], object], label: str, capability: str) -> None:
    try:
        fn()
    except CapabilityError:
        return
    raise AssertionError(f"{label}: does not declare {capability}, but the path that needs it did not refuse")


def _check_capabilities(toy, model: nn.Module, base_params, x: torch.Tensor, out: torch.Tensor, label: str) -> list[str]:
    """Each declared capability holds against the forward; each undeclared one is refused by its callers."""
    from .federated.aggregation import aggregate
    from .serve.store import AdapterFitError, linear_shapes, pack_state

    first = next(iter(adapters(model).values()))
    caps = type(first).capabilities_for(first.config)
    state = AdapterState.from_model(model)
    checked = []
    if caps.exportable_to_lora:  # the exported plain LoRA computes what the method computes
        lora = state.to_lora()
        assert lora.config.method_name == "lora", f"{label}: to_lora gave a '{lora.config.method_name}' state"
        with torch.no_grad():
            _close(lora.load_into(_fresh(toy, base_params))(x), out, f"{label}: declares exportable_to_lora; to_lora output")
        checked.append("to_lora")
    elif type(state.config) is not LoRAConfig:
        _refuses(state.to_lora, label, "exportable_to_lora")
    linear = all(isinstance(a.base_layer, LINEAR) for a in adapters(model).values())
    if linear and caps.servable:  # the server's table form (A^T, s·B^T) reproduces each layer's forward
        packed = pack_state(state, linear_shapes(_fresh(toy, base_params)), torch.float32, "check", label).modules()
        for path, a in adapters(model).items():
            at, bt = packed[path]
            for i, probe in enumerate(_probes_for(a.base_layer)):
                with torch.no_grad():
                    _close(a.base_layer(probe) + probe @ at @ bt, a(probe), f"{label} {path}: declares servable; probe {i}")
        checked.append("serve")
    elif linear:
        try:
            pack_state(state, linear_shapes(_fresh(toy, base_params)), torch.float32, "check", label)
        except AdapterFitError as e:
            assert "servable" in str(e), f"{label}: the server refused for another reason: {e}"
        else:
            raise AssertionError(f"{label}: does not declare servable, but the server packed it")
    if linear and caps.aggregatable:  # identical clients, unequal weights, aggregate to the same function
        for rule in ("flora", "fedavg_dense"):
            agg = aggregate(rule, [state, state], [1, 3])
            with torch.no_grad():
                got = AdapterState(agg.config, agg.tensors, state.modules_to_save).load_into(_fresh(toy, base_params))(x)
            _close(got, out, f"{label}: declares aggregatable; '{rule}' of two identical clients (weights 1:3)")
        checked.append("aggregate")
    elif not caps.aggregatable:
        _refuses(lambda: aggregate("flora", [state, state], [1, 1]), label, "aggregatable")
    return checked


def default_config(name: str, targets: list[str], **overrides) -> AdapterConfig:
    """A small config of method ``name`` that targets ``targets``."""
    cls = METHODS.get(name).config_class
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {"r": 4, "target_modules": targets}
    if "lora_alpha" in fields:
        kwargs["lora_alpha"] = 8
    kwargs.update(overrides)
    return cls(**kwargs)


def check_method(name: str, config: Optional[AdapterConfig] = None, toys: Optional[list] = None) -> list[str]:
    """Run the conformance properties for method ``name`` on each toy layer kind; returns what was checked."""
    checked = []
    for toy in toys or toys_for(name):
        torch.manual_seed(0)
        checked += _check_on(name, toy, config)
    assert checked, f"method '{name}' wraps none of the toy layer kinds {[t.__name__ for t in TOYS]}"
    return checked


def _check_on(name: str, toy: Callable[[], nn.Module], config: Optional[AdapterConfig]) -> list[str]:
    label = f"{name}/{toy.__name__}"
    model = toy()
    x = model.example()
    cfg = config or default_config(name, model.targets)
    with torch.no_grad():
        base_out = model(x)
    base_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply(model, cfg)
    method_cls = type(next(iter(adapters(model).values())))
    assert isinstance(METHODS.get(name).capabilities, Capabilities), (
        f"{label}: the adapter classes of '{name}' declare no common capabilities (set ``capabilities = "
        "Capabilities(...)`` on each, see lorakit.core.capabilities)")
    caps = method_cls.capabilities_for(cfg)
    # 1. exactly the targeted layers are wrapped
    wrapped = sorted(adapters(model))
    assert wrapped == sorted(model.targets), f"{label}: wrapped {wrapped}, expected {sorted(model.targets)}"
    # 2. initialisation keeps the output (unless the method declares otherwise)
    with torch.no_grad():
        out0 = model(x)
    if method_cls.identity_at_init:
        _close(out0, base_out, f"{label}: output at initialisation")
    # 3. only adapter tensors get gradients
    model.train()
    loss = model(x).float().pow(2).mean()
    loss.backward()
    trainable = trainable_parameters(model)
    assert trainable, f"{label}: no trainable parameters"
    for n, p in model.named_parameters():
        if ".base_layer." in f".{n}" or n.startswith("base_layer."):
            assert p.grad is None, f"{label}: base parameter {n} received a gradient"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values()), f"{label}: no gradient reached the adapter"
    # 4. one optimiser step changes the output, and only adapter tensors move
    torch.optim.SGD(trainable.values(), lr=0.5).step()
    model.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        out1 = model(x)
    assert not torch.allclose(out1, out0), f"{label}: one optimiser step did not change the output"
    for n, p in model.named_parameters():
        base_name = n.replace("base_layer.", "")
        if not p.requires_grad and base_name in base_params:
            assert torch.equal(p, base_params[base_name]), f"{label}: frozen parameter {n} changed"
    perturb_(model)
    with torch.no_grad():
        out = model(x)
    # 5. delta matches forward on several probes; low_rank matches delta (declared mergeable / exportable)
    if caps.mergeable:
        for a in adapters(model).values():
            _layer_delta_check(a, label)
    # 6. disabled restores the base output
    with disabled(model), torch.no_grad():
        _close(model(x), base_out, f"{label}: disabled output")
    # 7. save/load round trip in PEFT format, and AdapterState round trip
    with tempfile.TemporaryDirectory() as d:
        save_peft(model, d)
        torch.manual_seed(123)
        fresh = toy()
        fresh.load_state_dict({k: v for k, v in base_params.items()})
        load_peft(fresh, d)
        with torch.no_grad():
            _close(fresh(x), out, f"{label}: output after save/load")
    state = AdapterState.from_model(model)
    assert state.num_parameters() > 0
    capability_checks = _check_capabilities(toy, model, base_params, x, out, label)
    # 8. bf16 forward is finite; .to() moves the adapter
    import copy

    half = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():
        hx = x if not x.is_floating_point() else x.to(torch.bfloat16)
        assert torch.isfinite(half(hx).float()).all(), f"{label}: bf16 forward is not finite"
    moved = copy.deepcopy(model).to(torch.float64)
    for a in adapters(moved).values():
        assert all(t.dtype == torch.float64 for t in a.adapter_tensors().values() if t.is_floating_point()), f"{label}: .to() left adapter tensors behind"
    # 9. merged output equals adapter output (declared mergeable); the others refuse, model intact
    if not caps.mergeable:
        _check_merge_refused(model, x, out, label)
    else:
        merged = merge(copy.deepcopy(model))
        assert not adapters(merged), f"{label}: merge left adapter layers"
        with torch.no_grad():
            _close(merged(x), out, f"{label}: declares mergeable; merged output", atol=1e-4)
    # 10. unwrap gives back the base model
    plain = unwrap(model)
    with torch.no_grad():
        _close(plain(x), base_out, f"{label}: output after unwrap")
    assert sum(p.numel() for p in plain.parameters()) == sum(v.numel() for v in base_params.values())
    merge_check = "merge" if caps.mergeable else "merge refused"
    delta_check = ["delta"] if caps.mergeable else []
    checks = ["targets", "init", "grads", "step", *delta_check, "disabled", "save/load", *capability_checks, "bf16", "to",
              merge_check, "unwrap"]
    return [f"{label}: {p}" for p in checks]
