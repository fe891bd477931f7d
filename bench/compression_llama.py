"""LoRAM's memory claim on a Llama whose prunable weights dominate, as in the paper's models: a section of
docs/benchmarks/compression.md, stored under ``llama_proportions`` in docs/benchmarks/compression.json.

gemma-270m keeps 63% of its parameters in the 262,144-token embedding, which LoRAM does not prune, and has one
key/value head, so pruning reaches FFN channels only. Here a Llama built from a config with Llama-2/3 proportions
(32,000-token vocabulary, FFN 2.75x the hidden size, grouped-query attention with 4 key/value heads for 16 query
heads; random weights: memory does not depend on their values) trains LoRA on the full base, and LoRAM on copies
pruned at 50% and at 85% (the card's ratio for LLaMA-3.1-70B) of head groups and FFN channels, and QLoRAM (85%, then
nf4 with bf16 compute). The same 16 x 48-token batch, LoRA r 8 on all linear layers, AdamW; each row in a fresh
child process (``compression.probe``: peak RSS over the RSS before the model is built, and the tensor peak of a
profiled step).

    python bench/compression_llama.py          # about 40 minutes on two busy shared cores
    python bench/compression_llama.py --page   # the rows measured so far onto the page
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine, read_json, write_json  # noqa: E402

import compression as c  # noqa: E402

NAME, LABELS = "llama-proportions", 3
CONFIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
              num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False)
KINDS = ("lora", "loram-0.5", "loram-0.85", "qloram-0.85")


def build(seed: int, labels: int):
    """The Llama sequence classifier of ``CONFIG`` with seeded random weights."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForSequenceClassification(LlamaConfig(**CONFIG, num_labels=labels, pad_token_id=0))


def proportions() -> dict:
    """Parameter counts: all, the embedding, and the transformer blocks (what LoRAM prunes)."""
    model = build(0, LABELS)
    total = sum(p.numel() for p in model.parameters())
    embed = model.model.embed_tokens.weight.numel()
    blocks = sum(p.numel() for p in model.model.layers.parameters())
    return {"parameters": total, "embedding": embed, "blocks": blocks, "blocks_fraction": blocks / total}


def main() -> None:
    if sys.argv[1:] == ["--page"]:  # the rows measured so far (a stopped run) onto the page
        return page(read_json(c.OUT / ".compression-llama.json"))
    torch.set_num_threads(1)
    start = time.time()
    part = c.OUT / ".compression-llama.json"
    saved = read_json(part) or {}
    out = {"config": CONFIG, "proportions": saved.get("proportions") or proportions()}
    write_json(part, out)
    out["memory"] = c.memory(LABELS, False, NAME, KINDS, out=saved.get("memory"), prune=False,
                             save=lambda mem: write_json(part, {**out, "memory": mem}))
    out["run"] = {"command": command_line(), "machine": machine(), "wall_time_s": round(time.time() - start)}
    write_json(part, out)
    page(out)


def page(out: dict) -> None:
    """Put ``out`` into compression.json under ``llama_proportions`` and rewrite the page."""
    if "run" not in out:
        out = {**out, "run": {"command": f"{command_line([]).rstrip()} (stopped after the rows shown), then "
                              f"{command_line()}", "wall_time_s": "not recorded:"}}
    result = read_json(c.OUT / "compression.json")
    result["llama_proportions"] = out
    write_json(c.OUT / "compression.json", result)
    from compression_report import write_page

    write_page(result, c.OUT)
    print(f"wrote {c.OUT / 'compression.md'}")


if __name__ == "__main__":
    main()
