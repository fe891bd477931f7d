"""FlyLoRA's dtypes, sparsity floor, balancing counts and magnitude key; NLoRA's residual switch and SLoRA's init
bound; LoRA on parameters: the stack checks, single-expert low_rank, refusals, rank 1 and the stack layout."""
import math

import pytest
import torch
from torch import nn

import lorakit
from lorakit.core.config import LoRAConfig
from lorakit.methods.flylora import FlyLoRAConfig
from lorakit.methods.lora_params import LoRAParameter, expert_factors, fold
from lorakit.methods.nlora import NLoRAConfig, NLoRALinear


def fly(n=16, out=8, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(n, out)).to(dtype)
    return lorakit.apply(model, FlyLoRAConfig(target_modules=["0"], **{"r": 8, "top_k": 2, **kw}))[0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_flylora_dtypes(dtype):
    """Adapter tensors in the adapter dtype (fp64 over fp64, fp32 over bf16), output in the base's dtype.
    Catches: dtype dropped from the buffers, B or A's draw; x or the update not cast."""
    layer = fly(dtype=dtype)
    want = torch.float64 if dtype == torch.float64 else torch.float32
    assert {layer.lora_A.weight.dtype, layer.lora_B.weight.dtype, layer.lora_topk_bias.dtype} == {want}
    nn.init.normal_(layer.lora_B.weight)
    y = layer(torch.randn(3, 16, dtype=dtype))
    assert y.dtype == dtype and torch.isfinite(y).all()


def test_flylora_module_path_and_dropout():
    """Catches: module_path not passed on; dropout off for p > 0 or on for p = 0."""
    assert fly().module_path == "0" and isinstance(fly().lora_dropout, nn.Identity)
    assert isinstance(fly(lora_dropout=0.5).lora_dropout, nn.Dropout) and fly(lora_dropout=0.5).lora_dropout.p == 0.5


def test_flylora_one_nonzero_per_row_when_density_gives_one():
    """in·k/r = 4·2/8 = 1 non-zero per row. Catches: a floor of 2."""
    assert (torch.count_nonzero(fly(n=4).lora_A.weight, dim=1) == 1).all()


def test_flylora_counts_every_rank_even_unchosen_ones():
    """All tokens pick rank 0 (top_k=1): rank 0's bias falls by u, every other rises by u.
    Catches: bincount without minlength (counts of length 1: no move)."""
    layer = fly(top_k=1, bias_u=0.5)
    layer.lora_topk_bias[0] = 100.0
    layer.train()(torch.randn(5, 16))
    torch.testing.assert_close(layer.lora_topk_bias, torch.tensor([99.5] + [0.5] * 7))


def test_flylora_magnitude_key_ranks_abs_z():
    """route_by='magnitude' ranks |z| + d. Catches: the signed key for both."""
    layer = fly(route_by="magnitude", top_k=1)
    z = torch.tensor([[-5.0, 1.0, 0, 0, 0, 0, 0, 0]])
    assert layer.route(z).tolist() == [[0]]


def nlora(**kw):
    return lorakit.apply(nn.Sequential(nn.Linear(64, 16)), NLoRAConfig(target_modules=["0"], **{"r": 8, **kw}))[0]


def test_nlora_residual_switch():
    """residual=True subtracts only for nlora/inttune: slora keeps a low-rank form, nlora has none and its delta
    needs the base weight. Catches: the mode string altered, the switch forced."""
    tensors = {k: v.detach() for k, v in nlora(residual=True).adapter_tensors().items()}
    assert NLoRALinear.low_rank(tensors, nlora(residual=True).config) is None
    assert NLoRALinear.low_rank(tensors, nlora(mode="slora", residual=True).config) is not None
    with pytest.raises(ValueError, match="^NLoRA with residual=True: the update depends on the base weight; pass base_weight$"):
        NLoRALinear.delta(tensors, nlora(residual=True).config, None)


def test_slora_init_bound_and_full_rank_allowed():
    """SLoRA's A is Kaiming-uniform with a=sqrt(5): |A| <= 1/sqrt(in), reaching near it. NLoRA with r = min(out, in)
    is allowed. Catches: another a; r == min refused."""
    torch.manual_seed(0)
    a = nlora(mode="slora").lora_A.weight
    assert a.abs().max() <= 1 / math.sqrt(64) and a.abs().max() > 0.95 / math.sqrt(64)
    assert nlora(r=16).r == 16
    with pytest.raises(ValueError, match=r"^module '0': rank r=17 exceeds min\(out, in\)=16$"):
        nlora(r=17)


def test_nlora_residual_delta_dtype_and_fan_in_fan_out():
    """The start s·C N0 R is taken in the factors' dtype (a pinv core too) and transposed for fan_in_fan_out.
    Catches: the base or the pinv core left in another dtype; the start not transposed."""
    torch.manual_seed(0)
    w = torch.randn(6, 5, dtype=torch.float64)
    t = {"lora_A.weight": torch.randn(2, 5), "lora_N.weight": torch.randn(2, 2), "lora_B.weight": torch.randn(6, 2)}
    cfg = dict(r=2, lora_alpha=2, residual=True, nystrom_core="pinv")
    got = NLoRALinear.delta(t, NLoRAConfig(**cfg), w)
    assert got.dtype == torch.float32
    t64 = {k: v.double() for k, v in t.items()}
    assert NLoRALinear.delta(t64, NLoRAConfig(**cfg), w).dtype == torch.float64  # the fp32 pinv core cast back
    flipped = NLoRALinear.delta(t, NLoRAConfig(fan_in_fan_out=True, **cfg), w.T.contiguous())
    plain = NLoRALinear.delta(t, NLoRAConfig(fan_in_fan_out=True, **{**cfg, "residual": False}), w.T.contiguous())
    w32 = w.float()
    start = w32[:, :2] @ torch.linalg.pinv(w32[:2, :2]) @ w32[:2]
    torch.testing.assert_close(flipped, plain - start.T)


class Experts(nn.Module):
    def __init__(self, shape, dtype=torch.float32):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(*shape, dtype=dtype))

    def forward(self, x):
        return x @ self.weight.T if self.weight.dim() == 2 else torch.einsum("ti,eoi->eto", x, self.weight)


