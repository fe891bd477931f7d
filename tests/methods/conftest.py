"""Fixtures for the claim tests: a seeded tiny Llama (as a factory), a fixed batch, and short training runs."""
from __future__ import annotations

import copy
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

_TEMPLATE: list = []


class Tiny:
    """A seeded tiny LlamaForCausalLM: ``make()`` gives a fresh copy, ``ids`` a fixed batch, ``logits`` runs it."""

    def __init__(self):
        if not _TEMPLATE:
            from transformers import LlamaConfig, LlamaForCausalLM

            torch.manual_seed(0)
            config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 bos_token_id=0, eos_token_id=1, pad_token_id=2)
            _TEMPLATE.append(LlamaForCausalLM(config).eval())
        self.ids = batch(0)

    def make(self) -> nn.Module:
        return copy.deepcopy(_TEMPLATE[0]).eval()

    def logits(self, model: nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=self.ids if ids is None else ids).logits

    @staticmethod
    def batch(seed: int, size: int = 4, length: int = 12) -> torch.Tensor:
        """A seeded batch of token ids."""
        return batch(seed, size, length)

    @staticmethod
    def loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """Next-token loss of ``model`` on ``ids``."""
        return model(input_ids=ids, labels=ids).loss

    def train(self, model: nn.Module, steps: int, lr: float = 1e-2, seed: int = 0, before_step=None,
              weight_decay: float = 0.0) -> nn.Module:
        """AdamW steps of next-token loss on seeded batches; ``before_step(model)`` runs before each forward."""
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
        model.train()
        for step in range(steps):
            if before_step is not None:
                before_step(model)
            self.loss(model, batch(seed * 1000 + step)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return model.eval()


def batch(seed: int, size: int = 4, length: int = 12) -> torch.Tensor:
    return torch.randint(3, 256, (size, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def tiny() -> Tiny:
    return Tiny()
