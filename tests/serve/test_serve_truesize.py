"""True-size serving (serve/truesize.py): NOLA, LoRA-XS and Block-LoRA equal their `to_lora()` export served
beside them, with pool slots of their own size; RandLoRA and SHiRA (no LoRA export) equal their own forward."""

import pytest
import torch

import lorakit
from lorakit.serve import Engine, EngineConfig, Request, SamplingParams
from lorakit.serve.truesize import TrueSizeClass

from serve_helpers import load_model

TARGETS = ["q_proj", "v_proj", "down_proj"]
SETTINGS = {"nola": dict(r=4, num_basis_A=16, num_basis_B=16), "lora_xs": dict(r=4), "block_lora": dict(r=4, block_num=4),
            "randlora": dict(r=8), "shira": dict(r=2)}
PROMPTS = [[1, 5, 6, 7, 8], [1, 20, 21], [1, 30, 31, 32, 33, 34, 35], [1, 40, 41, 42]]


def make(path, method, seed, export=True):
    """A lorakit adapter of ``method`` with random trainable tensors; with ``export`` also its LoRA export."""
    base, _ = load_model("tiny-llama")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = lorakit.apply(base, lorakit.METHODS.get(method).config_class(target_modules=TARGETS, **SETTINGS[method]))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.3)
    lorakit.save_peft(model, path)
    if export:
        lorakit.save_state(lorakit.load_state(path).to_lora(), f"{path}-lora")
    return model


def engine_for(tmp_path, names, **config):
    model, tok = load_model("tiny-llama")
    engine = Engine(model, tok, EngineConfig(**{"max_batch": 3, "max_len": 64, "prefetch": False, **config}))
    for name in names:
        engine.add_adapter(name, tmp_path / name)
    return engine


def greedy(n=6):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("method", ["nola", "lora_xs", "block_lora"])
def test_true_size_serves_what_the_lora_export_serves(tmp_path, method):
    for i in range(2):
        make(tmp_path / f"{method}{i}", method, seed=i)
    names = [f"{method}0", f"{method}1", f"{method}0-lora", f"{method}1-lora"]
    engine = engine_for(tmp_path, names, max_batch=4)
    order = [names[0], names[2], names[1], names[3], names[1], names[0], names[3], names[2]]
    # lengths differ by prompt, so an adapter's request ends while another of its class runs on (slots move)
    reqs = engine.drain([engine.submit(Request(PROMPTS[i % 4], n, greedy(3 + 2 * (i % 4)))) for i, n in enumerate(order)])
    by = {}
    for i, (n, r) in enumerate(zip(order, reqs)):
        assert r.finish_reason == "length", r.error
        by.setdefault((n.removesuffix("-lora"), i % 4), set()).add(tuple(r.output))
    assert all(len(outs) == 1 for outs in by.values())  # each adapter and its export: the same tokens
    assert len({next(iter(v)) for (n, p), v in by.items() if p == 0}) == 2  # the two adapters differ
    # the same logits, to the bit: the expansion computes the export's tables
    aids = [engine.store.entry(n).aid for n in names]
    for aid in aids:
        engine.pool.activate(engine.store.load(aid))
        engine.pool.acquire(aid)
    got = engine.runner.prefill([PROMPTS[0]] * 4, 0, aids)
    assert torch.equal(got[0], got[2]) and torch.equal(got[1], got[3]) and not torch.equal(got[0], got[1])
    # pool slots at the adapter's own size: the file's tensors (shared frozen ones stored once per class)
    state = lorakit.load_state(tmp_path / names[0])
    shared = {"lora_xs": ("lora_A.weight", "lora_B.weight")}.get(method, ())
    own = sum(-(-t.nbytes // 8) * 8 for d in state.tensors.values() for k, t in d.items() if k not in shared)
    cls_true, _ = engine.pool.slot_of(aids[0])
    cls_lora, _ = engine.pool.slot_of(aids[2])
    assert isinstance(cls_true, TrueSizeClass) and cls_true.slot_bytes == own < cls_lora.slot_bytes
    assert engine.pool.slot_of(aids[1])[0] is cls_true  # same shapes and shared tensors: one class
    engine.stop()


@pytest.mark.parametrize("method", ["randlora", "shira"])
def test_methods_without_a_lora_export_serve_their_own_forward(tmp_path, method):
    model = make(tmp_path / method, method, seed=3, export=False)
    engine = engine_for(tmp_path, [method])
    reqs = engine.drain([engine.submit(Request(p, method if i != 1 else None, greedy())) for i, p in enumerate(PROMPTS)])
    with torch.inference_mode():
        for i, (p, r) in enumerate(zip(PROMPTS, reqs)):
            with lorakit.disabled(model) if i == 1 else torch.enable_grad():
                ref = model.generate(input_ids=torch.tensor([p]), max_new_tokens=6, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
            assert r.output == ref, (i, p)
        aid = engine.store.entry(method).aid
        engine.pool.activate(engine.store.load(aid))
        engine.pool.acquire(aid)
        got = engine.runner.prefill([PROMPTS[2]], 0, [aid])[0]
        torch.testing.assert_close(got, model(torch.tensor([PROMPTS[2]])).logits[0, -1], atol=1e-4, rtol=1e-4)
    state = lorakit.load_state(tmp_path / method)
    own = sum(-(-t.nbytes // 8) * 8 for d in state.tensors.values() for t in d.values())
    assert engine.pool.slot_of(aid)[0].slot_bytes == own
    engine.stop()


def test_lora_form_store_still_refuses_what_is_not_low_rank(tmp_path):
    from lorakit.serve.store import AdapterFitError, AdapterStore, linear_shapes

    make(tmp_path / "randlora", "randlora", seed=0, export=False)
    store = AdapterStore(linear_shapes(load_model("tiny-llama")[0]), prefetch=False, true_size=False)
    store.register("r", tmp_path / "randlora")
    with pytest.raises(AdapterFitError, match="randlora.*does not declare 'servable'"):
        store.load(store.entry("r").aid)
    store.close()

