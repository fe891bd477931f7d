"""LoRA's layer kinds against peft where the defaults hide differences: embeddings with padding_idx, max_norm,
norm_type and scale_grad_by_freq (forward and gradients), dilated strided convolutions, rank-1 embeddings, and
the gaussian initialisation's scale."""
import copy

import peft
import pytest
import torch
from torch import nn

import lorakit


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 16, padding_idx=3, max_norm=1.5, norm_type=1.0, scale_grad_by_freq=True)
        self.conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=2)

    def forward(self, ids, image):
        return self.emb(ids).sum(), self.conv(image)


def _pair(targets, r=4, tmp_path=None):
    torch.manual_seed(0)
    base = Net()
    ours = lorakit.apply(copy.deepcopy(base), lorakit.LoRAConfig(r=r, lora_alpha=2 * r, target_modules=targets))
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    lorakit.save_peft(ours, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a"), is_trainable=True)
    return base, ours, theirs


def _inputs():
    ids = torch.tensor([[3, 5, 5, 7, 3, 9], [1, 5, 2, 3, 3, 3]])  # the padding id and repeats
    image = torch.randn(2, 3, 11, 11, generator=torch.Generator().manual_seed(1))
    return ids, image


def _grads(model):
    return {n.split("lora_")[-1].replace(".default", ""): p.grad.clone()
            for n, p in model.named_parameters() if p.grad is not None}


def test_embedding_options_match_peft_forward_and_gradients(tmp_path):
    """Catches: padding_idx, max_norm, norm_type or scale_grad_by_freq not passed to the lookup of A."""
    base, ours, theirs = _pair(["emb"], tmp_path=tmp_path)
    ids, image = _inputs()
    a, _ = ours(ids, image)
    b, _ = theirs(ids, image)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a, base(ids, image)[0])
    a.backward()
    b.backward()
    g_ours, g_theirs = _grads(ours), _grads(theirs)
    assert sorted(g_ours) == sorted(g_theirs)
    for k in g_ours:
        torch.testing.assert_close(g_ours[k], g_theirs[k], rtol=1e-5, atol=1e-5)
    a_grad = next(p.grad for n, p in ours.named_parameters() if n.endswith("lora_embedding_A"))
    assert torch.count_nonzero(a_grad[:, 3]) == 0  # the padding row gets no gradient


def test_rank_one_embedding_adapts(tmp_path):
    base, ours, theirs = _pair(["emb"], r=1, tmp_path=tmp_path)
    ids, image = _inputs()
    torch.testing.assert_close(ours(ids, image)[0], theirs(ids, image)[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours(ids, image)[0], base(ids, image)[0])


def test_dilated_strided_convolution_equals_its_merged_weight():
    """Catches: A without the base's stride, padding or dilation. (peft 0.21.2 builds A without the dilation and
    fails on this layer, so the reference is the convolution with W + ΔW.)"""
    torch.manual_seed(0)
    base = Net()
    ours = lorakit.apply(copy.deepcopy(base), lorakit.LoRAConfig(r=4, lora_alpha=8, target_modules=["conv"]))
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    ids, image = _inputs()
    out = ours(ids, image)[1]
    delta = lorakit.AdapterState.from_model(ours).delta("conv")
    c = base.conv
    want = torch.nn.functional.conv2d(image, c.weight + delta, c.bias, c.stride, c.padding, c.dilation)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out, base(ids, image)[1])


@pytest.mark.parametrize("r", [2, 16])
def test_gaussian_init_draws_a_with_std_one_over_r(r):
    """PEFT's 'gaussian': A ~ N(0, 1/r), B = 0 (catches another scale)."""
    torch.manual_seed(0)
    model = lorakit.apply(nn.Sequential(nn.Linear(512, 64)),
                          lorakit.LoRAConfig(r=r, target_modules=["0"], init_lora_weights="gaussian"))
    layer = lorakit.adapters(model)["0"]
    assert layer.lora_A.weight.std().item() == pytest.approx(1 / r, rel=0.08)
    assert torch.count_nonzero(layer.lora_B.weight) == 0


@pytest.mark.parametrize("kind", ["linear", "embedding", "conv"])
def test_half_precision_base_keeps_its_dtype_with_float32_factors(kind):
    """Adapters compute in float32 over a bf16 base (as peft's autocast does) and hand back the base's dtype.
    Catches: the input not cast to the factors' dtype, the update not cast back to the base's."""
    torch.manual_seed(0)
    layer = {"linear": nn.Linear(8, 6), "embedding": nn.Embedding(10, 6), "conv": nn.Conv2d(3, 4, 3)}[kind]
    x = {"linear": torch.randn(2, 8), "embedding": torch.tensor([[1, 2, 3]]), "conv": torch.randn(1, 3, 6, 6)}[kind]
    model = lorakit.apply(nn.Sequential(layer).to(torch.bfloat16), lorakit.LoRAConfig(r=2, target_modules=["0"]))
    adapter = lorakit.adapters(model)["0"]
    with torch.no_grad():
        for p in adapter.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    assert all(p.dtype == torch.float32 for p in adapter.parameters() if p.requires_grad)
    half_x = x.to(torch.bfloat16) if x.is_floating_point() else x
    out = model(half_x)
    assert out.dtype == torch.bfloat16
    full = lorakit.apply(nn.Sequential(copy.deepcopy(layer).float()), lorakit.LoRAConfig(r=2, target_modules=["0"]))
    full.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    torch.testing.assert_close(out.float(), full(half_x.float() if x.is_floating_point() else x), rtol=0.05, atol=0.05)
