"""The engine over a quantised base (``lorakit.compress.quantize_``) against `peft` on the same quantised base, one
request at a time: mixed batches of two adapters and the base; LLM.int8's batch-wide outlier columns; the
packed layers' shapes; ``lorakit serve --quantize`` refusing a kind this machine cannot run."""

import warnings

import pytest
import torch

from lorakit.compress.quantize import QuantizationUnavailable, QuantizeConfig, check_available, quantize_
from lorakit.core.adapter import quantized_kind
from lorakit.serve import Engine, EngineConfig, Request, SamplingParams
from lorakit.serve.store import linear_shapes

from serve_helpers import load_model, make_adapter

PROMPTS = [[1, 72, 101, 99, 108, 111], [1, 20, 21], [1, 30, 31, 32, 33, 34, 35, 36], [1, 50, 99], [1, 60, 61, 62, 63]]
NAMES = ["a", "b", None, "a", "b"]
KINDS = ["nf4", "fp4", "int8", "torchao-int8"]


def quantized_base(kind, outliers=False):
    """byte-llama with its linear layers quantised to ``kind``; with ``outliers``, token 99's embedding is one-hot,
    so after the RMS norm its column 3 is 8: above LLM.int8's outlier threshold (6.0) in the rows holding it only."""
    model, tok = load_model("byte-llama")
    if outliers:
        with torch.no_grad():
            model.model.embed_tokens.weight[99] = 0
            model.model.embed_tokens.weight[99, 3] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_(model, kind), tok


def peft_greedy_over(kind, adapter_dir, prompt, n, outliers=False):
    """`peft` alone on the same quantised base: greedy continuation of one prompt (None: the base model)."""
    from peft import PeftModel

    base, _ = quantized_base(kind, outliers)
    model = PeftModel.from_pretrained(base, str(adapter_dir)) if adapter_dir else base
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    make_adapter(root / "a", "byte-llama", r=4, seed=1, alpha=64)
    make_adapter(root / "b", "byte-llama", r=8, seed=2, alpha=64, via="lorakit")
    return root


def serve(kind, adapters, outliers=False, n=6):
    base, tok = quantized_base(kind, outliers)
    engine = Engine(base, tok, EngineConfig(max_batch=3, max_len=64, pool_bytes=1 << 20))
    engine.store.scan(adapters)
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reqs = engine.drain([engine.submit(Request(p, a, params)) for p, a in zip(PROMPTS, NAMES)])
    engine.stop()
    return engine, reqs


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_batch_over_a_quantised_base_matches_peft(kind, adapters):
    try:
        check_available(QuantizeConfig(kind))
    except QuantizationUnavailable as e:
        pytest.skip(str(e))
    engine, reqs = serve(kind, adapters)
    assert engine.stats["prefill_steps"] > 1  # 5 requests over 3 slots: later ones joined a running batch
    outputs = {}
    for p, a, req in zip(PROMPTS, NAMES, reqs):
        assert req.finish_reason == "length" and len(req.output) == 6, req.error
        assert req.output == peft_greedy_over(kind, adapters / a if a else None, p, 6), (kind, a, p)
        outputs[a] = outputs.get(a, []) + [req.output]
    assert outputs["a"] != outputs["b"] != outputs[None]  # the adapters change the tokens: they were applied


def test_int8_outlier_columns_do_not_leak_between_requests(adapters):
    """LLM.int8 takes its float16 columns over the whole step: the runner reruns such a step per request, so each
    row's logits are those of `peft` on that prompt alone (sharing the outlier columns moves them by ~1e-3)."""
    from peft import PeftModel

    engine, reqs = serve("int8", adapters, outliers=True)
    assert engine.runner.rowwise_calls > 0  # token 99 did put activations above the threshold
    for p, a, req in zip(PROMPTS, NAMES, reqs):
        assert req.output == peft_greedy_over("int8", adapters / a if a else None, p, 6, outliers=True), (a, p)
    base, tok = quantized_base("int8", outliers=True)
    engine = Engine(base, tok, EngineConfig(max_batch=3, max_len=64, pool_bytes=1 << 20))
    engine.store.scan(adapters)
    aid = engine.store.entry("a").aid
    engine.pool.activate(engine.store.load(aid))
    engine.pool.acquire(aid)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2]]  # only the first holds token 99
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = engine.runner.prefill(prompts, 0, [None, None, aid])
        engine.stop()
        for prompt, name, row in zip(prompts, [None, None, "a"], got):
            ref_base, _ = quantized_base("int8", outliers=True)
            ref = PeftModel.from_pretrained(ref_base, str(adapters / name)) if name else ref_base
            torch.testing.assert_close(row, ref(torch.tensor([prompt])).logits[0, -1].float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_linear_shapes_read_features_not_packed_weights(kind):
    dense, _ = load_model("byte-llama")
    base, _ = quantized_base(kind)
    assert any(quantized_kind(m) is not None for m in base.modules())
    assert linear_shapes(base) == linear_shapes(dense)
    assert linear_shapes(base)["model.layers.0.mlp.down_proj"] == (128, 64)


def test_serve_refuses_a_kind_this_machine_cannot_run(capsys, monkeypatch):
    from lorakit import zoo
    from lorakit.cli import main

    try:
        check_available(QuantizeConfig("torchao-int4"))
        pytest.skip("torchao int4 runs on this machine")
    except QuantizationUnavailable:
        pass

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the quantisation was refused")

    monkeypatch.setattr(zoo, "load", no_load)
    assert main(["serve", "--model", "byte-llama", "--quantize", "torchao-int4", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'torchao-int4' does not run on this machine" in err and "nf4" in err


def test_build_engine_quantises_the_zoo_base(tmp_path):
    """What `lorakit serve --quantize nf4` builds: the zoo base in nf4, its adapters served as `peft` serves them."""
    from lorakit.serve.cli import build_engine

    make_adapter(tmp_path / "a", "tiny-llama", r=4, alpha=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = build_engine("tiny-llama", str(tmp_path), quantize="nf4", max_batch=2, max_len=32, pool_bytes=1 << 20)
        kinds = {quantized_kind(m).name for m in engine.runner.model.modules() if quantized_kind(m) is not None}
        assert kinds == {"bitsandbytes 4-bit"}
        params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        req = engine.drain([engine.generate([1, 5, 6, 7], "a", params)])[0]
        engine.stop()
        from peft import PeftModel

        from lorakit import zoo

        base, _ = zoo.load("tiny-llama", "causal_lm")
        ref = PeftModel.from_pretrained(quantize_(base, "nf4"), str(tmp_path / "a"))
        out = ref.generate(input_ids=torch.tensor([[1, 5, 6, 7]]), max_new_tokens=4, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    assert req.output == out[0, 4:].tolist()
