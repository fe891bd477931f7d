"""Run under `torchrun --nproc_per_node 2`: fit the tiny classifier and let rank 0 save its trainable parameters.

Usage: torchrun ... ddp_worker.py OUT_FILE OUTPUT_DIR
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import tiny_classifier, tiny_task  # noqa: E402

from lorakit.data import byte_tokenizer  # noqa: E402
from lorakit.train import fit  # noqa: E402

DDP_RUN = dict(lr=1e-2, epochs=2, log_every=1, save_every=5, warmup_steps=2, progress=True, seed=5)


def main(out_file: str, output_dir: str) -> None:
    torch.set_num_threads(1)
    model, _ = tiny_classifier()
    train = tiny_task().encode(byte_tokenizer(), max_length=24)["train"]
    result = fit(model, train, batch_size=4, output_dir=output_dir, **DDP_RUN)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    if int(os.environ["RANK"]) == 0:
        torch.save({"params": trainable, "history": result.history, "world": os.environ["WORLD_SIZE"]}, out_file)


if __name__ == "__main__":
    main(*sys.argv[1:3])
