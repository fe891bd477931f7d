"""LoRA on embeddings whose output the model scales (Gemma 3, BART/mBART ``scale_embedding``) agrees with peft.

The base multiplies its lookup by ``embed_scale``; peft scales the adapter's update alike, so a ΔW merged into the
weight gives the same output. Checked both ways (lorakit files in peft, peft files in lorakit), for the merged
weights and for the per-module ΔW, to fp32 tolerance. The conformance toy ``ToyScaledEmbedding`` covers every
method that wraps embeddings.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

import lorakit
from lorakit.testing import ScaledEmbedding

ATOL = 1e-5
_MODELS: dict = {}


def _build(name: str) -> nn.Module:
    """``<arch>`` has its own output head; ``<arch>-tied`` ties it to the input embeddings (the configs' default)."""
    torch.manual_seed(0)
    arch, tied = name.removesuffix("-tied"), name.endswith("-tied")
    if arch == "gemma3":
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        return Gemma3ForCausalLM(Gemma3TextConfig(
            vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, max_position_embeddings=64, sliding_window=8, tie_word_embeddings=tied))
    from transformers import BartConfig, BartForConditionalGeneration, MBartConfig, MBartForConditionalGeneration

    config_cls, model_cls = (BartConfig, BartForConditionalGeneration) if arch == "bart" else (MBartConfig, MBartForConditionalGeneration)
    return model_cls(config_cls(
        vocab_size=128, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, scale_embedding=True, tie_word_embeddings=tied))


def base(name: str) -> nn.Module:
    if name not in _MODELS:
        _MODELS[name] = _build(name).eval()
    return copy.deepcopy(_MODELS[name])


def run(model: nn.Module) -> torch.Tensor:
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    err = (a - b).abs().max().item()
    assert torch.allclose(a, b, atol=ATOL, rtol=0), f"{what}: max abs difference {err:.3g}"


KW = dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
MODELS = ["gemma3", "bart", "mbart", "gemma3-tied", "bart-tied"]


def embeddings(model: nn.Module) -> dict[str, nn.Module]:
    return {p: m for p, m in model.named_modules() if getattr(m, "embed_scale", None) is not None
            and isinstance(m, nn.Embedding)}


@pytest.mark.parametrize("name", MODELS)
def test_the_models_scale_their_embeddings(name):
    scaled = embeddings(base(name))
    assert scaled and all(float(m.embed_scale) == pytest.approx(32 ** 0.5) for m in scaled.values())


@pytest.mark.parametrize("name", MODELS)
def test_lorakit_adapter_in_peft(name, tmp_path, perturb):
    model = perturb(lorakit.apply(base(name), lorakit.LoRAConfig(**KW)))
    assert any(p.endswith("embed_tokens") for p in lorakit.adapters(model))
    out = run(model)
    assert (out - run(base(name))).abs().max() > 1e-3
    lorakit.save_peft(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(base(name), tmp_path)
    close(run(theirs), out, f"{name}: peft output of a lorakit adapter")
    if name.endswith("-tied"):
        return  # merging is refused (test_merging_into_tied_embeddings_is_refused)
    ours = lorakit.merge(copy.deepcopy(model))
    close(run(ours), out, f"{name}: lorakit merged output")
    close(run(theirs.merge_and_unload()), out, f"{name}: peft merged output of a lorakit adapter")


@pytest.mark.parametrize("name", MODELS)
def test_peft_adapter_in_lorakit(name, tmp_path, perturb):
    model = perturb(get_peft_model(base(name), LoraConfig(init_lora_weights=False, **copy.deepcopy(KW))))
    out = run(model)
    model.save_pretrained(tmp_path)
    ours = lorakit.load_peft(base(name), tmp_path)
    close(run(ours), out, f"{name}: lorakit output of a peft adapter")

    state = lorakit.load_state(tmp_path)
    layers = {p.removeprefix("base_model.model."): m for p, m in model.named_modules() if isinstance(m, LoraLayer)}
    for path, layer in layers.items():
        close(state.delta(path, layer.get_base_layer().weight.detach()), layer.get_delta_weight("default"), f"{name}: ΔW of {path}")

    if name.endswith("-tied"):
        return  # merging is refused (test_merging_into_tied_embeddings_is_refused)
    mine = lorakit.merge(ours)
    theirs = model.merge_and_unload()
    ref = theirs.state_dict()
    for key, value in mine.state_dict().items():
        close(value, ref[key], f"{name}: merged weight {key}")
    close(run(mine), out, f"{name}: lorakit merged output of a peft adapter")


def test_a_non_scalar_embed_scale_is_refused():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = ScaledEmbedding(10, 4, scale=2.0)
            self.emb.embed_scale = torch.ones(4)

    with pytest.raises(ValueError, match="ScaledEmbedding.embed_scale is Tensor of shape \\(4,\\).*Exclude this embedding"):
        lorakit.apply(Odd(), lorakit.LoRAConfig(r=2, target_modules=["emb"]))


@pytest.mark.parametrize("name", ["gemma3-tied", "bart-tied"])
def test_merging_into_tied_embeddings_is_refused(name, perturb):
    """The head shares the embedding's weight: ΔW merged there changes the logits too (peft merges it anyway)."""
    model = perturb(lorakit.apply(base(name), lorakit.LoRAConfig(**KW)))
    out = run(model)
    with pytest.raises(ValueError, match="embed_tokens': its weight is shared with .*lm_head.*untie"):
        lorakit.merge(model)
    close(run(model), out, f"{name}: output after a refused merge")
    peft_model = perturb(get_peft_model(base(name), LoraConfig(init_lora_weights=False, **copy.deepcopy(KW))))
    peft_out = run(peft_model)
    assert (run(peft_model.merge_and_unload()) - peft_out).abs().max() > 1.0  # what the refusal prevents
    plain = perturb(lorakit.apply(base(name), lorakit.LoRAConfig(r=4, target_modules=["q_proj"])))
    close(run(lorakit.merge(copy.deepcopy(plain))), run(plain), f"{name}: merging untied layers still works")
