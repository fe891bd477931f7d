"""MoE bases in the server: adapters on attention layers serve peft's tokens; adapters on fused expert weights
(PEFT's target_parameters) are refused with a reason (the engine does not recompute experts per adapter)."""

import pytest
import torch

from lorakit.serve import Engine, EngineConfig, Request, SamplingParams

PROMPTS = [[1, 5, 6, 7, 8], [1, 20, 21], [1, 30, 31, 32, 33, 34, 35]]


def greedy(n=6):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)



def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return MixtralForCausalLM(MixtralConfig(
            vocab_size=260, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)).eval()


def test_moe_base_serves_attention_adapters_and_refuses_expert_parameters(tmp_path):
    """Over a tiny Mixtral: an adapter on the attention layers serves peft's tokens; one on the fused expert
    weights (PEFT's target_parameters) is refused when it loads, naming target_parameters and what to do."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from lorakit.data import byte_tokenizer

    experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    get_peft_model(_mixtral(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                          init_lora_weights=False)).save_pretrained(tmp_path / "attn")
    get_peft_model(_mixtral(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=experts,
                                          init_lora_weights=False)).save_pretrained(tmp_path / "experts")
    engine = Engine(_mixtral(), byte_tokenizer(), EngineConfig(max_batch=3, max_len=64, prefetch=False))
    engine.add_adapter("attn", tmp_path / "attn")
    with pytest.raises(ValueError, match=r"target_parameters=\[.*experts.*\].*cannot serve it exactly.*Merge it"):
        engine.add_adapter("experts", tmp_path / "experts")
    reqs = engine.drain([engine.submit(Request(p, a, greedy())) for p, a in zip(PROMPTS, ["attn", None, "attn"])])
    engine.stop()
    peft = PeftModel.from_pretrained(_mixtral(), str(tmp_path / "attn")).eval()
    for p, a, r in zip(PROMPTS, ["attn", None, "attn"], reqs):
        with torch.inference_mode(), (peft.disable_adapter() if a is None else torch.enable_grad()):
            ref = peft.generate(input_ids=torch.tensor([p]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(p):].tolist()
        assert r.output == ref, (a, p)
