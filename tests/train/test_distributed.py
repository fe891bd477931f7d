"""Data parallelism: two processes with batch b (launched by torchrun or by accelerate) train like one process
with batch 2b."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_classifier, tiny_task
from ddp_worker import DDP_RUN

from lorakit.data import byte_tokenizer
from lorakit.train import fit


LAUNCHERS = {
    "torchrun": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    # accelerate's multi-process launcher (torch.distributed underneath; without a GPU the processes train on the
    # CPU over gloo). Its `--cpu` flag with several processes needs MPI instead.
    "accelerate": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
}


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_two_processes_match_one_with_the_doubled_batch(tmp_path, launcher):
    out, run_dir = tmp_path / "ddp.pt", tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, *LAUNCHERS[launcher], str(Path(__file__).with_name("ddp_worker.py")), str(out),
               str(run_dir)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(out)
    assert ddp["world"] == "2"

    model, _ = tiny_classifier()
    train = tiny_task().encode(byte_tokenizer(), max_length=24)["train"]
    single = fit(model, train, batch_size=8, **dict(DDP_RUN, progress=False, save_every=None))

    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(ddp["params"][name], param.detach(), rtol=1e-4, atol=1e-5)
    assert [h["step"] for h in ddp["history"]] == [h["step"] for h in single.history]
    for a, b in zip(ddp["history"], single.history):
        assert abs(a["loss"] - b["loss"]) < 1e-5  # the logged loss is the mean over both processes

    # One writer: every step once in metrics.jsonl; the checkpoint holds both processes' RNG states.
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, single.steps + 1))
    final = torch.load(run_dir / f"checkpoint-{single.steps:08d}.pt", weights_only=False)
    assert final["world_size"] == 2 and len(final["rng"]) == 2
    assert proc.stderr.count("train:   0%") == 1  # one progress bar: rank 0 only
