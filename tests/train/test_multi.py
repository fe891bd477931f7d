"""Multi-job training: each job equals its solo `fit` run, joins and leaves freely, fails alone, resumes alone."""
import pytest
import torch

from lorakit import load_peft
from lorakit.serve import ops
from lorakit.train import TrainConfig, fit
from lorakit.train.multi import Job, JobError, MultiTrainer, check_job, train_many
from lorakit.train.multi_kernel import job_segment_lora
from lorakit.train.multi_lora import batched_lora
from lorakit.train.multi_pack import pack

from multi_models import base, causal_data, cls_data, job, max_diff, solo, trained

TOL = 2e-5  # fp32: only the order of floating-point sums differs from the solo run


def _tables(sizes, din, dout):
    return {f"r{r}": (torch.randn(k, din, r, dtype=torch.float64, requires_grad=True),
                      torch.randn(k, r, dout, dtype=torch.float64, requires_grad=True)) for r, k in sizes}


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("counts", [(5, 5, 4, 12, 15), (120, 1, 1, 2, 3)])  # even: bmm backend; skewed: grouped
def test_batched_lora_backward_gradcheck(fused, counts):
    torch.manual_seed(0)
    din, dout = 6, 5
    # class r2 has slots 0, 1, 2; class r3 has slots 0, 1; three padding tokens take no adapter
    cls = torch.tensor([0] * counts[0] + [1] * counts[3] + [-1] * 3 + [0] * counts[1] + [1] * counts[4] + [0] * counts[2])
    slot = torch.tensor([0] * counts[0] + [0] * counts[3] + [0] * 3 + [1] * counts[1] + [1] * counts[4] + [2] * counts[2])
    plan = ops.plan_step(cls, slot, ["r2", "r3"])
    assert ops.bmm_suits(plan.classes[0]) == (counts[0] < 100)
    tables = _tables([(2, 3), (3, 2)], din, dout)
    x = torch.randn(len(cls), din, dtype=torch.float64, requires_grad=True)
    y = torch.randn(len(cls), dout, dtype=torch.float64, requires_grad=counts[0] < 100)
    flat = [t for pair in tables.values() for t in pair]

    def f(y, x, a2, b2, a3, b3):
        return batched_lora(y.clone(), x, plan, {"r2": (a2, b2), "r3": (a3, b3)}, fused)

    assert torch.autograd.gradcheck(f, (y, x, *flat))
    # and the forward is the token-by-token reference
    per_token = [None if c < 0 else (tables[f"r{2 + c}"][0][s].T, tables[f"r{2 + c}"][1][s].T, 1.0)
                 for c, s in zip(cls.tolist(), slot.tolist())]
    want = y + ops.reference_delta(x, per_token)
    assert torch.allclose(f(y, x, *flat), want)


@pytest.mark.parametrize("backend", ["segments", "bmm", "auto"])
def test_batched_lora_backward_gradcheck_one_class_in_order(backend):
    """The trainer's case: one class covers every token, already in slot order (the in-place dx path)."""
    torch.manual_seed(1)
    counts = [7, 1, 4]
    slot = torch.repeat_interleave(torch.arange(3), torch.tensor(counts))
    plan = ops.plan_step(torch.zeros(len(slot), dtype=torch.long), slot, ["c"])
    assert plan.classes[0].index is None
    (a, b), = _tables([(4, 3)], 6, 5).values()
    x = torch.randn(len(slot), 6, dtype=torch.float64, requires_grad=True)
    y = torch.randn(len(slot), 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y, x, a, b: batched_lora(y.clone(), x, plan, {"c": (a, b)}, True, backend),
                                    (y, x, a, b))


