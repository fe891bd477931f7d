"""`lorakit train-many`: each job's run directory as `lorakit train` writes it; bad jobs files refused up front."""
import json

import pytest
from safetensors.torch import load_file

from lorakit.cli import main

COMMON = ("task: tweets, kind: classification, max_train: 40, max_eval: 8, max_length: 24, max_steps: 3, "
          "eval_every: 2, batch_size: 8, targets: 'q_proj,v_proj'")


def _write(tmp_path, jobs: str, top: str = "model: tiny-llama\nkind: classification\nseed: 0\n") -> str:
    path = tmp_path / "jobs.yaml"
    path.write_text(top + "defaults: {" + COMMON.replace("kind: classification, ", "") + "}\njobs:\n" + jobs)
    return str(path)


def test_each_job_equals_lorakit_train(tmp_path, capsys):
    jobs = _write(tmp_path, "  - {name: a, rank: 4, lr: 1e-3}\n  - {name: b, rank: 8, lr: 5e-4, batch_size: 4, seed: 3}\n")
    assert main(["train-many", jobs, "-o", str(tmp_path / "many")]) == 0
    assert main(["train", "--model", "tiny-llama", "--task", "tweets", "--kind", "classification", "--max-train", "40",
                 "--max-eval", "8", "--max-length", "24", "--max-steps", "3", "--eval-every", "2", "--batch-size", "8",
                 "--targets", "q_proj,v_proj", "-r", "4", "--lr", "1e-3", "-o", str(tmp_path / "solo")]) == 0
    many, solo = tmp_path / "many" / "a", tmp_path / "solo"
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/lorakit_base.json",
                 "run.json", "summary.json", "metrics.jsonl", "checkpoint-00000002.pt"):
        assert (many / name).is_file(), name
    got, want = load_file(many / "adapter/adapter_model.safetensors"), load_file(solo / "adapter/adapter_model.safetensors")
    assert got.keys() == want.keys() and len(got) > 2
    assert max((got[k] - want[k]).abs().max().item() for k in got) < 1e-5
    assert json.loads((many / "run.json").read_text()) == json.loads((solo / "run.json").read_text())
    assert json.loads((many / "adapter/adapter_config.json").read_text()) == \
        json.loads((solo / "adapter/adapter_config.json").read_text())
    summary = json.loads((tmp_path / "many" / "b" / "summary.json").read_text())
    assert summary["status"] == "done" and summary["steps"] == 3
    # a finished run resumes to the same place; without --resume or --overwrite the output is refused
    assert main(["train-many", jobs, "-o", str(tmp_path / "many"), "--resume"]) == 0
    assert main(["train-many", jobs, "-o", str(tmp_path / "many")]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("job, expected", [
    ("{name: x, rank: eight}", "job 'x': field 'rank': expected a whole number >= 1, found 'eight'"),
    ("{name: x, ranks: 4}", "job 'x': unknown field 'ranks'"),
    ("{name: x, lr: fast}", "job 'x': field 'lr': expected a number"),
    ("{name: x, dropout: 0.1}", "job 'x': field 'dropout'"),
    ("{name: x, method: dora}", "job 'x': field 'method'"),
    ("{name: x, method: nosuch}", "job 'x': field 'method'"),
    ("{name: x, task: /no/such/data.jsonl}", "job 'x': field 'task'"),
    ("{name: x, targets: nosuch_proj}", "job 'x': field 'targets'"),
    ("{name: x}\n  - {name: x, rank: 2}", "job 'x': field 'name': another job has this name"),
    ("{rank: 2}", "job 2: field 'name'"),
    ("{name: x, optimizer: lora_pro}", "job 'x': field 'optimizer'"),
])
def test_a_job_that_cannot_run_is_named_with_its_field(tmp_path, capsys, job, expected):
    jobs = _write(tmp_path, "  - {name: fine, rank: 4}\n  - " + job + "\n")
    out = tmp_path / "out"
    assert main(["train-many", jobs, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert err.startswith("lorakit train-many: error: ") and "Traceback" not in err
    assert not out.exists()  # refused before anything trained or was written


def test_a_base_that_trains_with_dropout_is_refused_before_training(tmp_path, capsys):
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text("model: minilm\nkind: classification\njobs:\n  - {name: a, task: tweets, max_train: 16, max_eval: 4, "
                    "targets: 'query,value', max_steps: 1}\n")
    out = tmp_path / "out"
    assert main(["train-many", str(jobs), "-o", str(out)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # (the model load's progress bar aside)
    assert len(errors) == 1 and "trains with dropout" in errors[0] and "--no-base-dropout" in errors[0]
    assert not out.exists()
    assert main(["train-many", str(jobs), "-o", str(out), "--no-base-dropout"]) == 0
    assert (out / "a" / "adapter" / "adapter_model.safetensors").is_file()
