"""LoRA's layer kinds where the common tests do not look: 1x1 and non-square convolution kernels (delta and
low_rank against the merged weight), dropout on and off, float64 bases, an embedding left uninitialised, the
refusals and their messages. Each test names the wrong implementation it catches."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit.core.registry import INITIALIZERS


def _randomised(model: nn.Module, std: float = 0.5) -> nn.Module:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, std, generator=torch.Generator().manual_seed(len(name)))
    return model


@pytest.mark.parametrize("kernel", [(1, 1), (2, 1), (1, 2), (1, 3), (3, 1)])
def test_conv_delta_is_the_merged_weight_difference(kernel):
    """Catches: the 1x1 shortcut of delta taken for another kernel (or a (2, 1) / (1, 2) kernel taken for 1x1)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, kernel, padding=(kernel[0] // 2, kernel[1] // 2))
    model = _randomised(lorakit.apply(nn.Sequential(conv), lorakit.LoRAConfig(r=2, lora_alpha=6, target_modules=["0"])))
    x = torch.randn(2, 3, 7, 6, generator=torch.Generator().manual_seed(1))
    delta = lorakit.AdapterState.from_model(model).delta("0")
    assert delta.shape == conv.weight.shape
    want = F.conv2d(x, conv.weight + delta, conv.bias, conv.stride, conv.padding)
    out = model(x)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out, conv(x))


@pytest.mark.parametrize("kernel", [(1, 1), (2, 1), (1, 2), (3, 3)])
def test_conv_low_rank_only_for_a_1x1_kernel(kernel):
    """A 1x1 convolution's update is s·B·A on the channels; a kernel's is not low-rank in that sense (None).
    Catches: low_rank refused for 1x1, or given for a (2, 1) / (1, 2) / 3x3 kernel with A flattened over it."""
    model = _randomised(lorakit.apply(nn.Sequential(nn.Conv2d(4, 6, kernel)),
                                      lorakit.LoRAConfig(r=3, lora_alpha=12, target_modules=["0"])))
    state = lorakit.AdapterState.from_model(model)
    pair = state.low_rank("0")
    if kernel != (1, 1):
        assert pair is None
        return
    a, b, scale = pair
    assert a.shape == (3, 4) and b.shape == (6, 3) and scale == pytest.approx(4.0)
    torch.testing.assert_close(scale * b @ a, state.delta("0").flatten(1))


def test_dropout_applies_to_the_adapter_input_in_training_only():
    """Catches: no dropout at lora_dropout > 0 (the condition inverted or moved), or dropout left on in eval."""
    torch.manual_seed(0)
    base = nn.Linear(64, 8)
    model = _randomised(lorakit.apply(nn.Sequential(base), lorakit.LoRAConfig(r=4, lora_dropout=0.5, target_modules=["0"])))
    x = torch.randn(16, 64)
    model.eval()
    layer = lorakit.adapters(model)["0"]
    clean = model(x)
    torch.testing.assert_close(clean, base(x) + layer.scaling * layer.lora_B(layer.lora_A(x)))
    model.train()
    noisy = model(x)
    assert not torch.allclose(noisy, clean)
    assert isinstance(layer.lora_dropout, nn.Dropout) and layer.lora_dropout.p == 0.5


def test_no_dropout_at_zero():
    """lora_dropout 0: the adapter's input is the layer's input, in training too (catches dropout at another p)."""
    base = nn.Linear(16, 4)
    model = _randomised(lorakit.apply(nn.Sequential(base), lorakit.LoRAConfig(r=2, target_modules=["0"])))
    model.train()
    x = torch.randn(8, 16)
    layer = lorakit.adapters(model)["0"]
    torch.testing.assert_close(model(x), base(x) + layer.scaling * layer.lora_B(layer.lora_A(x)))


@pytest.mark.parametrize("kind", ["linear", "embedding", "conv"])
def test_float64_base_gets_float64_factors(kind):
    """Catches: the factors built in torch's default dtype (float32) instead of the base's."""
    layer = {"linear": nn.Linear(8, 6), "embedding": nn.Embedding(10, 6), "conv": nn.Conv2d(3, 4, 3)}[kind].double()
    model = _randomised(lorakit.apply(nn.Sequential(layer), lorakit.LoRAConfig(r=2, target_modules=["0"])))
    adapter = lorakit.adapters(model)["0"]
    assert {p.dtype for p in adapter.parameters()} == {torch.float64}
    x = {"linear": torch.randn(2, 8), "embedding": torch.tensor([[1, 2, 3]]), "conv": torch.randn(1, 3, 6, 6)}[kind]
    assert model(x.double() if x.is_floating_point() else x).dtype == torch.float64


def test_embedding_with_init_false_keeps_random_factors():
    """init_lora_weights=False leaves both embedding factors random, as PEFT (catches: A zeroed anyway)."""
    torch.manual_seed(0)
    emb = nn.Embedding(12, 6)
    model = lorakit.apply(nn.Sequential(emb), lorakit.LoRAConfig(r=2, init_lora_weights=False, target_modules=["0"]))
    adapter = lorakit.adapters(model)["0"]
    assert torch.count_nonzero(adapter.lora_embedding_A) == adapter.lora_embedding_A.numel()
    ids = torch.tensor([[0, 5, 11]])
    assert not torch.allclose(model(ids), emb(ids))


def test_unknown_init_is_refused_naming_the_module_and_the_choices():
    """Catches: the message lost or the registered initialisers' list garbled."""
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError) as err:
        lorakit.apply(model, lorakit.LoRAConfig(r=2, init_lora_weights="bogus", target_modules=["0"]))
    text = str(err.value)
    assert "module '0'" in text and "init_lora_weights='bogus'" in text
    assert f"({', '.join(INITIALIZERS.names())})" in text and "pissa" in text


def test_non_scalar_embed_scale_is_refused_at_apply():
    """Catches: the check left to the first forward (apply succeeds, training fails later)."""
    class ScaledEmbedding(nn.Embedding):
        def __init__(self):
            super().__init__(10, 4)
            self.embed_scale = torch.ones(4)

    with pytest.raises(ValueError, match="embed_scale is Tensor of shape"):
        lorakit.apply(nn.Sequential(ScaledEmbedding()), lorakit.LoRAConfig(r=2, target_modules=["0"]))


def test_sparse_embedding_trains_like_a_dense_one():
    """A base embedding with sparse=True: the adapter's A is a dense parameter, so its lookup is dense (a sparse
    gradient of A's transpose cannot be transposed back: backward failed). Gradients equal the dense base's."""
    grads = []
    for sparse in (False, True):
        torch.manual_seed(0)
        model = _randomised(lorakit.apply(nn.Sequential(nn.Embedding(10, 4, sparse=sparse)),
                                          lorakit.LoRAConfig(r=2, target_modules=["0"])))
        model(torch.tensor([[1, 2, 2, 7]])).pow(2).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert sorted(grads[0]) == sorted(grads[1]) and len(grads[0]) == 2
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name])


def test_grouped_convolution_is_refused_by_name():
    with pytest.raises(ValueError, match=r"^module '0': LoRA on grouped convolutions \(groups=2\) is not supported$"):
        lorakit.apply(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), lorakit.LoRAConfig(r=2, target_modules=["0"]))