@pytest.mark.parametrize("fused", [True, False])
def test_job_segment_kernel_gradcheck_and_reference(fused):
    """Jobs of ranks 2, 3, 1 with their own scales; tokens 9-11 belong to a job that does not adapt the module."""
    torch.manual_seed(2)
    din, dout, bounds, ranks = 6, 5, [(0, 4), (4, 9), (12, 15)], [2, 3, 1]
    layers = []
    for r, scale in zip(ranks, (0.5, 2.0, 1.0)):
        layer = torch.nn.Module()
        layer.lora_A = torch.nn.Linear(din, r, bias=False).double()
        layer.lora_B = torch.nn.Linear(r, dout, bias=False).double()
        layer.scaling = scale
        layers.append(layer)
    spans = [(a, b, layer) for (a, b), layer in zip(bounds, layers)]
    x = torch.randn(15, din, dtype=torch.float64, requires_grad=True)
    y = torch.randn(15, dout, dtype=torch.float64, requires_grad=True)
    weights = [w for layer in layers for w in (layer.lora_A.weight, layer.lora_B.weight)]
    assert torch.autograd.gradcheck(lambda y, x: job_segment_lora(y.clone(), x, spans, fused), (y, x))
    # every gradient (the weights' too) against autograd through the per-token reference
    per_token = [None] * 15
    for (a, b), layer in zip(bounds, layers):
        for t in range(a, b):
            per_token[t] = (layer.lora_A.weight, layer.lora_B.weight, layer.scaling)
    want = y + ops.reference_delta(x, per_token)
    got = job_segment_lora(y.clone(), x, spans, fused)
    assert torch.allclose(got, want)
    dy = torch.randn_like(want)
    g_want = torch.autograd.grad(want, [x, y, *weights], dy)
    g_got = torch.autograd.grad(got, [x, y, *weights], dy)
    for w, g in zip(g_want, g_got):
        assert torch.allclose(w, g)
    assert g_got[0][9:12].abs().max() == 0 and g_got[0][:9].abs().min() > 0


def test_pack_respects_the_token_budget_and_keeps_every_row():
    rows = [3, 9, 4, 4, 1, 7, 30, 2, 2, 8]
    bins = pack(list(range(len(rows))), 16, length=lambda i: rows[i])
    assert sorted(i for b in bins for i in b) == list(range(len(rows)))
    for b in bins:
        assert len(b) * max(rows[i] for i in b) <= 16 or len(b) == 1
    assert [6] in bins  # longer than the budget: a micro-batch of its own
    assert len(bins) <= 6  # not one row each: the overhead per micro-batch counts


@pytest.mark.parametrize("seed", range(6))
def test_pack_is_the_cheapest_of_all_packings(seed):
    """Against every set partition of up to 7 rows: no packing within the budget costs less (padded tokens plus the
    overhead per micro-batch), so cutting the sorted order into runs loses nothing."""
    import random

    rng = random.Random(seed)
    lens = [rng.randint(1, 12) for _ in range(7)]
    budget, overhead = 24, rng.choice([0, 5, 20])

    def cost(bins):
        return sum(len(b) * max(lens[i] for i in b) + overhead for b in bins)

    def partitions(items):
        if not items:
            yield []
            return
        first, rest = items[0], items[1:]
        for p in partitions(rest):
            yield [[first]] + p
            for k in range(len(p)):
                yield p[:k] + [[first] + p[k]] + p[k + 1:]

    fits = [p for p in partitions(list(range(7))) if all(len(b) * max(lens[i] for i in b) <= budget or len(b) == 1
                                                        for b in p)]
    got = pack(list(range(7)), budget, length=lambda i: lens[i], overhead=overhead)
    assert sorted(i for b in got for i in b) == list(range(7))
    assert all(len(b) * max(lens[i] for i in b) <= budget for b in got)
    assert cost(got) == min(cost(p) for p in fits)


def _three(kind):
    return [job("a", r=4, lr=5e-3, batch_size=4, steps=4, seed=0, kind=kind),
            job("b", r=8, lr=1e-2, batch_size=3, steps=3, seed=1, kind=kind),
            job("c", r=2, lr=2e-3, batch_size=5, steps=5, seed=2, kind=kind, grad_accum_steps=2)]


@pytest.mark.parametrize("kind", ["causal_lm", "classification"])
@pytest.mark.parametrize("fused,backend", [(True, "jobs"), (False, "jobs"), (True, "segments")])
def test_each_job_equals_its_solo_fit(kind, fused, backend):
    """Different ranks, lrs, batch sizes, seeds, data and accumulation; classification trains a head per job. Both
    kernels: the trainer's per-job segments and the serving operator with its backward."""
    model = base(kind)
    trainer = MultiTrainer(model, max_tokens=64, fused=fused, backend=backend)  # small budget: a job's rows span micro-batches
    jobs = _three(kind)
    for j in jobs:
        trainer.add(j)
    results = trainer.run()
    assert {n: r.status for n, r in results.items()} == {"a": "done", "b": "done", "c": "done"}
    assert {n: r.steps for n, r in results.items()} == {"a": 4, "b": 3, "c": 5}
    for j in jobs:
        ref = solo(model, j)
        got = trained(trainer, j.name)
        assert max_diff(got, ref) < TOL, j.name
        assert max_diff(got, {n: torch.zeros_like(t) for n, t in ref.items()}) > 1e-3  # it trained
    # the base stayed frozen and unhooked outside the trainer's rounds
    assert not any(p.requires_grad for p in model.parameters())


