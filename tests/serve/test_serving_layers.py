"""serve/layers.py: the LoRA term inside a plain Linear's call or a hook elsewhere, and the serving weight layout."""

import torch
import torch.nn.functional as F
from serve_helpers import load_model
from torch import nn

from lorakit.serve.layers import ServingLayers, transposes


def test_the_layout_is_the_same_values_transposed_and_comes_back():
    model, _ = load_model("byte-llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()  # a tied head and embedding: one parameter, transposed once
    assert model.lm_head.weight is model.model.embed_tokens.weight
    params = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
    before = {n: p.detach().clone() for n, p in params.items()}
    ids = torch.tensor([[1, 5, 9, 40, 7]])
    with torch.no_grad():
        want = model(ids).logits
    layers = ServingLayers(model, transpose=True)
    linear = [m.weight for m in model.modules() if type(m) is nn.Linear]
    assert linear and all(not w.is_contiguous() and w.t().is_contiguous() for w in linear)
    assert all(torch.equal(p, before[n]) for n, p in params.items())  # values unchanged
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, atol=1e-5, rtol=1e-5)
    layers.close()
    assert dict(model.named_parameters(remove_duplicate=False)) == params  # the same Parameter objects
    assert all(p.is_contiguous() and torch.equal(p, before[n]) for n, p in params.items())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)


def test_the_layout_is_only_for_float32_on_the_cpu():
    assert transposes(torch.device("cpu"), torch.float32)
    assert not transposes(torch.device("cpu"), torch.bfloat16)
    assert not transposes(torch.device("meta"), torch.float32)


class OwnLinear(nn.Linear):
    """A Linear subclass (its forward is its own): it gets a hook, not an instance forward."""


def test_the_term_is_added_once_inside_the_call_or_by_a_hook_and_removed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), OwnLinear(6, 4))
    x = torch.randn(3, 8)
    with torch.no_grad():
        base = model(x)
    extra = {id(model[0]): torch.randn(8, 6), id(model[2]): torch.randn(6, 4)}

    def add(module, args, output):
        output.add_(args[0] @ extra[id(module)])

    layers = ServingLayers(model, transpose=False)
    for path in ("0", "2", "0"):  # installing twice adds nothing
        layers.install(path, add)
    assert "forward" in vars(model[0]) and not model[0]._forward_hooks
    assert "forward" not in vars(model[2]) and len(model[2]._forward_hooks) == 1
    with torch.no_grad():
        h = F.relu(F.linear(x, model[0].weight, model[0].bias) + x @ extra[id(model[0])])
        want = F.linear(h, model[2].weight, model[2].bias) + h @ extra[id(model[2])]
        torch.testing.assert_close(model(x), want)
    layers.close()
    assert not any("forward" in vars(m) or m._forward_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), base)
