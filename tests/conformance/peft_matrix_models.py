"""The architectures of the PEFT conformance matrix: seeded tiny models built from transformers configs.

Each architecture names, per layer kind it has, the ``target_modules`` that pick layers of that kind, and
gives calibration batches (with labels, so ``output.loss`` exists) for the data-driven initialisers.
Llama, GPT-2 and BERT are the shared fixtures of ``tests/conftest.py``; the others are built here the same way.
"""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch


def _shared_conftest():
    """tests/conftest.py as loaded by pytest (under the name ``conftest``, which every test folder's conftest
    takes in turn), or loaded from its path when another folder's conftest holds that name now."""
    path = Path(__file__).resolve().parents[1] / "conftest.py"
    loaded = sys.modules.get("conftest")
    if loaded is not None and Path(loaded.__file__).resolve() == path:
        return loaded
    if "lorakit_tests_conftest" not in sys.modules:
        spec = importlib.util.spec_from_file_location("lorakit_tests_conftest", path)
        sys.modules[spec.name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["lorakit_tests_conftest"]


_conftest = _shared_conftest()
TinyModel, _ids, tiny, perturb_ = _conftest.TinyModel, _conftest._ids, _conftest.tiny, _conftest.perturb_

VOCAB = 200


@dataclass(frozen=True)
class Arch:
    """A tiny model family: its layer kinds (kind -> target_modules) and how to make calibration batches."""

    name: str
    model: Callable[[], TinyModel]
    layers: dict
    batches: Callable[[], list]


def _lm_batches(vocab: int = 1000, n: int = 2) -> list:
    return [{"input_ids": _ids(vocab, seed=10 + i, batch=4, length=12), "labels": _ids(vocab, seed=10 + i, batch=4, length=12)}
            for i in range(n)]


def _cls_batches(vocab: int = 1000, n: int = 3) -> list:
    g = torch.Generator().manual_seed(5)
    return [{"input_ids": _ids(vocab, seed=20 + i, batch=8, length=16), "labels": torch.randint(0, 3, (8,), generator=g)}
            for i in range(n)]


def _image_batches(n: int = 2) -> list:
    g = torch.Generator().manual_seed(6)
    return [{"pixel_values": torch.randn(4, 3, 16, 16, generator=g), "labels": torch.randint(0, 3, (4,), generator=g)}
            for _ in range(n)]


_BUILT: dict[str, TinyModel] = {}


def _cached(name: str, build: Callable[[], TinyModel]) -> Callable[[], TinyModel]:
    def get() -> TinyModel:
        if name not in _BUILT:
            _BUILT[name] = build()
            _BUILT[name].template.eval()
        return _BUILT[name]

    return get


def _gemma3() -> TinyModel:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                              sliding_window=16, tie_word_embeddings=False)  # untied: the embed_scale case alone
    return TinyModel("gemma3", Gemma3ForCausalLM(config), {"input_ids": _ids(VOCAB)}, [])


def _bart() -> TinyModel:
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    config = BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                        scale_embedding=True)
    return TinyModel("bart", BartForConditionalGeneration(config), {"input_ids": _ids(VOCAB)}, [])


def _vit() -> TinyModel:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=64, num_labels=3)
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return TinyModel("vit", ViTForImageClassification(config), {"pixel_values": pixels}, [])


def _resnet() -> TinyModel:
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                          num_labels=3)
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return TinyModel("resnet", ResNetForImageClassification(config), {"pixel_values": pixels}, [])


def _tied() -> TinyModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return TinyModel("tied", LlamaForCausalLM(config), {"input_ids": _ids(VOCAB)}, [])


ARCHS: dict[str, Arch] = {a.name: a for a in (
    Arch("llama", lambda: tiny("llama"), {"Linear": ["q_proj", "v_proj", "down_proj"], "Embedding": ["embed_tokens"]},
         _lm_batches),
    Arch("gpt2", lambda: tiny("gpt2"), {"Conv1D": ["c_attn", "c_fc"], "Embedding": ["wte"]}, _lm_batches),
    Arch("bert", lambda: tiny("bert"), {"Linear": ["query", "value", "dense"], "Embedding": ["word_embeddings"]},
         _cls_batches),
    Arch("gemma3", _cached("gemma3", _gemma3), {"Linear": ["q_proj", "v_proj", "down_proj"], "Embedding": ["embed_tokens"]},
         lambda: _lm_batches(VOCAB)),
    Arch("bart", _cached("bart", _bart), {"Linear": ["q_proj", "v_proj", "fc1"], "Embedding": ["embed_tokens"]},
         lambda: _lm_batches(VOCAB)),
    Arch("vit", _cached("vit", _vit), {"Linear": ["q_proj", "v_proj", "fc1"], "Conv2d": ["projection"]}, _image_batches),
    Arch("resnet", _cached("resnet", _resnet), {"Conv2d": ["convolution"]}, _image_batches),
    Arch("tied", _cached("tied", _tied), {"Linear": ["lm_head"], "Embedding": ["embed_tokens"]},
         lambda: _lm_batches(VOCAB)),
)}
LAYERS = ("Linear", "Conv1D", "Embedding", "Conv2d")