def test_expert_factors_checks():
    """Catches: the r <= 0 / divisibility / A-B agreement checks weakened, the message lost."""
    a, b = torch.zeros(6, 4), torch.zeros(5, 6)
    assert expert_factors({"lora_A.weight": a, "lora_B.weight": b}, 1)[0].shape == (6, 1, 4)
    for r, bb in ((0, b), (4, b), (2, torch.zeros(5, 4))):
        with pytest.raises(ValueError, match=r"lora_A \(6, 4\) and lora_B \(5, \d\) are not r·E stacks of rank r="):
            expert_factors({"lora_A.weight": a, "lora_B.weight": bb}, r)


def test_low_rank_single_expert_only():
    """Catches: low_rank wrong or None for one expert, or not None for a stack."""
    config = LoRAConfig(r=2, lora_alpha=4)
    a, b = torch.randn(2, 4), torch.randn(5, 2)
    got = LoRAParameter.low_rank({"lora_A.weight": a, "lora_B.weight": b}, config)
    assert got[0] is a and got[1] is b and got[2] == 2.0
    assert LoRAParameter.low_rank({"lora_A.weight": torch.randn(6, 4), "lora_B.weight": torch.randn(5, 6)}, config) is None


@pytest.mark.parametrize("kw, word", [(dict(fan_in_fan_out=True), "fan_in_fan_out=True"),
                                      (dict(use_dora=True), "use_dora=True")])
def test_parameter_refusals(kw, word):
    with pytest.raises(ValueError, match=f"module 'm', parameter 'weight': .* does not work with {word}"):
        LoRAParameter(Experts((5, 4)), LoRAConfig(r=2, **kw), "m", "weight")
    with pytest.raises(ValueError, match="a 4-D parameter"):
        LoRAParameter(Experts((2, 3, 5, 4)), LoRAConfig(r=2), "m", "weight")


