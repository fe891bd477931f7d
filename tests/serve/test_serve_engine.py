"""The engine against `peft` run one adapter at a time: mixed ranks and base requests in one batch, continuous
batching, Llama / GPT-2 (Conv1D) / Gemma 3 (sliding windows); decoding options; cancellation; bad input."""

import pytest
import torch

from lorakit.serve import Engine, EngineConfig, EngineError, QueueFull, Request, SamplingParams, UnknownAdapter

from serve_helpers import load_model, make_adapter, peft_greedy

PROMPTS = [[1, 5, 6, 7, 8, 9, 10], [1, 20, 21], [1, 30, 31, 32, 33], [1, 40, 41, 42, 43, 44, 45, 46, 47], [1, 50],
           [1, 60, 61, 62], [1, 70, 71, 72, 73, 74]]


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def engine_for(model_name, adapter_root, **config):
    model, tok = load_model(model_name)
    engine = Engine(model, tok, EngineConfig(**{"max_batch": 3, "max_len": 64, "pool_bytes": 1 << 20, **config}))
    engine.store.scan(adapter_root)
    return engine


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-gpt2", "tiny-gemma"])
def test_mixed_batches_match_peft_one_adapter_at_a_time(tmp_path, model_name):
    for i, (r, via) in enumerate([(4, "peft"), (8, "lorakit"), (16, "peft")]):
        make_adapter(tmp_path / f"a{i}", model_name, r=r, seed=i, via=via)
    engine = engine_for(model_name, tmp_path)
    model = engine.runner.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = ["a0", "a1", None, "a2", "a1", "a0", "a2"]
    reqs = engine.drain([engine.submit(Request(p, a, greedy(6))) for p, a in zip(PROMPTS, names)])
    assert engine.stats["prefill_steps"] > 1  # max_batch 3 < 7 requests: later ones joined a running batch
    for p, a, req in zip(PROMPTS, names, reqs):
        assert req.finish_reason == "length" and len(req.output) == 6
        assert req.output == peft_greedy(model_name, tmp_path / a if a else None, p, 6), (a, p)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "serving changed a base weight"
    engine.stop()


def test_logits_match_peft_within_1e4(tmp_path):
    from peft import PeftModel

    make_adapter(tmp_path / "a", r=8)
    make_adapter(tmp_path / "b", r=32, seed=3)
    engine = engine_for("tiny-llama", tmp_path)
    for name in ("a", "b"):
        engine.pool.activate(engine.store.load(engine.store.entry(name).aid))
        engine.pool.acquire(engine.store.entry(name).aid)
    aids = [engine.store.entry(n).aid for n in ("a", "b", "a")]
    got = engine.runner.prefill(PROMPTS[:3], 0, aids)
    for name, prompt, row in zip(("a", "b", "a"), PROMPTS, got):
        base, _ = load_model("tiny-llama")
        ref = PeftModel.from_pretrained(base, str(tmp_path / name))(torch.tensor([prompt])).logits[0, -1]
        torch.testing.assert_close(row, ref, atol=1e-4, rtol=1e-4)
    engine.stop()


def test_sampling_is_seeded_and_greedy_is_temperature_zero(tmp_path):
    make_adapter(tmp_path / "a")
    engine = engine_for("tiny-llama", tmp_path)
    sample = lambda seed: engine.generate(PROMPTS[0], "a", SamplingParams(max_tokens=12, temperature=1.0, seed=seed, ignore_eos=True)).output  # noqa: E731
    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    top1 = engine.generate(PROMPTS[0], "a", SamplingParams(max_tokens=12, temperature=0.7, top_k=1, seed=5, ignore_eos=True))
    assert top1.output == engine.generate(PROMPTS[0], "a", greedy(12)).output
    engine.stop()


def test_stop_strings_and_max_tokens(tmp_path):
    model, tok = load_model("tiny-llama")
    text_ids = tok("quick brown")["input_ids"][1:]  # no letter twice
    # a model that always continues the text above: next token = the id after the last one seen
    table = {a: b for a, b in zip(text_ids, text_ids[1:])}

    class Echo(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, **kw):
            out = self.inner(input_ids=input_ids, **kw)
            nxt = torch.tensor([table.get(int(t), text_ids[0]) for t in input_ids[:, -1]])
            out.logits[:, -1] = torch.nn.functional.one_hot(nxt, out.logits.shape[-1]).float() * 100
            return out

    echo = Echo()
    echo.config, echo.generation_config = model.config, model.generation_config
    engine = Engine(echo, tok, EngineConfig(max_batch=2, max_len=64))
    seen = []
    req = engine.submit(Request([1, text_ids[0]], None, SamplingParams(max_tokens=30, temperature=0, stop=["k br"]),
                                on_update=lambda r, delta: seen.append(delta)))
    engine.drain([req])
    assert req.finish_reason == "stop" and req.text == "uic" and "".join(seen) == req.text
    req = engine.generate([1, text_ids[0]], None, SamplingParams(max_tokens=4, temperature=0, stop=["zzz"]))
    assert req.finish_reason == "length" and req.text == "uick" and len(req.output) == 4
    engine.stop()


