"""SHiRA's data-driven supports (lorakit.init.shira_masks.calibrate): refusals, targets and Conv1D layouts."""
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit.init import shira_masks
from lorakit.init.shira_masks import calibrate
from lorakit.methods.shira import SHiRAConfig


def _loss(model, batch):
    return model(batch).pow(2).mean()


class _Conv1DNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c = Conv1D(6, 10)  # weight [in=10, out=6]: fan_in_fan_out
        self.act = nn.ReLU()
        self.o = nn.Linear(6, 3)

    def forward(self, x):
        return self.o(self.act(self.c(x)))


BATCHES = [torch.randn(5, 10, generator=torch.Generator().manual_seed(i)) for i in range(2)]


@pytest.mark.parametrize("config, found", [
    (SHiRAConfig(r=2, target_modules=["c"], mask_type="random"), "SHiRAConfig(mask_type='random')"),
    (lorakit.LoRAConfig(r=2, target_modules=["c"]), "LoRAConfig(mask_type=None)"),
])
def test_calibrate_refuses_supports_that_need_no_data(config, found):
    with pytest.raises(ValueError) as err:
        calibrate(_Conv1DNet(), config, BATCHES, _loss)
    assert str(err.value) == ("calibrate needs a SHiRAConfig with mask_type 'gradient' or 'snip'; found "
                              f"{found}. Other supports need no data: use lorakit.apply")


def test_calibrate_scores_only_the_targeted_weights(monkeypatch):
    seen = []
    real = shira_masks.weight_gradients
    monkeypatch.setattr(shira_masks, "weight_gradients", lambda m, paths, *a: seen.append(list(paths)) or real(m, paths, *a))
    calibrate(_Conv1DNet(), SHiRAConfig(r=2, target_modules=["c"], mask_type="gradient", fan_in_fan_out=True),
              BATCHES, _loss)
    assert seen == [["c"]]


@pytest.mark.parametrize("mask_type", ["gradient", "snip"])
def test_conv1d_support_is_the_top_score_in_the_stored_layout(mask_type):
    reference = _Conv1DNet()
    for b in BATCHES:
        _loss(reference, b).backward()
    score = reference.c.weight.grad.abs()  # [in, out], as Conv1D stores it
    if mask_type == "snip":
        score = score * reference.c.weight.detach().abs()
    config = SHiRAConfig(r=2, target_modules=["c"], mask_type=mask_type, fan_in_fan_out=True)
    layer = calibrate(_Conv1DNet(), config, BATCHES, _loss).c
    rows, cols = layer.shira_indices.long()  # indices into the [out, in] matrix
    on = torch.zeros(6, 10, dtype=torch.bool)
    on[rows, cols] = True
    assert on.sum() == layer.nnz
    assert score.T[on].min() >= score.T[~on].max()
