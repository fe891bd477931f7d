"""SHiRA, LoRA-XS and LoRA-SB where their claim tests do not look: SHiRA's magnitude support on a Conv1D layer and
switching into half-precision or adapted layers; LoRA-XS at full rank and with init_lora_weights=False; LoRA-SB's
calibration with zero gradients and when it warns (once, in training, only while uncalibrated)."""
import copy
import warnings

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit.methods.lora_sb import LoRASBConfig
from lorakit.methods.lora_xs import LoRAXSConfig, top_svd
from lorakit.methods.shira import SHiRAConfig, switch_in, switch_out
from lorakit.testing import perturb_


def test_shira_magnitude_support_on_conv1d_reads_the_weight_as_out_by_in():
    """Conv1D stores its weight [in, out]; the support's (row, column) are (output, input) units.
    Catches: the top entries taken from the stored [in, out] layout."""
    torch.manual_seed(0)
    layer = Conv1D(6, 10)  # nx=10 inputs, nf=6 outputs: weight [10, 6]
    model = lorakit.apply(nn.Sequential(layer), SHiRAConfig(r=1, mask_type="weight_magnitude", target_modules=["0"],
                                                            fan_in_fan_out=True))
    adapter = lorakit.adapters(model)["0"]
    w = layer.weight.detach().T.abs()  # [out, in]
    rows, cols = adapter.shira_indices.long()
    on = torch.zeros_like(w, dtype=torch.bool)
    on[rows, cols] = True
    assert on.sum() == adapter.nnz == 16
    assert w[on].min() >= w[~on].max()


def _shira_state(dtype=torch.float32):
    model = lorakit.apply(nn.Sequential(nn.Linear(8, 6)), SHiRAConfig(r=1, random_seed=0, target_modules=["0"]))
    perturb_(model)
    return lorakit.AdapterState.from_model(model)


def test_switch_into_a_bf16_layer_casts_the_values():
    """Catches: float32 values added into a bf16 weight without a cast (index_add_ refuses mixed dtypes)."""
    torch.manual_seed(0)
    state = _shira_state()
    target = nn.Sequential(nn.Linear(8, 6)).to(torch.bfloat16)
    before = target[0].weight.detach().clone()
    saved = switch_in(target, state, scale=0.5)
    want = before + (0.5 * state.delta("0", before)).to(torch.bfloat16)  # each entry: one bf16 addition
    torch.testing.assert_close(target[0].weight.detach(), want, rtol=0, atol=0)
    switch_out(target, saved)
    assert torch.equal(target[0].weight.detach(), before)


def test_switch_into_an_adapted_layer_is_refused_by_name():
    state = _shira_state()
    adapted = lorakit.apply(nn.Sequential(nn.Linear(8, 6)), lorakit.LoRAConfig(r=2, target_modules=["0"]))
    with pytest.raises(TypeError, match=r"^module '0' carries a lorakit adapter; switch into plain layers "
                                        r"\(lorakit.unwrap first\)$"):
        switch_in(adapted, state)


@pytest.mark.parametrize("config", [LoRAXSConfig, LoRASBConfig])
def test_three_factor_rank_limit(config):
    """r = min(out, in) is allowed (catches: refusing the limit itself); above it the message names the module."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lorakit.apply(nn.Sequential(nn.Linear(8, 6)), config(r=6, target_modules=["0"]))
    assert lorakit.adapters(model)["0"].lora_A.weight.shape == (6, 8)
    with pytest.raises(ValueError, match=r"^module '0': rank r=7 exceeds min\(out, in\)=6 of the weight$"):
        lorakit.apply(nn.Sequential(nn.Linear(8, 6)), config(r=7, target_modules=["0"]))


def test_top_svd_is_the_truncated_svd():
    m = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    u, s, vh = top_svd(m, 3, "x")
    assert u.shape == (7, 3) and s.shape == (3,) and vh.shape == (3, 5)
    full = torch.linalg.svd(m)
    torch.testing.assert_close(s, full.S[:3])
    torch.testing.assert_close(u * s @ vh, full.U[:, :3] * full.S[:3] @ full.Vh[:3])


def test_lora_xs_init_false_leaves_r_at_linears_initialisation():
    """init_lora_weights=False: R is nn.Linear's Kaiming-uniform draw (entries up to 1/sqrt(r)), not N(0, 1e-5²).
    Catches: the small draw used whatever the option."""
    model = lorakit.apply(nn.Sequential(nn.Linear(16, 16)), LoRAXSConfig(r=4, init_lora_weights=False, target_modules=["0"]))
    r = lorakit.adapters(model)["0"].lora_R.weight
    assert 0.05 < r.abs().max() <= 0.5
    default = lorakit.apply(nn.Sequential(nn.Linear(16, 16)), LoRAXSConfig(r=4, target_modules=["0"]))
    assert lorakit.adapters(default)["0"].lora_R.weight.abs().max() < 1e-3


def _sb(base=None, **kw):
    base = base or nn.Sequential(nn.Linear(8, 6))
    return lorakit.apply(base, LoRASBConfig(r=3, lora_alpha=3, target_modules=["0"], **kw))


def test_lora_sb_calibration_with_zero_gradient_entries():
    """dL/dW may be exactly 0 (a dead unit): sign 0, no step there. Catches: dividing by the sign (inf)."""
    model = _sb(first_step_lr=0.01)
    layer = lorakit.adapters(model)["0"]
    g = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    g[2] = 0.0
    layer.calibrate_(g)
    step = -0.01 * torch.sign(g)
    u, s, vh = torch.linalg.svd(step)
    want = u[:, :3] * s[:3] @ vh[:3]
    delta = lorakit.AdapterState.from_model(model).delta("0")
    torch.testing.assert_close(delta, want, rtol=1e-5, atol=1e-7)


def _warnings_in_training(model, steps=2, train=True):
    model.train(train)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            model(torch.randn(2, 8))
    return [w for w in caught if "without calibration" in str(w.message)]


def test_lora_sb_warns_once_in_training_while_uncalibrated():
    """Catches: a warning in every step, in eval mode, or whatever the calibration."""
    caught = _warnings_in_training(_sb())
    assert len(caught) == 1
    assert str(caught[0].message) == (
        "LoRA-SB module '0' is training without calibration; build the model with "
        "lorakit.init.calibrate(model, config, batches, loss_fn) to start from the first-gradient update")
    assert _warnings_in_training(_sb(), train=False) == []
    calibrated = _sb()
    lorakit.adapters(calibrated)["0"].calibrate_(torch.randn(6, 8))
    assert _warnings_in_training(calibrated) == []


def test_lora_sb_loaded_from_a_file_counts_as_calibrated(tmp_path):
    base = nn.Sequential(nn.Linear(8, 6))
    model = _sb(copy.deepcopy(base))
    lorakit.adapters(model)["0"].calibrate_(torch.randn(6, 8))
    lorakit.save_peft(model, tmp_path)
    loaded = lorakit.load_peft(base, tmp_path)
    assert _warnings_in_training(loaded) == []
