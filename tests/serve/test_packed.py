"""Packed steps (decode tokens and unpadded prompts in one forward, attention over each request's own slot): used
only where they reproduce the padded path, and then with the same tokens, logits and prompt log-probabilities."""

import dataclasses

import pytest
from transformers import AttentionInterface

from lorakit.serve import Engine, EngineConfig, Request, SamplingParams
from lorakit.serve.kvcache import ATTENTION, PackedStep, slot_attention

from serve_helpers import load_model, make_adapter

PROMPTS = [[1, 5, 6, 7, 8, 9, 10], [1, 20, 21], [1, 30, 31, 32, 33], [1, 40, 41, 42, 43, 44, 45, 46, 47], [1, 50]]


def engine_for(name, root=None, **config):
    model, tok = load_model(name)
    engine = Engine(model, tok, EngineConfig(**{"max_batch": 3, "max_len": 64, "pool_bytes": 1 << 20, **config}))
    if root is not None:
        engine.store.scan(root)
    return engine


@pytest.mark.parametrize("name, packs", [("tiny-llama", True), ("byte-llama", True), ("tiny-gpt2", True), ("tiny-gemma", False)])
def test_packed_where_the_start_up_check_passes(name, packs):
    engine = engine_for(name)
    assert engine.runner.packed is packs  # Gemma 3's sliding windows: the padded path
    engine.stop()


def test_a_wrong_packed_attention_is_caught_at_start_up(monkeypatch):
    def off_by_a_little(*args, **kwargs):
        out, w = slot_attention(*args, **kwargs)
        return out * 1.001, w

    monkeypatch.setitem(AttentionInterface._global_mapping, ATTENTION, off_by_a_little)
    engine = engine_for("tiny-llama")
    assert not engine.runner.packed
    monkeypatch.setitem(AttentionInterface._global_mapping, ATTENTION, slot_attention)
    assert engine.runner._packs_exactly()  # the same check passes with the real attention
    engine.stop()


def test_packed_and_padded_serve_the_same_tokens_with_adapters_and_prompt_logprobs(tmp_path):
    for i, r in enumerate((4, 16)):
        make_adapter(tmp_path / f"a{i}", r=r, seed=i)
    outs = {}
    for packed in (True, False):
        engine = engine_for("tiny-llama", tmp_path)
        engine.runner.packed = packed
        names = ["a0", None, "a1", "a1", "a0"]
        params = [SamplingParams(max_tokens=5 + i, temperature=0, ignore_eos=True, logprobs=2, prompt_logprobs=1 if i % 2 else None)
                  for i in range(len(PROMPTS))]
        reqs = engine.drain([engine.submit(Request(p, a, sp)) for p, a, sp in zip(PROMPTS, names, params)])
        assert all(r.finish_reason == "length" for r in reqs), [r.error for r in reqs]
        assert engine.stats["prefill_steps"] > 1 and engine.stats["decode_steps"] > 1
        outs[packed] = reqs
        engine.stop()
    for a, b in zip(outs[True], outs[False]):
        assert a.output == b.output
        assert len(_values(a.logprobs)) >= 2 * len(a.output)  # chosen and likely tokens were recorded
        for x, y in zip(a.logprobs, b.logprobs):
            assert _values(x) == pytest.approx(_values(y), abs=1e-4)
        assert (a.prompt_logprobs is None) == (b.prompt_logprobs is None)
        if a.prompt_logprobs is not None:
            assert _values(a.prompt_logprobs) == pytest.approx(_values(b.prompt_logprobs), abs=1e-4)


def _values(record):
    """Every float in a (nested) log-probability record, in order."""
    if isinstance(record, float):
        return [record]
    if dataclasses.is_dataclass(record):
        return _values(dataclasses.astuple(record))
    if isinstance(record, dict):
        return [v for k in sorted(record, key=str) for v in _values(record[k])]
    if isinstance(record, (list, tuple)):
        return [v for x in record for v in _values(x)]
    return []


def test_packed_step_layout():
    step = PackedStep.build([4, 2], 2, [3, 1])
    assert step.positions.tolist() == [4, 2, 0, 1, 2, 0]
    assert step.pre_slot.tolist() == [0, 0, 0, 1] and step.pre_col.tolist() == [0, 1, 2, 0]
    assert step.dec_mask[:, 0, 0].tolist() == [[True] * 5, [True, True, True, False, False]]
    empty = PackedStep.build([], 0, [2])
    assert empty.dec_mask is None and empty.positions.tolist() == [0, 1]


def test_mixed_step_decodes_and_prefills_in_one_forward(tmp_path):
    make_adapter(tmp_path / "a")
    engine = engine_for("tiny-llama", tmp_path, max_batch=4, prefetch=False)  # the adapter loads in step 1
    calls = []
    step = engine.runner.step
    engine.runner.step = lambda *a, **k: calls.append((len(a[0]), len(a[3]))) or step(*a, **k)
    first = engine.submit(Request(PROMPTS[0], "a", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)))
    engine.step()
    second = engine.submit(Request(PROMPTS[1], None, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)))
    engine.drain([first, second])
    assert calls[:2] == [(0, 1), (1, 1)]  # the second prompt joined the first request's decode step
    alone = engine_for("tiny-llama", tmp_path)
    assert first.output == alone.generate(PROMPTS[0], "a", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)).output
    assert second.output == alone.generate(PROMPTS[1], None, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)).output
    engine.stop()
    alone.stop()
