"""GGUF LoRA export for llama.cpp: the file's layout is the converter's, and the ΔW llama.cpp computes from it is the
adapter's, for plain LoRA, rsLoRA with rank patterns, and other low-rank methods; what cannot be exact is refused."""
import gguf
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.formats.gguf_lora import GGUFExportError, _permute_rows, export_gguf, read_gguf_deltas

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def _state(config: lorakit.AdapterConfig, seed=0):
    model = lorakit.apply(_llama(), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed + len(name)))
    return lorakit.AdapterState.from_model(model), model.config


def test_the_file_is_what_llama_cpps_converter_writes(tmp_path):
    state, config = _state(lorakit.LoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    path = export_gguf(state, config, tmp_path / "a.gguf")
    reader = gguf.GGUFReader(str(path))
    fields = {f.name: f for f in reader.fields.values()}
    assert bytes(fields["general.type"].parts[-1]).decode() == "adapter"
    assert bytes(fields["adapter.type"].parts[-1]).decode() == "lora"
    assert float(fields["adapter.lora.alpha"].parts[-1][0]) == 8.0
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "llama"
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    assert len(tensors) == 2 * 7 * 2
    t = state.tensors["model.layers.1.self_attn.k_proj"]
    np.testing.assert_array_equal(tensors["blk.1.attn_k.weight.lora_a"], t["lora_A.weight"].numpy())
    np.testing.assert_array_equal(tensors["blk.1.attn_k.weight.lora_b"], _permute_rows(t["lora_B.weight"], 2).numpy())
    down = state.tensors["model.layers.0.mlp.down_proj"]["lora_B.weight"]
    np.testing.assert_array_equal(tensors["blk.0.ffn_down.weight.lora_b"], down.numpy())  # not permuted


def test_q_and_k_rows_follow_llama_cpps_rope_order():
    """HF's rotate-half pairs row j with j + d/2 within a head; llama.cpp pairs rows 2j and 2j + 1."""
    rows = torch.arange(16.0).reshape(16, 1)  # 2 heads of 8 rows
    permuted = _permute_rows(rows, 2).flatten().tolist()
    assert permuted[:8] == [0, 4, 1, 5, 2, 6, 3, 7] and permuted[8:] == [8, 12, 9, 13, 10, 14, 11, 15]


@pytest.mark.parametrize("config", [
    lorakit.LoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS),
    lorakit.LoRAConfig(r=4, lora_alpha=16, use_rslora=True, rank_pattern={"k_proj": 2}, alpha_pattern={"o_proj": 3},
                       target_modules=TARGETS),
], ids=["lora", "rslora-patterns"])
def test_llama_cpp_computes_the_adapters_update(tmp_path, config):
    state, model_config = _state(config)
    deltas = read_gguf_deltas(export_gguf(state, model_config, tmp_path / "a.gguf"), model_config)
    assert sorted(deltas) == sorted(state.modules())
    for path, delta in deltas.items():
        torch.testing.assert_close(delta, state.delta(path).float(), rtol=1e-5, atol=1e-6)


def test_other_low_rank_methods_export_through_their_factors(tmp_path):
    cls = lorakit.METHODS.get("lora_xs").config_class
    state, model_config = _state(cls(r=4, target_modules=["q_proj", "v_proj"]))
    deltas = read_gguf_deltas(export_gguf(state, model_config, tmp_path / "xs.gguf"), model_config)
    for path, delta in deltas.items():
        torch.testing.assert_close(delta, state.delta(path).float(), rtol=1e-4, atol=1e-6)


def test_what_cannot_be_exact_is_refused(tmp_path):
    state, config = _state(lorakit.DoRAConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(Exception, match="dora"):
        export_gguf(state, config, tmp_path / "d.gguf")
    state, config = _state(lorakit.LoRAConfig(r=4, target_modules=["q_proj", "embed_tokens"]))
    with pytest.raises(GGUFExportError, match="embed_tokens.*blocks' linear layers"):
        export_gguf(state, config, tmp_path / "e.gguf")
    state, config = _state(lorakit.LoRAConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with pytest.raises(GGUFExportError, match="full tensors"):
        export_gguf(state, config, tmp_path / "m.gguf")
    state, config = _state(lorakit.LoRAConfig(r=4, target_modules=["q_proj"]))
    config.model_type = "gpt2"
    with pytest.raises(GGUFExportError, match="'gpt2'"):
        export_gguf(state, config, tmp_path / "g.gguf")
    assert not list(tmp_path.iterdir())  # nothing half-written
    config.model_type = "llama"
    export_gguf(state, config, tmp_path / "ok.gguf")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_gguf(state, config, tmp_path / "ok.gguf")


def test_cli_export(tmp_path, capsys):
    from lorakit.cli import main

    from lorakit import zoo

    model, _ = zoo.load("tiny-llama", "causal_lm")
    lorakit.apply(model, lorakit.LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    lorakit.save_peft(model, tmp_path / "ad")
    assert main(["export", str(tmp_path / "ad"), "--gguf", "-o", str(tmp_path / "a.gguf")]) == 0
    assert (tmp_path / "a.gguf").stat().st_size > 0
    assert main(["export", str(tmp_path / "ad"), "--gguf", "-o", str(tmp_path / "a.gguf")]) == 2
    err = capsys.readouterr().err
    assert "exists" in err and err.count("\n") == 1
    assert main(["export", str(tmp_path / "ad"), "--gguf", "-o", str(tmp_path / "b.gguf"), "--model", "tiny-gpt2"]) == 2
    assert "'gpt2'" in capsys.readouterr().err and not (tmp_path / "b.gguf").exists()