def test_jobs_join_and_leave_without_changing_the_others():
    model = base()
    a, b, c = job("a", steps=5, seed=0), job("b", r=8, steps=2, seed=1, batch_size=2), job("c", r=2, steps=3, seed=2)
    d = job("d", steps=5, seed=3, lr=2e-2)
    trainer = MultiTrainer(model, max_tokens=96)
    trainer.add(a)
    trainer.add(b)
    trainer.add(d)
    trainer.step()
    trainer.step()
    assert "b" in trainer.results and trainer.results["b"].status == "done"  # finished early, left
    trainer.add(c)  # joins after two rounds
    trainer.step()
    stopped = trainer.stop("d")  # taken out after three steps
    assert stopped.status == "stopped" and stopped.steps == 3
    results = trainer.run()
    assert {n: r.steps for n, r in results.items()} == {"a": 5, "b": 2, "c": 3, "d": 3}
    for j in (a, b, c):
        assert max_diff(trained(trainer, j.name), solo(model, j)) < TOL, j.name
    # d stopped after 3 of 5 steps: the first 3 steps of the 5-step schedule
    import dataclasses

    partial = dataclasses.replace(d.config, max_steps=5)
    ref = solo_steps(model, dataclasses.replace(d, config=partial), 3)
    assert max_diff(trained(trainer, "d"), ref) < TOL


def solo_steps(model, j, steps):
    """`fit` of job j stopped after ``steps`` optimiser steps (a callback raises)."""
    import copy

    from lorakit import apply

    alone = copy.deepcopy(model)
    torch.manual_seed(j.config.seed)
    apply(alone, j.adapter)

    class Enough(Exception):
        pass

    def cb(step, _):
        if step == steps:
            raise Enough

    with pytest.raises(Enough):
        fit(alone, j.train_data, config=j.config, callbacks=[cb])
    return {n: p.detach().clone() for n, p in alone.named_parameters() if p.requires_grad}


def test_a_nan_loss_stops_that_job_only():
    model = base()
    good, wild, other = job("good", steps=4, seed=0), job("wild", steps=4, seed=2), job("other", r=8, steps=4, seed=1)
    trainer = MultiTrainer(model, max_tokens=64)
    for j in (good, wild, other):
        trainer.add(j)
    trainer.step()
    with torch.no_grad():  # the job diverged: its adapter now gives nan
        next(iter(trainer.runs["wild"].adapters.lora.values())).lora_B.weight[0, 0] = float("nan")
    results = trainer.run()
    assert results["wild"].status == "failed" and results["wild"].steps == 1
    assert results["wild"].error == "job 'wild' stopped at step 2: loss is nan"
    assert results["good"].status == results["other"].status == "done"
    for j in (good, other):
        assert max_diff(trained(trainer, j.name), solo(model, j)) < TOL, j.name


def test_bad_data_stops_that_job_only():
    model = base("classification")
    data = cls_data(12, 5)
    data.features = [dict(f) for f in data.features]
    data.features[7]["labels"] = 9  # three labels
    bad = job("bad", kind="classification", data=data, batch_size=4, steps=3, seed=0)
    good = job("good", kind="classification", steps=3, seed=1)
    trainer = MultiTrainer(model, max_tokens=64)
    trainer.add(bad)
    trainer.add(good)
    results = trainer.run()
    assert results["bad"].status == "failed"
    assert "job 'bad'" in results["bad"].error and "training example 7" in results["bad"].error
    assert "label 9" in results["bad"].error
    assert results["good"].status == "done"
    assert max_diff(trained(trainer, "good"), solo(model, good)) < TOL


