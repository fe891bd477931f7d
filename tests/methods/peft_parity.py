"""Shared pieces of the PEFT parity tests: a small base model and the two load directions."""
import warnings

import torch
from torch import nn

import lorakit

X = torch.randn(6, 32, generator=torch.Generator().manual_seed(1))


class MLP(nn.Module):
    """Two Linear layers of different shapes (32 -> 48 -> 32); seeded, so two instances are equal."""

    def __init__(self, d=32, h=48, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.up, self.down = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@torch.no_grad()
def add_noise_(model: nn.Module, scale: float) -> None:
    """Seeded noise on the trainable parameters only (frozen buffers such as random bases stay as made)."""
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g) * scale)


def peft_to_lorakit(peft_config, tmp_path, scale=0.5):
    """Train-like noise on a PEFT adapter, save it with PEFT, load it in lorakit: outputs must agree."""
    import peft

    pm = peft.get_peft_model(MLP(), peft_config)
    add_noise_(pm, scale)
    with torch.no_grad():
        expected = pm(X)
    pm.save_pretrained(tmp_path)
    model = lorakit.load_peft(MLP(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model(X), expected, atol=1e-5, rtol=1e-4)
    return model


def lorakit_to_peft(config, tmp_path, scale=0.5):
    """Noise on a lorakit adapter, save it with lorakit, load it with PEFT: outputs must agree."""
    import peft

    model = lorakit.apply(MLP(), config)
    add_noise_(model, scale)
    with torch.no_grad():
        expected = model(X)
    lorakit.save_peft(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about lorakit's extra config fields
        pm = peft.PeftModel.from_pretrained(MLP(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(pm(X), expected, atol=1e-5, rtol=1e-4)
    return pm
