"""Trans-LoRA across two pretrained encoders: a LoRA on MiniLM (all-MiniLM-L6-v2) moved to paraphrase-MiniLM-L3-v2
with synthetic data only, against the target trained on the real data and the target's head alone.

    python bench/transfer.py --quick    # tweets (LoRA target) and wordnet-pos (DoRA target), 3 seeds
    python bench/transfer.py            # both tasks x both target methods, more data, a no-filter ablation

Per task: the source adapter (LoRA r=8 on query/key/value + head) is trained once on the real training sample
(seed 0). Per seed: 5 seed examples are drawn from the training split (stratified); the generator is
`NGramGenerator` over the seeds only (no generator LM loads offline here, see the page), and again with generic
background text from other bundled corpora (never the task's own); the target adapter is distilled from the
source's soft labels on the synthetic inputs the discriminator keeps.
References per seed, on the target base with the same step budget: the target adapter trained on the real
training sample, and the target's classification head alone trained on it. The claim thresholds are fixed here,
before any run: CLAIM_MARGIN below.
Writes docs/benchmarks/transfer.json and transfer.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine, write_json  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"
SOURCE, TARGET = "minilm", "paraphrase-minilm-l3"
CLAIM_MARGIN = 0.03  # accuracy points: "transferred >= reference - margin"
QUICK = dict(train=960, test=300, max_length=48, candidates=480, num_synthetic=240, min_synthetic=32, epochs=2,
             seeds=3, runs=[("tweets", "lora"), ("wordnet-pos", "dora")], ablation=False)
FULL = dict(train=2000, test=800, max_length=64, candidates=1600, num_synthetic=800, min_synthetic=32, epochs=2,
            seeds=3, runs=[("tweets", "lora"), ("tweets", "dora"), ("wordnet-pos", "lora"), ("wordnet-pos", "dora")],
            ablation=True)
# Generic text for the n-gram generator's second variant: other bundled corpora, never the task's own (WordNet's
# category and part-of-speech tasks share their glosses, so neither is background for the other).
BACKGROUND = {"tweets": ["fortunes", "wordnet-category"], "wordnet-pos": ["fortunes", "tweets"]}
BACKGROUND_PER_CORPUS = 2000
LORA = dict(r=8, alpha=16, targets=["query", "key", "value"], lr=3e-3, batch_size=16)


def _load(model: str, task, seed: int):
    from lorakit import zoo

    return zoo.load(model, num_labels=task.num_labels, seed=seed)


def _train(model_name: str, task, method: str, seed: int, s: dict, head_only: bool = False):
    """(model, tokenizer, test accuracy) after one epoch on the real training sample."""
    from lorakit import apply
    from lorakit.jobs import method_config
    from lorakit.train import evaluate, fit

    model, tok = _load(model_name, task, seed)
    torch.manual_seed(seed)
    if head_only:
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith("classifier."))
    else:
        apply(model, method_config(method, LORA["r"], LORA["alpha"], 0.0, LORA["targets"], "classification",
                                   base_model=model_name))
    splits = task.encode(tok, s["max_length"])
    fit(model, splits["train"], None, lr=LORA["lr"] * (2 if head_only else 1), batch_size=LORA["batch_size"],
        epochs=1, seed=seed, progress=False)
    return model, tok, evaluate(model, splits["test"], batch_size=64)["accuracy"]


def _background(task_name: str) -> tuple[list[str], str]:
    from lorakit.data import load_task

    names = BACKGROUND[task_name]
    texts = [e["text"] for n in names for e in load_task(n).subsampled(BACKGROUND_PER_CORPUS, None, seed=0).train]
    return texts, "+".join(names)


def _transfer(teacher, ttok, task, method: str, seed: int, s: dict, use_filter: bool = True,
              background: tuple[list[str], str] = ((), "")) -> dict:
    from lorakit.train import evaluate
    from lorakit.transfer import (NGramGenerator, SoftLabelled, TransLoRAConfig, kl_to_teacher, teacher_outputs,
                                  trans_lora)

    seeds = [e["text"] for e in task.subsampled(5, None, seed=100 + seed).train]
    student, stok = _load(TARGET, task, seed)
    config = TransLoRAConfig(num_synthetic=s["num_synthetic"], candidates=s["candidates"], target_method=method,
                             min_synthetic=s["min_synthetic"],
                             epochs=s["epochs"], max_length=s["max_length"], seed=seed, filter=use_filter,
                             lr=LORA["lr"], batch_size=LORA["batch_size"], progress=False)
    generator = NGramGenerator(background[0], name=background[1])
    record = trans_lora(teacher, ttok, student, stok, seeds, generator, config)
    record["accuracy"] = evaluate(student, task.encode(stok, s["max_length"])["test"], batch_size=64)["accuracy"]
    # fidelity on the real test inputs (never seen by the transfer): KL to the teacher and argmax agreement
    texts = [e["text"] for e in task.test]
    probs = teacher_outputs(teacher, ttok, texts, s["max_length"])[0]
    real = SoftLabelled(texts, probs, stok, s["max_length"])
    mine = teacher_outputs(student, stok, texts, s["max_length"])[0]
    record.update(kl_test=round(kl_to_teacher(student, real), 5),
                  agreement_test=round(float((mine.argmax(-1) == probs.argmax(-1)).float().mean()), 4))
    record.pop("config")
    record["synthetic_examples"] = record.pop("synthetic_inputs", [])[:5]
    return record


def run(s: dict) -> dict:
    from lorakit.data import load_task

    out = {}
    for task_name, method in s["runs"]:
        key = f"{task_name}/{method}"
        task = load_task(task_name).subsampled(s["train"], s["test"], seed=0)
        t0 = time.time()
        teacher, ttok, source_acc = _train(SOURCE, task, "lora", 0, s)
        background = _background(task_name)
        rows = {"transferred": [], "transferred_background": [], "target_real": [], "target_head_only": []}
        if s["ablation"]:
            rows["transferred_no_filter"] = []
        for seed in range(s["seeds"]):
            rows["transferred"].append(_transfer(teacher, ttok, task, method, seed, s))
            rows["transferred_background"].append(_transfer(teacher, ttok, task, method, seed, s,
                                                            background=background))
            if s["ablation"]:
                rows["transferred_no_filter"].append(_transfer(teacher, ttok, task, method, seed, s, use_filter=False))
            rows["target_real"].append({"accuracy": _train(TARGET, task, method, seed, s)[2]})
            rows["target_head_only"].append({"accuracy": _train(TARGET, task, method, seed, s, head_only=True)[2]})
            print(f"{key} seed {seed}: " + ", ".join(f"{k} {v[-1]['accuracy']:.3f}" for k, v in rows.items()),
                  flush=True)
        out[key] = {"task": task_name, "target_method": method, "labels": list(task.label_names),
                    "source_accuracy": source_acc, "rows": rows, "wall_time_s": round(time.time() - t0, 1),
                    "majority_share": max(sum(e["label"] == c for e in task.test) for c in range(task.num_labels))
                    / len(task.test)}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 runs x 3 seeds on small samples (about 10 minutes)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    settings = QUICK if args.quick else FULL
    start, cpu = time.time(), time.process_time()
    result = {"settings": {**settings, "source": SOURCE, "target": TARGET, "lora": LORA, "claim_margin": CLAIM_MARGIN,
                           "generator": "ngram over the 5 seeds only",
                           "background": {k: f"{BACKGROUND_PER_CORPUS} inputs each of {', '.join(v)}"
                                          for k, v in BACKGROUND.items()}},
              "quick": args.quick, "runs": run(settings), "machine": machine(), "command": command_line(),
              "wall_time_s": round(time.time() - start, 1), "cpu_time_s": round(time.process_time() - cpu, 1)}
    write_json(OUT / "transfer.json", result)
    from transfer_report import write_page

    write_page(result, OUT)
    print(f"wrote {OUT / 'transfer.md'} ({result['wall_time_s']:.0f} s)")


if __name__ == "__main__":
    main()
