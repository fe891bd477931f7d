"""The early-exit cascade over adapters: the exit rule (and mutants of it), shared-prefix equality with full member
runs, which blocks count as shared, stage counts, and the spec file."""

import dataclasses

import pytest
import torch

import lorakit
from lorakit import AdapterState, LoRAConfig, zoo
from lorakit.serve.cascade import AdapterCascade, shared_blocks, write_spec
from lorakit.serve.selective import Window, msp

TEXTS = ["hello world", "bad day", "ok fine then", "x", "what a lovely morning", "nope", "meh.", "great!!", "so so",
         "terrible service", "fine", "I love it", "why", "the end", "abc", "zzz"]


def member(seed: int, layers=(1,), targets=("query", "value"), r=4, head_noise=2.0, model="tiny-bert"):
    """A random LoRA member with its own (perturbed) head, as an AdapterState."""
    m, _ = zoo.load(model, "seq_cls", num_labels=3)
    torch.manual_seed(seed)
    lorakit.apply(m, LoRAConfig(r=r, lora_alpha=8, target_modules=list(targets), layers_to_transform=list(layers),
                                init_lora_weights=False, task_type="SEQ_CLS"))
    state = AdapterState.from_model(m)
    head = state.modules_to_save["classifier"]
    head["weight"] = head["weight"] + head_noise * torch.randn_like(head["weight"])
    return state


@pytest.fixture(scope="module")
def setup():
    base, tok = zoo.load("tiny-bert", "seq_cls", num_labels=3)
    cascade = AdapterCascade(base, [member(s) for s in range(3)], tokenizer=tok)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    return cascade, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def full_probs(cascade, batch):
    """Every member run alone, in full, on the whole batch (no shared prefix)."""
    with torch.no_grad():
        return torch.stack([m(**batch).logits.to(torch.float64).softmax(-1) for m in cascade.models])


def check_rule(cascade, batch, out):
    """Outside the window the first member answers; inside, the average of all members."""
    ref = full_probs(cascade, batch)
    inside = cascade.window.inside(msp(ref[0]))
    torch.testing.assert_close(out.probs[~inside], ref[0][~inside], rtol=0, atol=1e-6)
    torch.testing.assert_close(out.probs[inside], ref.mean(0)[inside], rtol=0, atol=1e-6)
    torch.testing.assert_close(out.confidence, msp(out.probs))
    assert out.stages.tolist() == [2 if i else 1 for i in inside.tolist()]
    assert out.members.tolist() == [len(cascade) if i else 1 for i in inside.tolist()]


def test_first_member_answers_outside_window_average_inside(setup):
    cascade, batch = setup
    conf = msp(full_probs(cascade, batch)[0])
    lo, hi = conf.quantile(torch.tensor([0.3, 0.7], dtype=torch.float64)).tolist()
    cascade.window = Window(tau=(lo + hi) / 2, low=lo, high=hi)
    out = cascade(batch)
    inside = cascade.window.inside(conf)
    assert 0 < int(inside.sum()) < len(TEXTS)  # both branches are exercised
    check_rule(cascade, batch, out)
    ref = full_probs(cascade, batch)
    for mutant in (ref.mean(0), ref[0]):  # always averages / never averages
        bad = dataclasses.replace(out, probs=mutant, confidence=msp(mutant))
        with pytest.raises(AssertionError):
            check_rule(cascade, batch, bad)


def test_stage_counts_at_the_extremes(setup):
    cascade, batch = setup
    cascade.window = Window(tau=0.5, low=0.0, high=1.0)  # everything inside
    out = cascade(batch)
    assert out.stages.tolist() == [2] * len(TEXTS) and out.members.tolist() == [3] * len(TEXTS)
    check_rule(cascade, batch, out)
    cascade.window = Window(tau=2.0, low=2.0, high=3.0)  # nothing inside
    out = cascade(batch)
    assert out.stages.tolist() == [1] * len(TEXTS) and out.members.tolist() == [1] * len(TEXTS)
    check_rule(cascade, batch, out)


def test_shared_prefix_equals_full_members_and_runs_once(setup):
    cascade, batch = setup
    assert cascade.shared == 1  # members adapt block 1 only
    calls = []
    hooks = [m.bert.encoder.layer[0].register_forward_hook(lambda *a: calls.append(1)) for m in cascade.models]
    try:
        shared = cascade.member_probs(batch)
    finally:
        for h in hooks:
            h.remove()
    assert len(calls) == 1  # block 0 ran for member 0 only
    torch.testing.assert_close(shared, full_probs(cascade, batch), rtol=0, atol=1e-6)
    cascade.window = Window(tau=0.5, low=0.0, high=1.0)
    sub = {k: v[3:9] for k, v in batch.items()}  # stage 2 on a row subset reuses the rows' prefix
    torch.testing.assert_close(cascade(sub).probs, full_probs(cascade, sub).mean(0), rtol=0, atol=1e-6)


