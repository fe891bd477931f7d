"""Quantised bases: the bytes transformers writes, PEFT parity both ways, merging as PEFT, refusals."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import lorakit
from lorakit.compress import QuantizationUnavailable, QuantizeConfig, dequantize_, quantize_
from lorakit.core.adapter import dense_weight, quantized_kind

from compress_helpers import tiny_llama

pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _randomise(model: nn.Module, seed: int = 3) -> None:
    """Give every adapter tensor a random value, so the update is not zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in lorakit.adapters(model).values():
            for t in a.adapter_tensors().values():
                t.copy_(torch.randn(t.shape, generator=g) * 0.1 + (1.0 if t.dim() == 1 else 0.0))


def _logits(model, tokens):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(tokens).logits.float()


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantize_writes_the_bytes_transformers_writes(tmp_path, kind):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama().save_pretrained(tmp_path)
    ours = quantize_(tiny_llama(), kind)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind) if kind == "nf4" else BitsAndBytesConfig(load_in_8bit=True)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=bnb, device_map="cpu")
    a, b = ours.model.layers[1].mlp.down_proj, theirs.model.layers[1].mlp.down_proj
    assert type(a) is type(b) and a.weight.dtype in (torch.uint8, torch.int8)
    assert torch.equal(a.weight.data, b.weight.data)
    assert torch.equal(dense_weight(a), dense_weight(b))
    assert type(ours.lm_head) is nn.Linear  # the output head stays dense, as transformers leaves it


@pytest.mark.parametrize("kind,method", [("nf4", "lora"), ("fp4", "lora"), ("int8", "lora"), ("torchao-int8", "lora"),
                                         ("nf4", "dora")])