def test_parameter_dtype_layout_rank_one():
    """fp64 stack: fp64 factors; no is_transposed: [E, out, in]; rank 1 still adapts; the stack's layout is told
    from its shape when E, r, out, in differ. Catches: dtype dropped, transposed by default, r == 1 skipped,
    the normal/swapped shapes or the passed layout altered."""
    torch.manual_seed(0)
    layer = LoRAParameter(Experts((3, 5, 4), torch.float64), LoRAConfig(r=1), "m", "weight")
    assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == torch.float64 and not layer.transposed
    assert layer.lora_A.weight.shape == (3, 4) and layer.lora_B.weight.shape == (5, 3)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 4, dtype=torch.float64)
    assert not torch.allclose(layer(x), layer.base_layer(x))
    tensors = {k: v.detach() for k, v in layer.adapter_tensors().items()}
    config = LoRAConfig(r=2)
    t = {"lora_A.weight": torch.randn(6, 4), "lora_B.weight": torch.randn(5, 6)}
    normal = LoRAParameter.delta(t, config, torch.zeros(3, 5, 4))
    swapped = LoRAParameter.delta(t, config, torch.zeros(3, 4, 5))
    torch.testing.assert_close(swapped, normal.transpose(1, 2))
    torch.testing.assert_close(layer.delta_weight(), LoRAParameter.delta(tensors, layer.config, layer.parameter().detach(), False))


def test_square_stack_delta_uses_the_layers_layout():
    """out == in: the shape cannot tell the layout, so delta_weight passes the layer's own. Catches: not passed."""
    layer = LoRAParameter(Experts((2, 4, 4)), LoRAConfig(r=2), "m", "weight")
    nn.init.normal_(layer.lora_B.weight)
    tensors = {k: v.detach() for k, v in layer.adapter_tensors().items()}
    torch.testing.assert_close(layer.delta_weight(), torch.einsum("ore,eri->eoi", tensors["lora_B.weight"].reshape(4, 2, 2),
                                                                  tensors["lora_A.weight"].reshape(2, 2, 4)) * layer.scaling)


class Scaled(Experts):
    def forward(self, x, scale=1.0):
        return super().forward(x) * scale


def test_parameter_keywords_bf16_rank_one_and_refusals():
    """Keyword arguments reach the module (adapter on and off); a bf16 parameter folds and merges in bf16; rank 1
    over one expert keeps its low-rank form; an unreadable stack and a NaN update are refused by name.
    Catches: kwargs dropped, the casts to W's dtype dropped, max(r, 2), the layout check weakened, messages lost."""
    torch.manual_seed(0)
    layer = LoRAParameter(Scaled((3, 5, 4)), LoRAConfig(r=2), "m", "weight")
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 4)
    torch.testing.assert_close(layer(x, scale=2.0), 2 * layer(x))
    layer.disabled = True
    torch.testing.assert_close(layer(x, scale=2.0), 2 * layer(x))
    w = torch.randn(5, 4, dtype=torch.bfloat16)
    t = {"lora_A.weight": torch.randn(1, 4), "lora_B.weight": torch.randn(5, 1)}
    assert fold(w, t, 1, 1.0, False).dtype == torch.bfloat16
    half = LoRAParameter(Experts((2, 5, 4), torch.bfloat16), LoRAConfig(r=2), "m", "weight")
    assert half.delta_weight().dtype == torch.bfloat16
    assert LoRAParameter.low_rank(t, LoRAConfig(r=1)) is not None
    with pytest.raises(ValueError, match=r"cannot tell the layout of a \(3, 7, 7\) stack from factors for \(3, 5, 4\)"):
        LoRAParameter.delta({"lora_A.weight": torch.randn(6, 4), "lora_B.weight": torch.randn(5, 6)}, LoRAConfig(r=2),
                            torch.zeros(3, 7, 7))
    with torch.no_grad():
        half.lora_B.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="^module 'm': the adapter's update has NaN or inf; refusing to merge$"):
        half.merged_layer()
