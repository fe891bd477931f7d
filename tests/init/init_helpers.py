"""Shared pieces of the initialiser tests: a tiny Llama, language-model batches, PEFT helpers."""
import copy
import warnings

import torch

import lorakit


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).eval()


def lm_batches(n: int = 3, batch: int = 4, seq: int = 16, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 1000, (batch, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


def perturb_lora(model, seed: int = 3, scale: float = 0.05) -> None:
    """Seeded noise on every LoRA factor (PEFT or lorakit model): stands in for training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_A" in name or "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def peft_model(base, init, r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"), batches=None, **extra):
    """A PEFT LoRA model on a copy of ``base`` initialised with ``init`` (LoRA-GA: gradients from ``batches``)."""
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "eva_config is not specified": PEFT's defaults are what we want
        config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=init, **extra)
    if init == "lora_ga":
        from peft.tuners.lora.config import LoraGAConfig
        from peft.tuners.lora.loraga import preprocess_loraga

        config.lora_ga_config = LoraGAConfig()

        def train_step():
            for b in batches:
                model(**b).loss.backward()

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT's backward hooks warn on frozen inputs
            preprocess_loraga(model, config, train_step)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, config)


def lorakit_model(base, init, r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"), batches=None, **extra):
    """The lorakit counterpart of ``peft_model``."""
    model = copy.deepcopy(base)
    lorakit.apply(model, lorakit.LoRAConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                            init_lora_weights=init, **extra))
    return lorakit.initialize(model, batches) if batches is not None else model


def peft_factors(model) -> dict:
    """{module path: {"A": ..., "B": ..., "W": base weight}} of a PEFT LoRA model."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            path = name.removeprefix("base_model.model.")
            out[path] = {"A": module.lora_A["default"].weight.detach(), "B": module.lora_B["default"].weight.detach(),
                         "W": module.base_layer.weight.detach()}
    return out


def lorakit_factors(model) -> dict:
    return {p: {"A": a.lora_A.weight.detach(), "B": a.lora_B.weight.detach(), "W": a.base_layer.weight.detach()}
            for p, a in lorakit.adapters(model).items()}