def test_cancelled_request_frees_its_slot_and_others_finish(tmp_path):
    make_adapter(tmp_path / "a")
    engine = engine_for("tiny-llama", tmp_path, max_batch=2, prefetch=False)  # loads inline: deterministic steps
    long = engine.submit(Request(PROMPTS[0], "a", greedy(40)))
    short = engine.submit(Request(PROMPTS[1], "a", greedy(5)))
    waiting = engine.submit(Request(PROMPTS[2], None, greedy(5)))
    engine.step()
    engine.step()
    assert len(engine.running) == 2
    engine.cancel(long)
    engine.drain([long, short, waiting])
    assert long.finish_reason == "cancelled" and len(long.output) < 40
    assert short.finish_reason == waiting.finish_reason == "length"
    assert not engine.running and engine.pool.refs[engine.store.entry("a").aid] == 0
    engine.stop()


def test_refusals_unknown_adapter_prompt_too_long_queue_full(tmp_path):
    make_adapter(tmp_path / "a")
    engine = engine_for("tiny-llama", tmp_path, max_queue=2, max_prompt_tokens=10, max_tokens=20)
    with pytest.raises(UnknownAdapter, match="'nope' does not exist; known: a"):
        engine.submit(Request(PROMPTS[0], "nope"))
    with pytest.raises(EngineError, match="at most 10"):
        engine.submit(Request(list(range(1, 12)), "a"))
    with pytest.raises(EngineError, match="max_tokens=21 exceeds"):
        engine.submit(Request(PROMPTS[0], "a", greedy(21)))
    engine.submit(Request(PROMPTS[0], "a"))
    engine.submit(Request(PROMPTS[1], "a"))
    with pytest.raises(QueueFull):
        engine.submit(Request(PROMPTS[2], "a"))
    engine.stop()


@pytest.mark.parametrize("prefetch", [True, False])
def test_broken_adapters_fail_alone(tmp_path, prefetch):
    make_adapter(tmp_path / "good")
    make_adapter(tmp_path / "other-model", "tiny-gpt2")  # module paths that tiny-llama does not have
    make_adapter(tmp_path / "wide", targets=["q_proj"])
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "adapter_config.json").write_text((tmp_path / "good" / "adapter_config.json").read_text())
    (tmp_path / "corrupt" / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    engine = engine_for("tiny-llama", tmp_path, prefetch=prefetch)
    reqs = [engine.submit(Request(PROMPTS[i], n, greedy(4))) for i, n in enumerate(["corrupt", "good", "other-model", "good"])]
    engine.drain(reqs)
    assert reqs[0].finish_reason == "error" and "adapter 'corrupt' cannot be loaded" in reqs[0].error
    assert "safetensors" in reqs[0].error
    assert reqs[2].finish_reason == "error" and "not a linear layer of the base model" in reqs[2].error
    assert reqs[1].finish_reason == reqs[3].finish_reason == "length"
    assert engine.generate(PROMPTS[0], "wide", greedy(3)).finish_reason == "length"
    engine.stop()


def test_reloading_a_name_serves_the_new_files(tmp_path):
    make_adapter(tmp_path / "v1" / "a", seed=1)
    make_adapter(tmp_path / "v2" / "a", seed=2)
    engine = engine_for("tiny-llama", tmp_path / "v1")
    first = engine.generate(PROMPTS[0], "a", greedy(6)).output
    engine.store.register("a", tmp_path / "v2" / "a")
    second = engine.generate(PROMPTS[0], "a", greedy(6)).output
    assert first == peft_greedy("tiny-llama", tmp_path / "v1" / "a", PROMPTS[0], 6)
    assert second == peft_greedy("tiny-llama", tmp_path / "v2" / "a", PROMPTS[0], 6)
    engine.stop()


def test_engine_thread_serves_concurrent_submissions(tmp_path):
    for i in range(4):
        make_adapter(tmp_path / f"a{i}", r=4 * (i + 1), seed=i)
    engine = engine_for("tiny-llama", tmp_path, max_batch=4).start()
    reqs = [engine.submit(Request(PROMPTS[i % 7], f"a{i % 4}", greedy(5))) for i in range(12)]
    engine.drain(reqs)
    assert all(r.finish_reason == "length" for r in reqs)
    same = [r.output for r in reqs if r.adapter == "a1" and r.prompt == PROMPTS[1]]
    assert same and same[0] == peft_greedy("tiny-llama", tmp_path / "a1", PROMPTS[1], 5)
    engine.stop()
