"""Hand-off to vLLM: every adapter kind lorakit writes that vLLM can serve, vLLM (its CPU build) serves with PEFT's
greedy tokens, on a tiny Llama built from a config, in float32.

The kinds: plain LoRA on the attention projections, on every linear layer, rsLoRA, rank and alpha patterns, and each registered method
whose update is exactly s·B·A exported with ``to_lora()`` (plain LoRA files; modules of other ranks carry
``rank_pattern``/``alpha_pattern``). vLLM runs in its own venv (``$LORAKIT_VLLM_PYTHON``, default
/work/cache/vllm-venv/bin/python; see docs/serving.md for how it is built); the test is skipped without it.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.core.registry import METHODS
from lorakit.core.state import AdapterState
from lorakit.testing import default_config, perturb_

VLLM = Path(os.environ.get("LORAKIT_VLLM_PYTHON", "/work/cache/vllm-venv/bin/python"))
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL = ATTN + ["gate_proj", "up_proj", "down_proj"]
PROMPTS = [[1, 5, 6, 7, 8, 9], [1, 40, 41], [1, 90, 91, 92, 93, 94, 95, 96, 97]]
NEW = 8

DRIVER = r"""
import json, os, sys
os.environ.update(VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind",
                  VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1")
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest
job = json.loads(sys.argv[1])
rank = next(r for r in (8, 16, 32, 64, 128, 256) if r >= job["max_rank"])
llm = LLM(model=job["model"], skip_tokenizer_init=True, dtype="float32", enforce_eager=True, seed=0, max_model_len=64,
          enable_lora=True, max_loras=len(job["adapters"]) + 1, max_lora_rank=rank, max_num_seqs=64)
prompts, loras, keys = [], [], []
for i, (name, path) in enumerate(sorted(job["adapters"].items())):
    for j, p in enumerate(job["prompts"]):
        prompts.append({"prompt_token_ids": p})
        loras.append(LoRARequest(name, i + 1, path))
        keys.append(name)
params = SamplingParams(max_tokens=job["new"], temperature=0.0, ignore_eos=True, detokenize=False)
outs = llm.generate(prompts, params, lora_request=loras)
result = {}
for key, out in zip(keys, outs):
    result.setdefault(key, []).append(list(out.outputs[0].token_ids))
print("@@ " + json.dumps(result))
"""


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


def exportable_methods() -> list[str]:
    """Registered methods that declare ``exportable_to_lora`` for their default config on Linear layers."""
    names = []
    for name in METHODS.names():
        if name == "lora":
            continue
        try:
            config = default_config(name, ATTN)
            caps = METHODS.get(name).adapter_class_for(torch.nn.Linear(4, 4)).capabilities_for(config)
        except Exception:  # noqa: BLE001 - a method that cannot wrap Linear layers or needs more than a default config
            continue
        if caps is not None and caps.exportable_to_lora:
            names.append(name)
    return names


def write_kinds(root: Path) -> dict[str, Path]:
    """One PEFT directory per kind, each written by lorakit with random non-zero factors."""
    kinds = {"lora-attn": lorakit.LoRAConfig(r=8, lora_alpha=16, target_modules=ATTN),
             "lora-all-linear": lorakit.LoRAConfig(r=16, lora_alpha=8, target_modules=ALL),
             "rslora": lorakit.LoRAConfig(r=4, lora_alpha=8, target_modules=ALL, use_rslora=True),
             "rank-alpha-patterns": lorakit.LoRAConfig(r=8, lora_alpha=16, target_modules=ALL, rank_pattern={"v_proj": 4, "down_proj": 16},
                                                       alpha_pattern={"o_proj": 4})}
    kinds.update({f"{m}-to-lora": default_config(m, ATTN) for m in exportable_methods()})
    out = {}
    for i, (kind, config) in enumerate(kinds.items()):
        model = lorakit.apply(tiny_llama(), config)
        perturb_(model, scale=0.3, seed=i)
        path = root / kind
        lorakit.save_state(AdapterState.from_model(model).to_lora(), path)
        out[kind] = path
    return out


@pytest.mark.slow
@pytest.mark.skipif(not VLLM.exists(), reason=f"vLLM's CPU build is not installed ({VLLM})")
def test_vllm_serves_every_exportable_kind_with_peft_greedy_tokens(tmp_path):
    model_dir = tmp_path / "model"
    tiny_llama().save_pretrained(model_dir)
    adapters = write_kinds(tmp_path / "adapters")
    assert len(adapters) >= 5, sorted(adapters)  # the registry's exportable methods are really in the matrix
    max_rank = max(max([json.loads((p / "adapter_config.json").read_text())["r"],
                        *json.loads((p / "adapter_config.json").read_text()).get("rank_pattern", {}).values()])
                   for p in adapters.values())
    job = dict(model=str(model_dir), adapters={k: str(v) for k, v in adapters.items()}, prompts=PROMPTS, new=NEW,
               max_rank=max_rank)
    run = subprocess.run([str(VLLM), "-c", DRIVER, json.dumps(job)], capture_output=True, text=True, timeout=1500)
    lines = [x for x in run.stdout.splitlines() if x.startswith("@@ ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    got = json.loads(lines[-1][3:])

    base_tokens = [peft_greedy_on(tiny_llama, None, p) for p in PROMPTS]
    changed = 0
    for kind, path in adapters.items():
        want = [peft_greedy_on(tiny_llama, path, p) for p in PROMPTS]
        assert got[kind] == want, (kind, got[kind], want)
        changed += want != base_tokens
    assert changed >= len(adapters) - 1, "the adapters barely change the base model's tokens: the check would be vacuous"


def peft_greedy_on(build, adapter_dir, prompt):
    """PEFT's greedy tokens on the model ``build()`` returns."""
    from peft import PeftModel

    model = build()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-m", "slow"]))