def test_which_blocks_count_as_shared():
    base, _ = zoo.load("tiny-bert", "seq_cls", num_labels=3)
    a, b = member(0, layers=(0, 1)), member(1, layers=(0, 1))
    assert shared_blocks(base, [a, b]) == 0  # they differ in block 0
    low = {p: t for p, t in a.tensors.items() if ".layer.0." in p}
    b_same_low = AdapterState(b.config, {**b.tensors, **low}, b.modules_to_save)
    assert shared_blocks(base, [a, b_same_low]) == 1  # identical block-0 adapters are shared
    scaled = dataclasses.replace(b.config, lora_alpha=16)
    assert shared_blocks(base, [a, AdapterState(scaled, {**b.tensors, **low}, b.modules_to_save)]) == 0
    c = member(2, layers=(1,))
    assert shared_blocks(base, [a, c]) == 0  # one adapts block 0, the other does not
    assert shared_blocks(base, [member(3, layers=(1,)), c]) == 1
    heads_only = [AdapterState(c.config, {}, c.modules_to_save), AdapterState(c.config, {}, member(4).modules_to_save)]
    assert shared_blocks(base, heads_only) == 2  # only the heads differ: every block is shared
    emb = member(5, targets=("word_embeddings",), layers=())
    assert shared_blocks(base, [emb, c]) == 0


def test_embedding_member_is_exact_without_sharing():
    base, tok = zoo.load("tiny-bert", "seq_cls", num_labels=3)
    m, _ = zoo.load("tiny-bert", "seq_cls", num_labels=3)
    lorakit.apply(m, LoRAConfig(r=2, target_modules=["word_embeddings", "query"], init_lora_weights=False,
                                task_type="SEQ_CLS"))
    cascade = AdapterCascade(base, [AdapterState.from_model(m), member(1)])
    enc = tok(TEXTS[:5], padding=True, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    assert cascade.shared == 0
    torch.testing.assert_close(cascade.member_probs(batch), full_probs(cascade, batch), rtol=0, atol=1e-6)


def test_members_of_other_methods_and_ranks():
    base, tok = zoo.load("tiny-bert", "seq_cls", num_labels=3)
    m, _ = zoo.load("tiny-bert", "seq_cls", num_labels=3)
    torch.manual_seed(7)
    lorakit.apply(m, lorakit.DoRAConfig(r=2, target_modules=["value"], layers_to_transform=[1], init_lora_weights=False,
                                        task_type="SEQ_CLS"))
    cascade = AdapterCascade(base, [member(0, r=8), AdapterState.from_model(m), member(2, r=1, targets=("key",))])
    assert cascade.shared == 1
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    torch.testing.assert_close(cascade.member_probs(batch), full_probs(cascade, batch), rtol=0, atol=1e-6)


def test_refusals():
    base, _ = zoo.load("tiny-bert", "seq_cls", num_labels=3)
    with pytest.raises(ValueError, match="at least 2 members"):
        AdapterCascade(base, [member(0)])
    cascade = AdapterCascade(base, [member(0), member(1)])
    with pytest.raises(ValueError, match="calibrate"):
        cascade({"input_ids": torch.ones(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 3, dtype=torch.long)})
    with pytest.raises(ValueError, match="tokenizer"):
        cascade.classify(["hi"])


def test_spec_round_trip_and_classify(tmp_path):
    base, _ = zoo.load("tiny-bert", "seq_cls", num_labels=3)
    dirs = []
    for s in range(2):
        m, _ = zoo.load("tiny-bert", "seq_cls", num_labels=3)
        member(s).load_into(m)
        dirs.append(lorakit.save_peft(m, tmp_path / f"member{s}"))
    spec = write_spec(tmp_path / "cascade.json", "tiny-bert", dirs, Window(tau=0.4, low=0.0, high=1.0),
                      label_names=["neg", "neu", "pos"])
    cascade = AdapterCascade.from_spec(spec)
    answers = cascade.classify(["good", "bad"])
    assert [a["stages"] for a in answers] == [2, 2] and answers[0]["label"] in ("neg", "neu", "pos")
    assert abs(sum(answers[0]["probabilities"].values()) - 1) < 1e-9
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(ValueError, match="not a cascade spec"):
        AdapterCascade.from_spec(tmp_path / "broken.json")
