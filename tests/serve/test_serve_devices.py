"""Devices and dtypes of the server: an absent device is one clear error; no tensor is made off the engine's
device (the engine runs with "meta" as torch's default device, so a tensor made without naming its device breaks
the step); bf16 and fp16 bases serve the same greedy tokens as `peft` in that dtype; the CUDA host pool is pinned."""

import pytest
import torch

from lorakit.core.devices import available_devices, resolve_device
from lorakit.serve import Engine, EngineConfig, Request, SamplingParams

from serve_helpers import load_model, make_adapter

PROMPTS = [[1, 5, 6, 7, 8, 9, 10], [1, 20, 21], [1, 30, 31, 32, 33], [1, 40, 41, 42, 43, 44, 45, 46, 47]]


def _engine(adapters, dtype=torch.float32, **config):
    model, tok = load_model("tiny-llama")
    engine = Engine(model.to(dtype), tok, EngineConfig(**{"max_batch": 3, "max_len": 64, "prefetch": False, **config}))
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    return engine


@pytest.mark.parametrize("device", ["cuda", "cuda:7", "mps"])
def test_an_absent_device_is_one_line_naming_it_and_what_is_available(device, capsys):
    from lorakit.cli import main

    if device in available_devices() or (device == "cuda" and torch.cuda.is_available()):
        pytest.skip(f"{device} is available here")
    assert main(["serve", "--model", "tiny-llama", "--device", device]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"device '{device}' is not available" in err[0]
    assert "available here: " + ", ".join(available_devices()) in err[0]


def test_device_names():
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device("auto").type in ("cpu", "cuda", "mps")
    for bad in ("gpu", "cuda:x", "cpu:1", ""):
        with pytest.raises(ValueError, match="device must be auto, cpu, cuda, cuda:N or mps"):
            resolve_device(bad)


def _workload(engine):
    """Mixed ranks, the base model, logprobs with echo, logit_bias, a seeded draw and a merged adapter."""
    reqs = [Request(PROMPTS[0], "a", SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=2)),
            Request(PROMPTS[1], "b", SamplingParams(max_tokens=5, temperature=0.8, seed=3, ignore_eos=True)),
            Request(PROMPTS[2], None, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logit_bias={7: 5.0})),
            Request(PROMPTS[3], "a", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=1,
                                                    prompt_logprobs=1)),
            Request(PROMPTS[1], None, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
                    merge=(["a", "b"], [0.5, 0.5], "linear"))]
    if engine.store.entry("xs") is not None:  # served at its true size (serve/truesize.py)
        reqs.append(Request(PROMPTS[2], "xs", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)))
    done = engine.drain([engine.submit(r) for r in reqs])
    assert all(r.finish_reason == "length" for r in done), [r.error for r in done]
    return [(r.output, [round(t.logprob, 4) for t in r.logprobs],
             [None if t is None else round(t.logprob, 4) for t in r.prompt_logprobs or []]) for r in done]


def _lora_xs(path):
    import lorakit

    base, _ = load_model("tiny-llama")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model = lorakit.apply(base, lorakit.METHODS.get("lora_xs").config_class(r=4, target_modules=["q_proj", "v_proj"]))
        for a in lorakit.adapters(model).values():
            torch.nn.init.normal_(a.lora_R.weight, std=0.5)
    lorakit.save_peft(model, path)
    return path


def test_the_engine_makes_no_tensor_without_naming_its_device(tmp_path):
    """With "meta" as the default device, any tensor that serve/ makes without ``device=`` is a meta tensor, and
    the step fails (meta tensors hold no values): the outputs must equal a normal run's."""
    adapters = {"a": make_adapter(tmp_path / "a", r=4), "b": make_adapter(tmp_path / "b", r=8, seed=1, via="lorakit"),
                "xs": _lora_xs(tmp_path / "xs")}
    engine = _engine(adapters)
    expected = _workload(engine)
    engine.stop()
    engine = _engine(adapters)
    with torch.device("meta"):
        got = _workload(engine)
    engine.stop()
    assert got == expected and any(out != expected[2][0] for out, *_ in expected[:2])


