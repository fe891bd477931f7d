"""No composer makes a tensor without naming its device: with "meta" as torch's default device (a tensor made
without ``device=`` lands there and holds no values) generation gives the same images as a normal run."""
from __future__ import annotations

import pytest
import torch

from lorakit.diffusion import compose

PROMPT = "yellow cross left"
LAYOUT = [(0, 0, 16, 32), (16, 0, 32, 32)]


def generate(pipe, names, method, **kw):
    with compose(pipe, names, method, **kw):
        return pipe(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt").images


@pytest.mark.parametrize("method,kw", [("composite", {}), ("cmlora", {}), ("clora", {"prompt": PROMPT}),
                                       ("lora_composer", {"prompt": PROMPT, "layout": LAYOUT})])
def test_same_images_with_meta_as_the_default_device(loaded, method, kw):
    pipe, names = loaded
    expected = generate(pipe, names, method, **kw)
    with torch.device("meta"):
        got = generate(pipe, names, method, **kw)
    assert got.device.type == "cpu" and torch.equal(got, expected)
