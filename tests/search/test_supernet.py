"""The super-adapter: exported members equal the supernet's members (and share their common blocks in the cascade),
the hidden-state cache, one-shot training, and the ``search-ensemble`` command."""
import pytest
import torch

from lorakit import zoo
from lorakit.cli import main
from lorakit.search import Ensemble, Member
from lorakit.search.run import SearchConfig, encode_fixed, space_for, with_prefix
from lorakit.search.supernet import Evaluator, SuperAdapter
from lorakit.serve.cascade import AdapterCascade

TEXTS = ["good", "bad", "fine day", "awful!", "so so", "love it", "hate it", "meh", "yes", "no no no"]


def supernet(layers=2, members=3):
    model, tok = zoo.load("tiny-bert", "seq_cls", num_labels=3)
    config = SearchConfig(members=members, layers=layers, targets=("query", "value", "intermediate.dense"),
                          ranks=(1, 2, 4))
    space = space_for(model, config)
    sup = SuperAdapter(model, space, r_max=4, alpha=8, seed=0)
    with torch.no_grad():
        for p in sup.trainable():
            p.add_(0.3 * torch.randn_like(p))  # B starts at zero: give every path something to say
    data = encode_fixed([{"text": t, "label": i % 3} for i, t in enumerate(TEXTS)], tok, 16)
    return sup, with_prefix(sup, data), tok


def test_space_reads_the_models_sizes_and_refuses_unknown_targets():
    model, _ = zoo.load("tiny-bert", "seq_cls", num_labels=3)
    space = space_for(model, SearchConfig(layers=2, targets=("query", "intermediate.dense")))
    assert dict(space.sizes) == {"query": 128, "intermediate.dense": 64 + 128} and space.head == 64 * 3 + 3
    with pytest.raises(ValueError, match="expected one linear module per block ending in 'dense'"):
        space_for(model, SearchConfig(targets=("dense",)))  # three of them in a BERT block
    with pytest.raises(ValueError, match="--layers 3"):
        space_for(model, SearchConfig(layers=3))


@pytest.mark.parametrize("split", [0, 1, 2])
def test_exported_members_equal_the_supernet_and_share_their_common_blocks(split):
    sup, data, tok = supernet()
    e = sup.space.canonical(Ensemble(split, (Member(2, ("query", "intermediate.dense")), Member(4, ("value",)), Member(1, ("query",)))))
    val = Evaluator(sup, data, batch_size=4)
    expected = val.ensemble(e)
    base, _ = zoo.load("tiny-bert", "seq_cls", num_labels=3)
    states = [sup.export(e, k, "tiny-bert") for k in range(3)]
    params = sum(s.num_parameters() for s in states)
    shared_per_member = split * sup.space.per_block(e.members[0])
    assert params - 2 * shared_per_member == sup.space.params(e)  # the files repeat the shared blocks only
    cascade = AdapterCascade(base, states)
    assert cascade.shared == split  # identical low blocks are computed once
    batch = {k: data[k] for k in ("input_ids", "attention_mask")}
    torch.testing.assert_close(cascade.member_probs(batch), expected, rtol=0, atol=1e-5)


def test_hidden_states_below_a_shared_block_are_computed_once():
    sup, data, _ = supernet()
    calls = []
    hook = sup.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    val = Evaluator(sup, data, batch_size=5)
    a = Ensemble(1, (Member(2, ("query",)), Member(4, ("value",)), Member(1, ("intermediate.dense",))))
    val.ensemble(a)
    assert len(calls) == 2  # split 1: block 0 runs member 0's adapter for all three, once per batch (2 batches)
    calls.clear()
    b = Ensemble(1, (Member(2, ("query",)), Member(1, ("query",)), Member(4, ("intermediate.dense", "value"))))
    val.ensemble(b)
    assert calls == []  # the same block-0 chain: not run again
    c = Ensemble(0, (Member(2, ("query",)), Member(1, ("query",)), Member(4, ("value",))))
    val.ensemble(c)
    hook.remove()
    assert len(calls) == 2 * 2  # split 0: members 1 and 2 run their own block 0; member 0's was seen


def test_one_shot_training_lowers_the_loss():
    model, tok = zoo.load("tiny-bert", "seq_cls", num_labels=3)
    space = space_for(model, SearchConfig(members=2, layers=1, targets=("query", "value"), ranks=(1, 2, 4)))
    sup = SuperAdapter(model, space, r_max=4, alpha=8, seed=0)
    examples = [{"text": ch * 4 + " " + ch * 4, "label": i} for i, ch in enumerate("abc")] * 4
    data = with_prefix(sup, encode_fixed(examples, tok, 16))
    losses = sup.train(data, steps=60, batch_size=12, lr=1e-2, seed=0)
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
    assert sup.model.training is False


def test_cli_refuses_small_budgets_before_training(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["search-ensemble", "--model", "tiny-bert", "--max-train", "8", "--max-eval", "8", "--budget", "50",
                 "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--budget 50 parameters is too small" in err
    assert "smallest 3-member ensemble 841" in err and not out.exists()
    assert main(["search-ensemble", "--model", "tiny-bert", "--budget", "5000", "--targets", "nope", "-o", str(out)]) == 2
    assert "--targets nope" in capsys.readouterr().err


def test_cli_writes_members_and_a_calibrated_cascade(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["search-ensemble", "--model", "tiny-bert", "--max-train", "48", "--max-eval", "40", "--budget", "5000",
                 "--steps", "4", "--evaluations", "6", "--shrink-samples", "3", "--members", "2", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["cascade.json", "member0", "member1", "search.json"]
    cascade = AdapterCascade.from_spec(out / "cascade.json")
    assert cascade.window is not None and cascade.label_names == ["negative", "neutral", "positive"]
    answers = cascade.classify(TEXTS)
    assert {a["stages"] for a in answers} <= {1, 2} and all(a["member_forwards"] in (1, 2) for a in answers)
    assert main(["search-ensemble", "--model", "tiny-bert", "--budget", "5000", "-o", str(out)]) == 2  # no overwrite


def test_exported_member_loads_in_peft_with_the_same_outputs(tmp_path):
    import peft

    from lorakit.core import fingerprint
    from lorakit.formats.peft import save_state

    sup, data, _ = supernet()
    e = Ensemble(1, (Member(2, ("query", "value")), Member(4, ("value",)), Member(1, ("query",))))
    expected = Evaluator(sup, data, batch_size=5).ensemble(e)
    base, _ = zoo.load("tiny-bert", "seq_cls", num_labels=3)
    for k in range(3):
        path = save_state(sup.export(e, k, "tiny-bert"), tmp_path / f"m{k}", base=fingerprint.record(base))
        model = peft.PeftModel.from_pretrained(zoo.load("tiny-bert", "seq_cls", num_labels=3)[0], str(path)).eval()
        with torch.no_grad():
            probs = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits.double().softmax(-1)
        torch.testing.assert_close(probs, expected[k], rtol=0, atol=1e-5)
