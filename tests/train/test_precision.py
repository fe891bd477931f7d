"""Gradient checkpointing gives the same training as without; bf16 autocast runs the forward in bfloat16 on CPU;
precisions and devices a machine cannot train in are refused before training."""
import pytest
import torch
from strategy_models import data, lora4

import lorakit
from lorakit.train import TrainConfig, fit
from lorakit.train.precision import resolve_device

RUN = TrainConfig(lr=5e-3, batch_size=5, max_steps=3, warmup_steps=0, log_every=1, progress=False, seed=1)


def _state(model):
    return lorakit.AdapterState.from_model(model).tensors


def test_gradient_checkpointing_trains_the_same_adapter():
    train = data()[0]
    plain, ckpt = lora4(), lora4()
    a = fit(plain, train, config=RUN)
    b = fit(ckpt, train, config=RUN, gradient_checkpointing=True)
    assert ckpt.model.gradient_checkpointing and ckpt.model.layers[0].gradient_checkpointing
    for path, tensors in _state(plain).items():
        for key, t in tensors.items():
            assert torch.allclose(t, _state(ckpt)[path][key], atol=1e-6), (path, key)
    assert [h["loss"] for h in a.history] == pytest.approx([h["loss"] for h in b.history], abs=1e-6)
    # the adapters inside checkpointed blocks (all frozen block weights) did receive gradients
    assert all(adapter.lora_B.weight.abs().sum() > 0 for adapter in lorakit.adapters(ckpt).values())


def test_bf16_autocast_runs_the_forward_in_bfloat16_on_cpu():
    train, model, dtypes = data()[0], lora4(), set()
    model.model.layers[0].self_attn.q_proj.base_layer.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    result = fit(model, train, config=RUN, precision="bf16")
    assert dtypes == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights and state stay fp32
    reference = fit(lora4(), train, config=RUN)
    for ours, theirs in zip(result.history, reference.history):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=0.05) and ours["loss"] != theirs["loss"]


def test_what_cannot_run_here_is_refused_before_training():
    train = data()[0]
    with pytest.raises(ValueError, match="fp16 training needs a CUDA device"):
        fit(lora4(), train, config=RUN, precision="fp16")
    with pytest.raises(ValueError, match="precision must be"):
        TrainConfig(precision="fp8")
    net = lorakit.apply(torch.nn.Sequential(torch.nn.Linear(4, 4)), lorakit.LoRAConfig(r=2, target_modules=["0"]))
    with pytest.raises(ValueError, match="gradient checkpointing needs a transformers model"):
        fit(net, [{"x": torch.zeros(4)}], gradient_checkpointing=True)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
