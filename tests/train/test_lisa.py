"""LISA: non-block parameters always train, gamma blocks per period, the others' optimiser state dropped; exact resume."""
import pytest
import torch
from strategy_models import Crash, crash_at, data, llama4

from lorakit.train import TrainConfig, fit
from lorakit.train.schedules import LISA, create, trainer_callback

RUN = TrainConfig(lr=1e-3, batch_size=5, max_steps=6, warmup_steps=0, log_every=1, progress=False, seed=1)


def _changed_blocks(model, before):
    return {int(n.split(".")[2]) for n, p in model.named_parameters()
            if n.startswith("model.layers.") and not torch.equal(p, before[n])}


def test_more_sampled_layers_than_blocks_is_an_error_before_training():
    with pytest.raises(ValueError, match="gamma=5 sampled layers, but 'model.layers' has only 4 blocks"):
        fit(llama4(), data()[0], config=RUN, adapter_schedule=LISA(gamma=5))
    with pytest.raises(KeyError, match="unknown schedule 'lissa'.*Registered: lisa"):
        create("lissa")


def test_one_period_trains_only_its_blocks_and_always_the_rest():
    model, train = llama4(), data()[0]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    schedule = LISA(gamma=2, interval=3, seed=5)
    fit(model, train, config=RUN, max_steps=3, adapter_schedule=schedule)
    assert _changed_blocks(model, before) == set(schedule.draw(0))
    for name in ("model.embed_tokens.weight", "score.weight", "model.norm.weight"):
        assert not torch.equal(dict(model.named_parameters())[name], before[name]), name


def test_optimizer_state_scales_with_gamma_not_depth():
    model, train = llama4(), data()[0]
    schedule = LISA(gamma=1, interval=2, seed=3)
    seen = []

    def record(step, entry):
        opt = run_state["opt"]
        blocks = {n.split(".")[2] for n, p in model.named_parameters() if n.startswith("model.layers.") and p in opt.state}
        seen.append((step, blocks))

    run_state = {}
    orig = schedule.step_begin

    def spy(step, m, opt):
        run_state["opt"] = opt
        orig(step, m, opt)

    schedule.step_begin = spy
    fit(model, train, config=RUN, adapter_schedule=schedule, callbacks=[record])
    assert all(len(blocks) == 1 for _, blocks in seen)  # one block's AdamW state at a time
    assert len({b for _, blocks in seen for b in blocks}) > 1  # and the sampled block changes


def test_kill_and_resume_gives_the_same_model(tmp_path):
    train = data()[0]
    straight = llama4()
    fit(straight, train, config=RUN, adapter_schedule=LISA(gamma=2, interval=3), output_dir=str(tmp_path / "a"), save_every=2)
    broken = llama4()
    with pytest.raises(Crash):
        fit(broken, train, config=RUN, adapter_schedule=LISA(gamma=2, interval=3), output_dir=str(tmp_path / "b"), save_every=2,
            callbacks=[crash_at(5)])
    resumed = llama4()
    fit(resumed, train, config=RUN, adapter_schedule=LISA(gamma=2, interval=3), output_dir=str(tmp_path / "b"), save_every=2, resume=True)
    for (n, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), n


def test_runs_as_a_transformers_trainer_callback(tmp_path):
    from transformers import Trainer, TrainingArguments

    model, train = llama4(), data()[0]
    schedule = LISA(gamma=1, interval=10, seed=2)
    schedule.prepare(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=5, use_cpu=True,
                             report_to=[], save_strategy="no", disable_tqdm=True, learning_rate=1e-3)
    Trainer(model=model, args=args, train_dataset=train, data_collator=train.collate,
            callbacks=[trainer_callback(schedule)]).train()
    assert _changed_blocks(model, before) == set(schedule.draw(0))
    assert not torch.equal(model.score.weight, before["score.weight"])


def test_embeddings_false_freezes_only_the_input_embeddings():
    model, train = llama4(), data()[0]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit(model, train, config=RUN, max_steps=2, adapter_schedule=LISA(gamma=1, interval=5, embeddings=False))
    now = dict(model.named_parameters())
    assert torch.equal(now["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert not torch.equal(now["score.weight"], before["score.weight"])
    assert not torch.equal(now["model.norm.weight"], before["model.norm.weight"])


def test_embeddings_false_refuses_a_head_tied_to_the_embeddings():
    from transformers import LlamaConfig, LlamaForCausalLM

    tied = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True))
    with pytest.raises(ValueError, match="shares the input embedding matrix"):
        LISA(gamma=1, embeddings=False).prepare(tied)
