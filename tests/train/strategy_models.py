"""A four-block Llama classifier and its data, shared by the schedule tests."""
import torch
from conftest import tiny_task

import lorakit
from lorakit.data import byte_tokenizer


def llama4(seed: int = 0):
    """A seeded 4-block Llama with a 3-way head."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, num_labels=3)
    return LlamaForSequenceClassification(config)


def lora4(seed: int = 0, r: int = 2, targets=("q_proj", "v_proj")):
    """llama4 with LoRA (s = 1) on ``targets`` of every block, the head trained in full."""
    model = llama4(seed)
    torch.manual_seed(seed)
    return lorakit.apply(model, lorakit.LoRAConfig(r=r, lora_alpha=r, target_modules=list(targets), task_type="SEQ_CLS"))


def data(n: int = 40):
    """(train, validation) of the tiny word-sentiment task."""
    encoded = tiny_task(n=n).encode(byte_tokenizer(), max_length=16)
    return encoded["train"], encoded["validation"]


class Crash(Exception):
    pass


def crash_at(step):
    def callback(current, record):
        if current == step:
            raise Crash(step)

    return callback
