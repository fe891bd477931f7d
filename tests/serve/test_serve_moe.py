"""MoE bases in the server: adapters on fused expert weights (PEFT's target_parameters) and on attention layers,
mixed in one batch with the base model, serve the greedy tokens `peft` gives each adapter alone (tiny Mixtral,
Qwen3-MoE and GPT-OSS built from configs)."""

import pytest
import torch

from lorakit.serve import Engine, EngineConfig, Request, SamplingParams
from lorakit.tiny_models import MOE_EXPERTS as EXPERTS, MOE_KINDS, tiny_moe

PROMPTS = [[1, 5, 6, 7, 8], [1, 20, 21], [1, 30, 31, 32, 33, 34, 35], [1, 40, 41, 42], [1, 50, 51, 52, 53, 54]]


def base(name):
    return tiny_moe(name, vocab_size=260)


def greedy(n=6):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("model_name", MOE_KINDS)
def test_expert_adapters_serve_peft_tokens_in_mixed_batches(tmp_path, model_name):
    from peft import LoraConfig, PeftModel, get_peft_model

    from lorakit.data import byte_tokenizer

    configs = {"experts": dict(target_modules=["q_proj"], target_parameters=EXPERTS),
               "down": dict(target_modules=[], target_parameters=["experts.down_proj"], r=3),
               "attn": dict(target_modules=["q_proj", "v_proj"])}
    for i, (name, kw) in enumerate(configs.items()):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(i)
            get_peft_model(base(model_name), LoraConfig(**{"r": 2, "lora_alpha": 4, **kw}, init_lora_weights=False)
                           ).save_pretrained(tmp_path / name)
    engine = Engine(base(model_name), byte_tokenizer(), EngineConfig(max_batch=3, max_len=64, prefetch=False))
    for name in configs:
        engine.add_adapter(name, tmp_path / name)
    names = ["experts", None, "down", "attn", "experts"]
    reqs = engine.drain([engine.submit(Request(p, a, greedy(4 + i))) for i, (p, a) in enumerate(zip(PROMPTS, names))])
    engine.stop()
    models = {a: PeftModel.from_pretrained(base(model_name), str(tmp_path / (a or "attn"))).eval() for a in set(names)}
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    for i, (p, a, r) in enumerate(zip(PROMPTS, names, reqs)):
        assert r.finish_reason == "length", r.error
        with torch.inference_mode(), (models[a].disable_adapter() if a is None else torch.enable_grad()):
            ref = models[a].generate(input_ids=torch.tensor([p]), max_new_tokens=4 + i, **kw)[0, len(p):].tolist()
        assert r.output == ref, (a, p)
    with torch.inference_mode():
        plain = base(model_name).generate(input_ids=torch.tensor([PROMPTS[0]]), max_new_tokens=4, **kw)[0, 5:].tolist()
    assert reqs[0].output != plain, "the expert adapter changes the tokens"


def test_expert_adapters_make_no_tensor_without_a_device(tmp_path):
    """As in test_serve_devices.py: with "meta" as torch's default device the outputs stay the same."""
    from peft import LoraConfig, get_peft_model

    from lorakit.data import byte_tokenizer

    get_peft_model(base("mixtral"), LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=EXPERTS,
                                               init_lora_weights=False)).save_pretrained(tmp_path / "experts")

    def run(meta):
        engine = Engine(base("mixtral"), byte_tokenizer(), EngineConfig(max_batch=3, max_len=64, prefetch=False))
        engine.add_adapter("experts", tmp_path / "experts")
        with torch.device("meta") if meta else torch.enable_grad():
            reqs = engine.drain([engine.submit(Request(p, a, greedy())) for p, a in zip(PROMPTS, ["experts", None])])
        engine.stop()
        return [r.output for r in reqs]

    assert run(True) == run(False)


def test_a_merge_with_an_expert_adapter_is_refused(tmp_path):
    from peft import LoraConfig, get_peft_model

    from lorakit.data import byte_tokenizer

    for i, kw in enumerate([dict(target_modules=[], target_parameters=EXPERTS), dict(target_modules=["q_proj"])]):
        get_peft_model(base("mixtral"), LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, **kw)
                       ).save_pretrained(tmp_path / f"a{i}")
    engine = Engine(base("mixtral"), byte_tokenizer(), EngineConfig(max_batch=3, max_len=64, prefetch=False))
    for i in range(2):
        engine.add_adapter(f"a{i}", tmp_path / f"a{i}")
    req = engine.drain([engine.submit(Request(PROMPTS[0], None, greedy(), merge=(["a0", "a1"], [0.5, 0.5], "linear")))])[0]
    engine.stop()
    assert req.finish_reason == "error" and req.status == 400 and "adapt parameters" in req.error
