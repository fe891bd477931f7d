"""Causal-LM instruction tuning on gemma-270m: a bundled task as instructions, LoRA, loss and generation before/after.

The task: the bundled `wordnet-pos` glosses as prompt/completion pairs (``lorakit.data.chat.as_causal`` with an
instruction template): the prompt asks for the part of speech of the word a WordNet definition defines, the
completion is the label name (`adj`, `adv`, `noun`, `verb`) plus the end-of-sequence token; the loss covers the
completion only. Before: the base model (the adapter's B is zero, so every seed's "before" is the same model).
After: LoRA r 8 on all linear layers trained for a few steps. Measured on the same test examples: the mean
completion loss, and greedy generation scored by exact match and token F1 (``lorakit.train.generation``). Over
seeds: mean with a 95% t-interval. Writes docs/benchmarks/instruction-tuning.{json,md}.

    python bench/instruction_tuning.py [--model gemma-270m] [--seeds 3] [--steps 60]

The same run from the command line (one seed; the prompt template there is the plain "{text}\\nAnswer:"):
    lorakit train --model gemma-270m --task wordnet-pos --kind causal_lm --eval-generate 100 ...
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ci, command_line, machine, read_json, write_json  # noqa: E402

import lorakit  # noqa: E402
from lorakit import zoo  # noqa: E402
from lorakit.data import load_task  # noqa: E402
from lorakit.data.chat import as_causal  # noqa: E402
from lorakit.train import evaluate, fit  # noqa: E402
from lorakit.train.generation import generation_metrics  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"
TEMPLATE = ("What part of speech is the word this dictionary definition defines? Answer adj, adv, noun or verb.\n"
            "Definition: {text}\nAnswer:")
SETUP = dict(task="wordnet-pos", max_train=2000, max_eval=60, max_length=64, batch_size=8, lr=1e-3, r=8, alpha=16,
             targets="all-linear", max_new_tokens=6)


def _task(name: str):
    task = as_causal(load_task(SETUP["task"]), TEMPLATE).subsampled(SETUP["max_train"], SETUP["max_eval"], seed=0)
    model, tok = zoo.load(name, task="causal_lm")
    return task, tok, task.encode(tok, SETUP["max_length"])


def scores(model, tok, task, splits) -> dict:
    """Completion loss on the test split and greedy-generation scores on its prompts."""
    t0 = time.time()
    out = {"loss": evaluate(model, splits["test"], batch_size=8)["loss"]}
    out.update(generation_metrics(model, tok, task.test, max_new_tokens=SETUP["max_new_tokens"]))
    out["eval_s"] = round(time.time() - t0)
    return out


def run(name: str, seeds: list[int], steps: int, partial: Path, publish=None) -> dict:
    """Scores before tuning (once) and after LoRA tuning (per seed); partial results kept in ``partial``, and
    ``publish(done)`` called after every seed (the page shows the seeds finished so far)."""
    task, tok, splits = _task(name)
    done = read_json(partial) or {}
    if "before" not in done:
        done["before"] = scores(zoo.load(name, task="causal_lm")[0], tok, task, splits)
        write_json(partial, done)
        print(f"before: {done['before']}", flush=True)
    for seed in seeds:
        if str(seed) in done.get("after", {}):
            continue
        model = zoo.load(name, task="causal_lm", seed=seed)[0]
        torch.manual_seed(seed)
        lorakit.apply(model, lorakit.LoRAConfig(r=SETUP["r"], lora_alpha=SETUP["alpha"], target_modules=SETUP["targets"],
                                                task_type="CAUSAL_LM"))
        t0 = time.time()
        result = fit(model, splits["train"], None, lr=SETUP["lr"], batch_size=SETUP["batch_size"], max_steps=steps,
                     seed=seed, progress=False, warmup_ratio=0.05)
        after = {**scores(model, tok, task, splits), "train_s": round(time.time() - t0), "steps": result.steps}
        done.setdefault("after", {})[str(seed)] = after
        write_json(partial, done)
        print(f"seed {seed}: {after}", flush=True)
        publish and publish(done)
    return done


def write_page(result: dict) -> str:
    """docs/benchmarks/instruction-tuning.md from the result JSON."""
    s, before, after = result["setup"], result["before"], list(result["after"].values())
    rows, claims = [], []
    for key, better in (("loss", "lower"), ("exact_match", "higher"), ("token_f1", "higher")):
        m, h = ci([a[key] for a in after])
        rows.append(f"| {key} | {before[key]:.3f} | {m:.3f} ± {h:.3f} |")
        if key != "token_f1":
            gain = before[key] - m if better == "lower" else m - before[key]
            low = gain - h  # the CI's worse end (the mean itself with one seed)
            claims.append(f"| LoRA instruction tuning improves {key.replace('_', ' ')} on {s['model']} | {better} after "
                          f"than before, at the 95% CI's worse end | {gain:+.3f} (CI end {low:+.3f}) | "
                          f"{'yes' if low > 0 else '**no**'} |")
    lines = [
        f"# Instruction tuning on {s['model']} (causal LM)", "",
        f"Gemma 3 270M, LoRA r {s['r']} alpha {s['alpha']} on all linear layers, lr {s['lr']}, batch {s['batch_size']}, "
        f"{s['steps']} steps, {s['max_length']} tokens, seeds {s['seeds']}. Task: the bundled `{s['task']}` glosses "
        f"({s['max_train']} training, {s['max_eval']} test examples) as prompt/completion pairs with the prompt "
        f"`{TEMPLATE!r}` and the label name as the completion (loss on the completion only). Generation: greedy, "
        f"at most {s['max_new_tokens']} new tokens, exact match after stripping whitespace, token F1. Before: the "
        "base model (identical for every seed); after: mean ± 95% t-interval over seeds.", "",
        f"Command: `{result['command']}`; wall time of the last pass {result['wall_time_s']} s (a run continues from the seeds saved by earlier passes; training time per seed below). Machine: {result['machine']['cpu']}, "
        f"{result['machine']['threads']} torch thread(s), load {result['machine']['load']} (a shared machine: times "
        "are long and not comparable across pages).", "",
        "| claim | threshold | measured | met |", "|---|---|---|---|", *claims, "",
        "| test measure | before | after (mean ± CI) |", "|---|---:|---:|", *rows, "",
        "Per seed: " + "; ".join(f"seed {k}: loss {a['loss']:.3f}, exact {a['exact_match']:.2f}, F1 {a['token_f1']:.2f}, "
                                 f"train {a['train_s']} s" for k, a in result["after"].items()) + ".", "",
        "The same kind of run from the command line (plain `{text}\\nAnswer:` prompt): `lorakit train --model gemma-270m "
        "--task wordnet-pos --kind causal_lm --targets all-linear --max-steps 30 --batch-size 8 --max-length 64 "
        "--eval-generate 60 -o runs/gemma-pos`.", "",
    ]
    (OUT / "instruction-tuning.md").write_text("\n".join(lines))
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-270m")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default=None, help="directory for the page and JSON (default docs/benchmarks)")
    ap.add_argument("--render", action="store_true", help="redraw the page from the JSON in --out, train nothing")
    args = ap.parse_args(argv)
    global OUT
    OUT = Path(args.out) if args.out else OUT
    if args.render:
        print(write_page(read_json(OUT / "instruction-tuning.json")))
        return
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    start = time.time()
    seeds = list(range(args.seeds))

    def publish(done: dict) -> None:
        finished = sorted(int(k) for k in done.get("after", {}))
        result = {"setup": {**SETUP, "model": args.model, "steps": args.steps, "seeds": finished},
                  "command": command_line(), "machine": machine(), "wall_time_s": round(time.time() - start), **done}
        write_json(OUT / "instruction-tuning.json", result)
        write_page(result)

    done = run(args.model, seeds, args.steps, OUT / f".instruction-tuning-{args.model}.partial.json", publish)
    publish(done)
    print((OUT / "instruction-tuning.md").read_text())


if __name__ == "__main__":
    main()