def test_a_forgotten_device_fails_that_check(tmp_path, monkeypatch):
    """The check above catches what it is for: ``add_bias`` as it was before devices (ids made without
    ``device=``) breaks the meta run."""
    import lorakit.serve.features as features_module

    def add_bias_without_device(logits, params):
        logits = logits.clone()
        for i, p in enumerate(params):
            if p.logit_bias:
                ids = torch.tensor(list(p.logit_bias), dtype=torch.long)
                logits[i, ids] += torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype)
        return logits

    monkeypatch.setattr(features_module, "add_bias", add_bias_without_device)
    adapters = {"a": make_adapter(tmp_path / "a", r=4), "b": make_adapter(tmp_path / "b", r=8, seed=1)}
    engine = _engine(adapters)
    expected = _workload(engine)  # on the default device it runs
    assert 7 in expected[2][0]  # the bias shows in the tokens
    try:
        with torch.device("meta"):
            assert _workload(engine) != expected
    except (RuntimeError, NotImplementedError):  # or the step fails outright
        pass
    engine.stop()


def _peft_greedy(path, dtype, prompt, n):
    from peft import PeftModel

    base, _ = load_model("tiny-llama")
    model = PeftModel.from_pretrained(base.to(dtype), str(path)).eval()
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(prompt):].tolist(), out.logits[0][0].float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_bases_serve_peft_tokens(tmp_path, dtype):
    """A bf16 / fp16 base on the CPU: each request's greedy tokens equal `peft`'s on the same base in the same dtype
    (PEFT keeps the adapter in float32 and rounds the sum once, as the server does); first-step logits agree to
    within 2 bf16 / 4 fp16 units in the last place of the largest logit."""
    adapters = {"a": make_adapter(tmp_path / "a", r=4), "b": make_adapter(tmp_path / "b", r=16, seed=2)}
    engine = _engine(adapters, dtype)
    names = ["a", "b", None, "a"]
    reqs = engine.drain([engine.submit(Request(p, a, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                                                    logprobs=0)))
                         for p, a in zip(PROMPTS, names)])
    engine.stop()
    eps = torch.finfo(dtype).eps
    for prompt, name, req in zip(PROMPTS, names, reqs):
        tokens, logits = _peft_greedy(tmp_path / (name or "a"), dtype, prompt, 8) if name else (None, None)
        if name is None:
            continue
        assert req.output == tokens, (name, prompt)
        lp = torch.log_softmax(logits, -1)[tokens[0]].item()
        assert abs(req.logprobs[0].logprob - lp) <= (2 if dtype == torch.bfloat16 else 4) * eps * logits.abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_pool_is_pinned_on_the_host_and_serves_cpu_tokens(tmp_path):
    adapters = {"a": make_adapter(tmp_path / "a", r=4), "b": make_adapter(tmp_path / "b", r=8, seed=1),
                "xs": _lora_xs(tmp_path / "xs")}
    cpu = _engine(adapters)
    expected = [r.output for r in cpu.drain([cpu.submit(Request(p, a, SamplingParams(max_tokens=6, temperature=0,
                                                                                      ignore_eos=True)))
                                             for p, a in zip(PROMPTS, ["a", "b", None, "xs"])])]
    cpu.stop()
    model, tok = load_model("tiny-llama")
    gpu = Engine(model.cuda(), tok, EngineConfig(max_batch=3, max_len=64, prefetch=False))
    for name, path in adapters.items():
        gpu.add_adapter(name, path)
    assert gpu.pool.device.type == "cuda"
    assert gpu.store.load(gpu.store.entry("a").aid).blob.is_pinned()
    got = [r.output for r in gpu.drain([gpu.submit(Request(p, a, SamplingParams(max_tokens=6, temperature=0,
                                                                                  ignore_eos=True)))
                                        for p, a in zip(PROMPTS, ["a", "b", None, "xs"])])]
    assert all(c.storage.device.type == "cuda" for c in gpu.pool.classes.values())
    gpu.stop()
    assert got == expected
