"""``target_modules="all-linear"`` adapts exactly the layers peft adapts, with and without ``task_type``.

peft's rule: every Linear/Conv1D of the model except, on a transformers model, its output embeddings (the LM
head) or, when it has none and the task is SEQ_CLS, its ``score``/``classifier`` module. So a classifier keeps
its head among the targets without SEQ_CLS (ViT image classification, BERT without a task type), a container
head keeps its inner layers without SEQ_CLS (RoBERTa), and a plain ``nn.Module`` keeps everything. Each case compares the wrapped
set and the saved ``target_modules`` with peft's on the same model.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

import lorakit

_BUILT: dict = {}


def _build(name: str) -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    bert = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    bart = dict(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32)
    builders = {
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                            num_hidden_layers=1, num_attention_heads=2)),
        "llama-seq-cls": lambda: tf.LlamaForSequenceClassification(tf.LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_labels=3)),
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32)),
        "bert-seq-cls": lambda: tf.BertForSequenceClassification(tf.BertConfig(**bert, num_labels=3)),
        "bert-base": lambda: tf.BertModel(tf.BertConfig(**bert)),
        "roberta-seq-cls": lambda: tf.RobertaForSequenceClassification(tf.RobertaConfig(**bert, num_labels=3)),
        "vit-image-cls": lambda: tf.ViTForImageClassification(tf.ViTConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=8,
            patch_size=4, num_labels=3)),
        "bart": lambda: tf.BartForConditionalGeneration(tf.BartConfig(**bart)),
        "bart-seq-cls": lambda: tf.BartForSequenceClassification(tf.BartConfig(**bart, num_labels=3)),
        "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, head_dim=8, max_position_embeddings=32, sliding_window=8)),
        "plain-with-lm-head": lambda: nn.ModuleDict({"body": nn.Linear(4, 4), "lm_head": nn.Linear(4, 8),
                                                      "classifier": nn.Linear(4, 2)}),
    }
    return builders[name]()


def base(name: str) -> nn.Module:
    if name not in _BUILT:
        _BUILT[name] = _build(name).eval()
    return copy.deepcopy(_BUILT[name])


CASES = [
    ("llama", None), ("llama", "CAUSAL_LM"), ("llama-seq-cls", None), ("llama-seq-cls", "SEQ_CLS"),
    ("gpt2", None), ("gpt2", "CAUSAL_LM"), ("bert-seq-cls", None), ("bert-seq-cls", "SEQ_CLS"),
    ("bert-base", None), ("bert-base", "FEATURE_EXTRACTION"), ("roberta-seq-cls", None), ("roberta-seq-cls", "SEQ_CLS"),
    ("vit-image-cls", None), ("bart", None), ("bart", "SEQ_2_SEQ_LM"), ("bart-seq-cls", "SEQ_CLS"),
    ("gemma3", None), ("gemma3", "CAUSAL_LM"), ("plain-with-lm-head", None),
]


def peft_targets(model: nn.Module, **kwargs) -> tuple[set[str], set[str]]:
    """(wrapped module paths, saved target_modules) of peft's all-linear on ``model``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear", **kwargs))
    inner = peft_model.base_model.model
    wrapped = {p for p, m in inner.named_modules() if isinstance(m, LoraLayer)}
    return wrapped, set(peft_model.peft_config["default"].target_modules)


@pytest.mark.parametrize("name,task_type", CASES, ids=[f"{n}-{t}" for n, t in CASES])
def test_all_linear_adapts_what_peft_adapts(name, task_type):
    theirs, their_targets = peft_targets(base(name), task_type=task_type)
    model = lorakit.apply(base(name), lorakit.LoRAConfig(r=2, target_modules="all-linear", task_type=task_type))
    ours = set(lorakit.adapters(model))
    assert ours == theirs, f"only lorakit: {sorted(ours - theirs)}; only peft: {sorted(theirs - ours)}"
    assert set(lorakit.config_of(model).target_modules) == their_targets


def test_the_heads_go_where_peft_puts_them():
    def adapted(name, task_type=None, **kw):
        config = lorakit.LoRAConfig(r=2, target_modules="all-linear", task_type=task_type, **kw)
        return set(lorakit.adapters(lorakit.apply(base(name), config)))

    assert "lm_head" not in adapted("llama") and "lm_head" not in adapted("gemma3")
    assert "classifier" in adapted("vit-image-cls") and "classifier" in adapted("bert-seq-cls")
    assert "classifier" not in adapted("bert-seq-cls", "SEQ_CLS")  # saved in full instead
    assert "classifier" not in adapted("vit-image-cls", modules_to_save=["classifier"])
    assert {"classifier.dense", "classifier.out_proj"} <= adapted("roberta-seq-cls")  # inside a container head
    assert not {"classifier.dense", "classifier.out_proj"} & adapted("roberta-seq-cls", "SEQ_CLS")  # saved in full
    assert {"lm_head", "classifier", "body"} == adapted("plain-with-lm-head")


def test_vit_with_its_head_saved_in_full_matches_peft(tmp_path):
    theirs, _ = peft_targets(base("vit-image-cls"), modules_to_save=["classifier"])
    config = lorakit.LoRAConfig(r=2, target_modules="all-linear", modules_to_save=["classifier"])
    assert set(lorakit.adapters(lorakit.apply(base("vit-image-cls"), config))) == theirs