def test_each_job_resumes_on_its_own(tmp_path):
    model = base()
    a = job("a", steps=6, seed=0, save_every=2, output_dir=str(tmp_path / "a"))
    b = job("b", r=8, steps=6, seed=1, batch_size=3)
    first = MultiTrainer(model, max_tokens=64)
    first.add(a)
    first.add(b)
    for _ in range(5):  # a checkpoints at steps 2 and 4 (the end of its first epoch); the "crash" comes after step 5
        first.step()
    assert sorted(p.name for p in (tmp_path / "a").glob("checkpoint-*.pt")) == ["checkpoint-00000002.pt",
                                                                              "checkpoint-00000004.pt"]
    import dataclasses

    resumed = dataclasses.replace(a, config=dataclasses.replace(a.config, resume=True))
    second = MultiTrainer(model, max_tokens=64)
    second.add(resumed)  # resumes alone (b is not there); a third job runs beside it
    second.add(job("c", r=2, steps=2, seed=5))
    results = second.run()
    assert results["a"].steps == 6
    ref = solo(model, dataclasses.replace(a, config=dataclasses.replace(a.config, output_dir=None, save_every=None)))
    assert max_diff(trained(second, "a"), ref) < TOL
    # fit resumes a multi-job checkpoint too (the same file layout and names)
    import copy

    from lorakit import apply

    alone = copy.deepcopy(model)
    torch.manual_seed(7)  # the initial weights are overwritten by the checkpoint
    apply(alone, a.adapter)
    fit(alone, a.train_data, config=dataclasses.replace(a.config, resume=str(tmp_path / "a" / "checkpoint-00000002.pt"),
                                                          output_dir=str(tmp_path / "fit")))
    assert max_diff({n: p for n, p in alone.named_parameters() if p.requires_grad}, ref) < TOL


def test_saved_adapter_and_eval_match_solo(tmp_path):
    model = base("classification")
    j = job("a", kind="classification", steps=3, seed=0)
    j.eval_data = cls_data(10, 9)
    trainer = MultiTrainer(model)
    trainer.add(j)
    trainer.add(job("b", kind="classification", r=8, steps=2, seed=1))
    results = trainer.run()
    trainer.save("a", tmp_path / "adapter")
    assert (tmp_path / "adapter" / "lorakit_base.json").is_file()
    import copy

    from lorakit import apply

    alone = copy.deepcopy(model)
    torch.manual_seed(0)
    apply(alone, j.adapter)
    ref = fit(alone, j.train_data, j.eval_data, config=j.config)
    assert results["a"].eval_metrics["accuracy"] == ref.eval_metrics["accuracy"]
    assert abs(results["a"].eval_metrics["loss"] - ref.eval_metrics["loss"]) < 1e-5
    loaded = load_peft(copy.deepcopy(model), tmp_path / "adapter")
    x = torch.tensor([j.train_data[0]["input_ids"]])
    assert torch.allclose(loaded(input_ids=x).logits, alone(input_ids=x).logits, atol=1e-5)


@pytest.mark.parametrize("change, field", [
    (dict(lora_dropout=0.1), "dropout"), (dict(init_lora_weights="pissa"), "init_lora_weights"),
    (dict(bias="all"), "bias"),
])
def test_jobs_that_cannot_run_are_refused_naming_job_and_field(change, field):
    import dataclasses

    j = job("x")
    bad = dataclasses.replace(j, adapter=dataclasses.replace(j.adapter, **change))
    with pytest.raises(JobError, match=f"job 'x': field '{field}'"):
        check_job(bad)
    with pytest.raises(JobError, match="field 'optimizer'"):
        check_job(dataclasses.replace(j, config=dataclasses.replace(j.config, optimizer="lora_plus")))
    trainer = MultiTrainer(base())
    trainer.add(j)
    with pytest.raises(JobError, match="job 'x': field 'name'"):
        trainer.add(job("x"))
    with pytest.raises(JobError, match="job 'e': field 'train_data'"):
        trainer.add(job("e", data=causal_data(0, 0)))


def test_a_base_that_trains_with_dropout_is_refused_unless_turned_off():
    model = base()
    model.model.layers[1].self_attn.attention_dropout = 0.1
    model.model.layers[0].mlp.add_module("drop", torch.nn.Dropout(0.2))
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.drop.p=0.2 and 1 more.*disable_dropout=True"):
        MultiTrainer(model)
    MultiTrainer(model, disable_dropout=True)
    assert model.model.layers[1].self_attn.attention_dropout == 0.0 and model.model.layers[0].mlp.drop.p == 0.0