def test_peft_loads_lorakits_adapter_and_lorakit_loads_pefts(tmp_path, tokens, kind, method):
    base = quantize_(tiny_llama(), kind)
    ours = copy.deepcopy(base)
    lorakit.apply(ours, lorakit.LoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=method == "dora"))
    _randomise(ours)
    assert lorakit.adapters(ours)["model.layers.0.self_attn.q_proj"].lora_A.weight.dtype == torch.float32
    lorakit.save_peft(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    layer = theirs.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__module__.endswith(("bnb", "torchao")), type(layer)  # peft used its quantised layer kind
    expected = _logits(ours, tokens)
    assert not torch.allclose(expected, _logits(copy.deepcopy(base), tokens), atol=1e-3)  # the adapter does something
    torch.testing.assert_close(_logits(theirs, tokens), expected, atol=1e-5, rtol=1e-5)

    # the other way: an adapter peft trained (random factors) on the same quantised base
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, use_dora=method == "dora")
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    pm.save_pretrained(tmp_path / "peft")
    mine = lorakit.load_peft(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(_logits(mine, tokens), _logits(pm, tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_merge_requantises_with_a_rounding_warning_as_peft(tmp_path, tokens, kind):
    base = quantize_(tiny_llama(), kind)
    ours = lorakit.apply(copy.deepcopy(base), lorakit.LoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    _randomise(ours)
    lorakit.save_peft(ours, tmp_path)
    unmerged = _logits(ours, tokens)
    with pytest.warns(UserWarning, match="rounding"):
        lorakit.merge(ours)
    layer = ours.model.layers[0].self_attn.q_proj
    assert quantized_kind(layer) is not None and not lorakit.adapters(ours)  # still quantised, no adapter left
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = theirs.merge_and_unload()
    assert torch.equal(layer.weight.data, theirs.model.layers[0].self_attn.q_proj.weight.data)
    merged = _logits(ours, tokens)
    torch.testing.assert_close(merged, _logits(theirs, tokens), atol=1e-6, rtol=1e-6)
    assert (merged - unmerged).abs().max() > 0  # rounding: this is why the warning exists
    torch.testing.assert_close(merged, unmerged, atol=0.2, rtol=0.1)


def test_dequantize_gives_dense_layers_into_which_a_merge_is_exact(tokens):
    model = quantize_(tiny_llama(), "nf4")
    rounded = dense_weight(model.model.layers[0].mlp.up_proj).clone()
    before = _logits(model, tokens)
    dequantize_(model)
    assert type(model.model.layers[0].mlp.up_proj) is nn.Linear and not hasattr(model, "is_loaded_in_4bit")
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, rounded)
    torch.testing.assert_close(_logits(model, tokens), before, atol=1e-5, rtol=1e-5)
    lorakit.apply(model, lorakit.LoRAConfig(r=4, target_modules=TARGETS))
    _randomise(model)
    with_adapter = _logits(model, tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a dense merge has nothing to warn about
        lorakit.merge(model)
    torch.testing.assert_close(_logits(model, tokens), with_adapter, atol=1e-5, rtol=1e-5)


def test_training_moves_only_the_adapter_over_a_4bit_base(tokens):
    model = lorakit.apply(quantize_(tiny_llama(), "nf4"), lorakit.LoRAConfig(r=4, target_modules=TARGETS))
    packed = model.model.layers[0].self_attn.q_proj.base_layer.weight.data.clone()
    before = _logits(model, tokens)
    trainable = lorakit.trainable_parameters(model)
    assert trainable and all(".lora_" in n for n in trainable)
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    model(tokens, labels=tokens).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainable.items() if "lora_B" in n)  # B starts at 0
    opt.step()
    assert not torch.allclose(_logits(model, tokens), before)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.base_layer.weight.data, packed)


def test_methods_that_need_w0_refuse_a_quantised_layer():
    from lorakit.methods.lora_xs import LoRAXSConfig

    model = quantize_(tiny_llama(), "nf4")
    with pytest.raises(TypeError, match=r"model.layers.0.self_attn.q_proj' is quantised .*'lora'"):
        lorakit.apply(copy.deepcopy(model), LoRAXSConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="quantised .* initialise on the unquantised model|Initialise on the unquantised"):
        lorakit.apply(copy.deepcopy(model), lorakit.LoRAConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))


def test_a_quantisation_this_machine_cannot_run_is_refused_before_touching_the_model(monkeypatch):
    from lorakit.compress import quantize as q

    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def broken(config):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(q, "_run_small", broken)
    with pytest.raises(QuantizationUnavailable, match=r"'fp4' does not run on this machine \(RuntimeError: no kernel"):
        quantize_(model, "fp4")
    assert all(type(m) is not object and quantized_kind(m) is None for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="choose one of nf4, fp4, int8"):
        QuantizeConfig("int3")


def test_torchao_int4_on_a_cpu_build_says_what_runs_instead():
    pytest.importorskip("torchao")
    if torch.cuda.is_available():
        pytest.skip("int4 weight-only runs where CUDA does")
    with pytest.raises(QuantizationUnavailable, match="use nf4 or fp4"):
        quantize_(tiny_llama(), "torchao-int4")


def test_a_4bit_layer_bitsandbytes_repacked_for_cpu_inference_still_dequantises():
    model = quantize_(tiny_llama(), "nf4")
    layer = model.model.layers[0].mlp.up_proj
    before = dense_weight(layer).clone()
    layer.support_avx512bf16_for_cpu = True  # as transformers' loader leaves it
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(layer.weight.data, layer.weight.quant_state)
    after = dense_weight(layer)
    assert after.shape == before.shape
    torch.testing.assert_close(after, before, atol=0, rtol=2 ** -8)  # absmax now rounded to bf16: 8 bits of mantissa


def test_qlora_with_the_rest_of_the_model_in_bf16_trains(tokens):
    cfg = QuantizeConfig("nf4", compute_dtype=torch.bfloat16, dtype=torch.bfloat16)
    model = lorakit.apply(quantize_(tiny_llama(), cfg), lorakit.LoRAConfig(r=4, target_modules=TARGETS))
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    layer = lorakit.adapters(model)["model.layers.0.self_attn.q_proj"]
    assert layer.lora_A.weight.dtype == torch.float32 and layer.base_layer.weight.quant_state.dtype == torch.bfloat16
    loss = model(tokens, labels=tokens).loss
    loss.backward()
    assert torch.isfinite(loss) and layer.lora_B.weight.grad.abs().sum() > 0
