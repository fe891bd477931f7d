"""The benchmark's baselines serve the same tokens as the engine: PEFT's mixed-batch forward, merge-and-swap."""

import torch

from lorakit.serve import Engine, EngineConfig, Request, SamplingParams
from lorakit.serve.baselines import MergedRunner, MergeSwapEngine, PeftMixedRunner

from serve_helpers import load_model, make_adapter

PROMPTS = [[1, 5, 6, 7, 8, 9, 10], [1, 20, 21], [1, 30, 31, 32, 33], [1, 40, 41, 42, 43], [1, 50], [1, 60, 61]]
NAMES = ["a0", "a1", None, "a2", "a1", "a0"]


def serve(engine):
    reqs = [engine.submit(Request(p, a, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)))
            for p, a in zip(PROMPTS, NAMES)]
    return [r.output for r in engine.drain(reqs)]


def test_baselines_generate_what_the_engine_generates(tmp_path):
    from peft import PeftModel

    for i, r in enumerate([4, 8, 16]):
        make_adapter(tmp_path / f"a{i}", "tiny-gpt2", r=r, seed=i)  # Conv1D layers: the merge transposes right
    config = EngineConfig(max_batch=3, max_len=64)
    model, tok = load_model("tiny-gpt2")
    ours = Engine(model, tok, config)
    ours.store.scan(tmp_path)
    expected = serve(ours)

    base, _ = load_model("tiny-gpt2")
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "a0"), adapter_name="a0")
    for name in ("a1", "a2"):
        peft_model.load_adapter(str(tmp_path / name), adapter_name=name)
    mixed = Engine(peft_model, tok, config, store=ours.store, runner=PeftMixedRunner(peft_model, ours.store, 3, 64))
    assert serve(mixed) == expected

    model, _ = load_model("tiny-gpt2")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    runner = MergedRunner(model, ours.store, 3, 64)
    merged = MergeSwapEngine(model, tok, config, store=ours.store, runner=runner)
    assert serve(merged) == expected
    assert runner.stats["switches"] >= 4  # one adapter per batch
    runner._switch(None)
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())
