"""Initialisers on a tiny Llama: LoRA-GA's first-step alignment with the full gradient, and training loss
over the first steps for each ``init_lora_weights`` against full fine-tuning. Writes docs/benchmarks/init_claims.md.

Run: ``HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 python bench/init_claims.py`` (about a minute on two cores).
The model is a randomly initialised Llama (2 layers, hidden 64) on a learnable synthetic task (each token
determines the next: t' = 7t + 3 mod 1000); numbers are seeded and reproducible, not a paper-scale result.
"""
from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.init.calibration import Calibration, accumulate_gradients

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "init_claims.md"


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def task(n: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 1000, (4, 16), generator=g)
        for t in range(1, 16):
            ids[:, t] = (ids[:, t - 1] * 7 + 3) % 1000
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def adapted(base, init, data, r=8, targets=ALL):
    model = copy.deepcopy(base)
    torch.manual_seed(1)  # the same Kaiming draws for every row
    lorakit.apply(model, lorakit.LoRAConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=init))
    return lorakit.initialize(model, data[:4]) if init in ("lora_ga", "eva") else model


def peft_lora_ga(base, data, r=8):
    """A lorakit LoRA holding the factors and residual base of PEFT 0.21.2's LoRA-GA port (its own scaling)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    theirs = copy.deepcopy(base)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(ALL), init_lora_weights="lora_ga",
                        lora_ga_config=LoraGAConfig())
    preprocess_loraga(theirs, config, lambda: [theirs(**b).loss.backward() for b in data[:4]])
    theirs = get_peft_model(theirs, config)
    model = adapted(base, True, data)
    with torch.no_grad():
        for path, a in lorakit.adapters(model).items():
            layer = theirs.base_model.model.get_submodule(path)
            a.lora_A.weight.copy_(layer.lora_A["default"].weight)
            a.lora_B.weight.copy_(layer.lora_B["default"].weight)
            a.base_layer.weight.copy_(layer.base_layer.weight)
    return model


def first_step_cosines(base, data, init, lr=1e-3):
    """Mean over layers of cos(ΔW after one SGD step, −G), and the rank-2r bound ||G_2r|| / ||G||."""
    model = peft_lora_ga(base, data) if init == "lora_ga (PEFT port)" else adapted(base, init, data)
    plain = copy.deepcopy(base)  # G at the original weights (an adapted model may hold a moved base)
    grads = accumulate_gradients(plain, {p: plain.get_submodule(p) for p in lorakit.adapters(model)},
                                 Calibration.of(data[:4]))
    before = {p: a.base_layer.weight.detach() + a.delta_weight() for p, a in lorakit.adapters(model).items()}
    optim = torch.optim.SGD(lorakit.trainable_parameters(model).values(), lr=lr)
    model.train()
    (sum(model(**b).loss for b in data[:4]) / 4).backward()
    optim.step()
    cos, bound = [], []
    for p, a in lorakit.adapters(model).items():
        step = a.base_layer.weight.detach() + a.delta_weight() - before[p]
        cos.append(F.cosine_similarity(step.flatten(), -grads[p].flatten(), dim=0).item())
        s = torch.linalg.svdvals(grads[p])
        bound.append((s[:16].square().sum() / s.square().sum()).sqrt().item())
    return sum(cos) / len(cos), sum(bound) / len(bound)


def losses(model, params, data, steps=60, lr=1e-3):
    optim = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    trace = []
    for step in range(steps):
        loss = model(**data[step % len(data)]).loss
        optim.zero_grad()
        loss.backward()
        optim.step()
        trace.append(loss.item())
    return [sum(trace[i : i + 10]) / 10 for i in range(0, steps, 10)]


def main() -> None:
    warnings.simplefilter("ignore")
    base, data = tiny_llama(), task()
    lines = ["# Initialisers on a tiny Llama", "", f"Command: `{' '.join(['python'] + sys.argv)}` "
             "(see the script's docstring for the model and task).", "",
             "## First SGD step vs the full fine-tuning gradient (r = 8, all linear layers, mean over layers)", "",
             "| init | cos(ΔW, −G) | rank-2r bound |", "|---|---|---|"]
    for init in (True, "pissa", "olora", "eva", "lora_ga", "lora_ga (PEFT port)"):
        cos, bound = first_step_cosines(base, data, init)
        lines.append(f"| {init} | {cos:.3f} | {bound:.3f} |")
    lines += ["", "## Training loss, AdamW lr 1e-3, mean over each 10 steps", "",
              "| init | " + " | ".join(f"{i}-{i + 9}" for i in range(0, 60, 10)) + " |", "|---|" + "---|" * 6]
    full = copy.deepcopy(base)
    params = [p for n, p in full.named_parameters() if any(t in n for t in ALL)]
    rows = {"full fine-tuning": losses(full, params, data)}
    for init in (True, "pissa", "olora", "eva", "lora_ga"):
        model = adapted(base, init, data)
        rows[str(init)] = losses(model, list(lorakit.trainable_parameters(model).values()), data)
    lines += [f"| {k} | " + " | ".join(f"{v:.3f}" for v in trace) + " |" for k, trace in rows.items()]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
