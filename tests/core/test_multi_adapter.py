"""Several named adapters on one model, against the installed ``peft`` doing the same calls (atol 1e-5).

PEFT's habits: add_adapter, set_adapter (one or several), delete_adapter, load with adapter_name, mixed batches
(``adapter_names=[...]``, ``"__base__"`` for none), merge of the active adapter, files in PEFT's layout (the
default adapter at the root, each other one in its sub-folder), and weights hot-swapped in place.
"""
from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import lorakit
from lorakit.testing import default_config

ATOL = 1e-5
A = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
B = dict(r=2, lora_alpha=6, target_modules=["v_proj", "up_proj"], init_lora_weights=False)
C = dict(r=3, lora_alpha=3, target_modules=["k_proj"], init_lora_weights=False)
ROWS = ["b", "__base__", "default", "b"]


def _ids(llama, rows: int = 4):
    return torch.randint(0, 1000, (rows, 7), generator=torch.Generator().manual_seed(1))


def _run(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def _close(a, b, what):
    assert torch.allclose(a, b, atol=ATOL), f"{what}: max difference {(a - b).abs().max().item():.2e}"


@pytest.fixture
def peft_saved(llama, tmp_path):
    """A PEFT model with adapters 'default' and 'b' (random B), saved by PEFT: the root and the sub-folder 'b'."""
    model = get_peft_model(llama.make(), LoraConfig(**copy.deepcopy(A)))
    model.add_adapter("b", LoraConfig(**copy.deepcopy(B)))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "b" / "adapter_config.json").is_file()
    return model.eval(), tmp_path


def test_same_calls_same_outputs_as_peft(llama, peft_saved):
    theirs, path = peft_saved
    ours = lorakit.load_peft(llama.make(), path)
    lorakit.load_peft(ours, path, adapter_name="b")  # the sub-folder, added beside 'default'
    ids = _ids(llama)
    assert lorakit.adapter_names(ours) == ["default", "b"] and lorakit.active_adapters(ours) == ["default"]
    _close(_run(ours, ids), _run(theirs, ids), "'default' active")

    theirs.set_adapter("b"), lorakit.set_adapter(ours, "b")
    _close(_run(ours, ids), _run(theirs, ids), "'b' active")
    theirs.base_model.set_adapter(["default", "b"]), lorakit.set_adapter(ours, ["default", "b"])
    _close(_run(ours, ids), _run(theirs, ids), "both active (their updates add)")
    theirs.set_adapter("default"), lorakit.set_adapter(ours, "default")
    mixed = _run(ours, ids, adapter_names=ROWS)
    _close(mixed, _run(theirs, ids, adapter_names=ROWS), "mixed batch")
    with lorakit.disabled(ours):
        base = _run(ours, ids)
    _close(mixed[1], base[1], "'__base__' row")
    assert not torch.allclose(mixed[0], mixed[2], atol=1e-3), "rows of different adapters differ"

    theirs.add_adapter("c", LoraConfig(**copy.deepcopy(C)))
    lorakit.add_adapter(ours, "c", lorakit.LoRAConfig(**C))
    lorakit.hotswap_adapter(ours, _peft_state(theirs, "c", lorakit.config_of(ours, "c")), "c")
    theirs.delete_adapter("b"), lorakit.delete_adapter(ours, "b")
    assert lorakit.adapter_names(ours) == ["default", "c"]
    _close(_run(ours, ids), _run(theirs, ids), "after deleting 'b'")
    theirs.set_adapter("c"), lorakit.set_adapter(ours, "c")
    _close(_run(ours, ids), _run(theirs, ids), "'c' active after deleting 'b'")
    _close(_run(ours, ids, adapter_names=["c", "default", "__base__", "c"]),
           _run(theirs, ids, adapter_names=["c", "default", "__base__", "c"]), "mixed batch after deleting 'b'")

    merged_theirs = theirs.merge_and_unload()
    merged_ours = lorakit.merge(ours)  # folds the active 'c', drops 'default' (as PEFT)
    assert not lorakit.adapters(merged_ours) and not lorakit.adapter_names(merged_ours)
    _close(_run(merged_ours, ids), _run(merged_theirs, ids), "merge of the active adapter")


def _peft_state(model, name, config):
    """One adapter of a PeftModel as a lorakit AdapterState (PEFT's own state-dict keys)."""
    from peft import get_peft_model_state_dict

    state = lorakit.AdapterState(config, {})
    for key, value in get_peft_model_state_dict(model, adapter_name=name).items():
        module, _, leaf = key[len("base_model.model."):].rpartition(".lora_")
        state.tensors.setdefault(module, {})["lora_" + leaf] = value
    return state


def test_saved_in_peft_layout_and_peft_loads_it(llama, perturb, tmp_path):
    model = lorakit.add_adapter(llama.make(), "default", lorakit.LoRAConfig(**A))
    lorakit.add_adapter(model, "b", lorakit.LoRAConfig(**B))
    perturb(model)
    lorakit.set_adapter(model, "b")
    perturb(model, seed=1)
    ids = _ids(llama)
    out_b = _run(model, ids)
    lorakit.set_adapter(model, "default")
    out_default = _run(model, ids)
    assert not torch.allclose(out_b, out_default, atol=1e-3)

    lorakit.save_peft(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "b",
                                                          "lorakit_base.json"]
    theirs = PeftModel.from_pretrained(llama.make(), tmp_path)
    theirs.load_adapter(tmp_path / "b", adapter_name="b")
    _close(_run(theirs, ids), out_default, "peft, 'default' from the root")
    theirs.set_adapter("b")
    _close(_run(theirs, ids), out_b, "peft, 'b' from its sub-folder")

    lorakit.save_peft(model, tmp_path / "one", adapter_name="b")  # one named adapter: its sub-folder
    _close(_run(PeftModel.from_pretrained(llama.make(), tmp_path / "one", subfolder="b"), ids), out_b,
           "peft, a single named adapter")
    again = lorakit.load_peft(llama.make(), tmp_path, adapter_name="b")
    assert lorakit.adapter_names(again) == ["b"]
    _close(_run(again, ids), out_b, "lorakit, sub-folder 'b' on a base model")


def test_load_root_under_a_name(llama, peft_saved, tmp_path):
    theirs, path = peft_saved
    ids = _ids(llama)
    ours = lorakit.load_peft(llama.make(), path / "b", adapter_name="x")  # PEFT: from_pretrained(..., adapter_name=)
    lorakit.load_peft(ours, path, adapter_name="y")  # path/y does not exist: the root adapter, named 'y'
    assert lorakit.adapter_names(ours) == ["x", "y"]
    theirs.set_adapter("b")
    _close(_run(ours, ids), _run(theirs, ids), "'x' (peft's 'b')")
    lorakit.set_adapter(ours, "y")
    theirs.set_adapter("default")
    _close(_run(ours, ids), _run(theirs, ids), "'y' (peft's 'default')")


def test_mixed_batch_in_generate(llama, perturb):
    model = lorakit.add_adapter(llama.make(), "default", lorakit.LoRAConfig(**A))
    lorakit.add_adapter(model, "b", lorakit.LoRAConfig(**B))
    perturb(model, scale=0.5)
    lorakit.set_adapter(model, "b")
    perturb(model, scale=0.5, seed=1)
    ids = _ids(llama, 3)
    names = ["b", "__base__", "default"]
    with lorakit.mixed_batch(model, names):
        mixed = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=2)
    for i, name in enumerate(names):
        if name == "__base__":
            with lorakit.disabled(model):
                alone = model.generate(ids[i:i + 1], max_new_tokens=4, do_sample=False, pad_token_id=2)
        else:
            lorakit.set_adapter(model, name)
            alone = model.generate(ids[i:i + 1], max_new_tokens=4, do_sample=False, pad_token_id=2)
        assert torch.equal(mixed[i], alone[0]), f"row {i} ({name})"


@pytest.mark.parametrize("name", [n for n in lorakit.METHODS.names()
                                  if (c := lorakit.METHODS.get(n).capabilities) and c.mergeable])
def test_every_mergeable_method_mixes_per_row(llama, perturb, name):
    """Each row of a mixed batch equals its adapter run alone; declared-servable methods also stack as a sum."""
    model = llama.make()
    configs = {"a": default_config(name, ["q_proj", "v_proj"]), "b": default_config(name, ["v_proj", "o_proj"])}
    for adapter, config in configs.items():
        lorakit.add_adapter(model, adapter, config)
        lorakit.set_adapter(model, adapter)
        perturb(model, seed=len(adapter) + ord(adapter))
    ids = _ids(llama, 3)
    alone = {}
    for adapter in configs:
        lorakit.set_adapter(model, adapter)
        alone[adapter] = _run(model, ids)
    with lorakit.disabled(model):
        alone["__base__"] = _run(model, ids)
    rows = ["b", "__base__", "a"]
    mixed = _run(model, ids, adapter_names=rows)
    for i, adapter in enumerate(rows):
        _close(mixed[i], alone[adapter][i], f"{name}: row {i} ({adapter})")
    if lorakit.METHODS.get(name).capabilities.servable:
        lorakit.set_adapter(model, ["a", "b"])
        stacked = _run(model, ids)
        summed = llama.make()
        weights = dict(summed.named_parameters())
        with torch.no_grad():
            for adapter in configs:
                state = lorakit.AdapterState.from_model(model, adapter)
                for path in state.modules():
                    w = weights[f"{path}.weight"]
                    w.add_(state.delta(path, w).to(w.dtype))
        _close(stacked, _run(summed, ids), f"{name}: both active equals the base plus both updates")
    else:
        with pytest.raises(ValueError, match=f"method '{name}'.*does not declare 'servable'"):
            lorakit.set_adapter(model, ["a", "b"])


def test_merge_the_outer_of_two_on_one_layer(llama, perturb):
    model = lorakit.add_adapter(llama.make(), "default", lorakit.LoRAConfig(**A))
    lorakit.add_adapter(model, "b", lorakit.LoRAConfig(**B))  # both on v_proj: 'b' wraps 'default' there
    lorakit.set_adapter(model, "b")
    perturb(model)
    ids = _ids(llama)
    expected = _run(model, ids)
    merged = lorakit.merge(model)
    assert not lorakit.adapters(merged)
    _close(_run(merged, ids), expected, "'b' merged, 'default' below it dropped")


def test_refusals(llama, perturb):
    model = lorakit.add_adapter(llama.make(), "default", lorakit.LoRAConfig(**A))
    lorakit.add_adapter(model, "b", lorakit.LoRAConfig(**B))
    ids = _ids(llama)
    for call in (lambda: lorakit.set_adapter(model, "nope"), lambda: lorakit.delete_adapter(model, "nope"),
                 lambda: lorakit.config_of(model, "nope")):
        with pytest.raises(KeyError, match="no adapter named 'nope'.*'default', 'b'"):
            call()
    with pytest.raises(KeyError, match="'nope' not on the model.*'__base__'"):
        _run(model, ids, adapter_names=["b", "nope", "default", "b"])
    with pytest.raises(ValueError, match="3 names for a batch of 4 rows"):
        _run(model, ids, adapter_names=["b", "default", "b"])
    with pytest.raises(ValueError, match="eval mode"):
        model.train()
        _run(model, ids, adapter_names=ROWS)
    model.eval()
    for bad in ("b", "__base__", "a.b", ""):
        with pytest.raises(ValueError, match="adapter name|already has an adapter named"):
            lorakit.add_adapter(model, bad, lorakit.LoRAConfig(**C))
    with pytest.raises(ValueError, match="already has a lorakit adapter.*add_adapter"):
        lorakit.apply(model, lorakit.LoRAConfig(**C))
    with pytest.raises(ValueError, match="modules_to_save"):
        lorakit.add_adapter(model, "c", lorakit.LoRAConfig(**C, modules_to_save=["lm_head"]))
    with pytest.raises(ValueError, match="changes the base weights"):
        lorakit.add_adapter(model, "c", lorakit.LoRAConfig(**{**C, "init_lora_weights": "pissa"}))

    lorakit.set_adapter(model, ["default", "b"])
    before = _run(model, ids)
    with pytest.raises(ValueError, match="cannot merge: .* 2 active adapters"):
        lorakit.merge(model)
    with pytest.raises(ValueError, match="2 active"):
        lorakit.AdapterState.from_model(model)  # which adapter? name it
    _close(_run(model, ids), before, "a refused merge leaves the model as it was")
    assert lorakit.adapter_names(model) == ["default", "b"]

    lorakit.add_adapter(model, "dora", lorakit.DoRAConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="adapter 'dora' \\(method 'dora'\\) does not declare 'servable'"):
        lorakit.set_adapter(model, ["default", "dora"])
    from lorakit.methods.flylora import FlyLoRAConfig

    lorakit.add_adapter(model, "fly", default_config("flylora", ["q_proj"]))
    assert isinstance(lorakit.config_of(model, "fly"), FlyLoRAConfig)
    with pytest.raises(ValueError, match="adapter 'fly' \\(method 'flylora'\\) does not declare 'mergeable'"):
        _run(model, ids, adapter_names=["fly", "b", "b", "default"])
    _run(model, ids, adapter_names=["dora", "b", "__base__", "default"])  # DoRA's update is fixed: rows mix

    plain = lorakit.unwrap(copy.deepcopy(model))
    assert len(plain._forward_pre_hooks) == 1, "one hook, also on a deep copy"
    with pytest.raises(KeyError, match="'b' not on the model; its adapters: \\(none\\)"):
        _run(plain, ids, adapter_names=["b"] * 4)


def test_hotswap_in_place(llama, perturb, tmp_path):
    model = perturb(lorakit.apply(llama.make(), lorakit.LoRAConfig(**A)))
    other = perturb(lorakit.apply(llama.make(), lorakit.LoRAConfig(**A)), seed=5)
    lorakit.save_peft(other, tmp_path / "other")
    ids = _ids(llama)
    params = {n: (p, p.data_ptr()) for n, p in model.named_parameters()}
    lorakit.hotswap_adapter(model, tmp_path / "other")
    assert all(p is params[n][0] and p.data_ptr() == params[n][1] for n, p in model.named_parameters()), \
        "hot-swapping keeps every parameter object and its storage"
    _close(_run(model, ids), _run(other, ids), "after hot-swapping")
    lorakit.load_peft(model, tmp_path / "other", adapter_name="default")  # a name the model has: in place too
    assert all(p is params[n][0] for n, p in model.named_parameters())

    for config, match in ((dict(A, r=2), "differs .* in r"), (dict(A, lora_alpha=16), "differs .* in lora_alpha"),
                          (dict(A, target_modules=["q_proj"]), "disagree on which modules")):
        wrong = lorakit.apply(llama.make(), lorakit.LoRAConfig(**config))
        lorakit.save_peft(wrong, tmp_path / "wrong", adapter_name=str(len(match)))
        with pytest.raises(ValueError, match=match):
            lorakit.hotswap_adapter(model, lorakit.load_state(tmp_path / "wrong", str(len(match))))
        _close(_run(model, ids), _run(other, ids), "a refused hot swap leaves the adapter as it was")
    fewer = tmp_path / "wrong" / str(len("disagree on which modules"))  # the adapter on q_proj only
    lorakit.add_adapter(model, "new", lorakit.LoRAConfig(**A))
    with pytest.raises(ValueError, match="disagree on which modules"):
        lorakit.load_peft(model, fewer, adapter_name="new")  # into 'new', whose modules differ
    lorakit.delete_adapter(model, "new")
    assert lorakit.adapter_names(model) == ["default"]
    state = lorakit.AdapterState.from_model(lorakit.apply(llama.make(), lorakit.LoRAConfig(**A)))
    last = sorted(state.tensors)[-1]
    state.tensors[last]["lora_B.weight"] = state.tensors[last]["lora_B.weight"][:-1]  # one wrong shape, last
    with pytest.raises(lorakit.AdapterShapeError, match=f"module '{last}', tensor 'lora_B.weight'"):
        lorakit.hotswap_adapter(model, state)
    _close(_run(model, ids), _run(other, ids), "every shape is checked before any tensor is copied")
    lorakit.save_state(state, tmp_path / "bad")
    with pytest.raises(lorakit.AdapterShapeError, match="expects shape"):
        lorakit.load_peft(model, tmp_path / "bad", adapter_name="brand_new")
    assert lorakit.adapter_names(model) == ["default"], "a load refused after adding the name takes it away again"


def test_hotswap_does_not_recompile(llama, perturb, tmp_path):
    dynamo = pytest.importorskip("torch._dynamo")
    model = perturb(lorakit.apply(llama.make(), lorakit.LoRAConfig(**A)))
    other = perturb(lorakit.apply(llama.make(), lorakit.LoRAConfig(**A)), seed=5)
    ids = _ids(llama)
    dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=False)
    first = _run(compiled, ids)
    _close(first, _run(model, ids), "compiled output")
    with dynamo.config.patch(error_on_recompile=True):
        lorakit.hotswap_adapter(model, lorakit.AdapterState.from_model(other))
        _close(_run(compiled, ids), _run(other, ids), "compiled, after hot-swapping (no recompilation)")
    dynamo.reset()


@pytest.mark.slow
def test_hotswap_does_not_recompile_inductor(llama, perturb):
    """The same with the default backend (inductor generates code: about a minute on two CPU cores)."""
    dynamo = pytest.importorskip("torch._dynamo")
    model = perturb(lorakit.apply(llama.make(), lorakit.LoRAConfig(**A)))
    other = perturb(lorakit.apply(llama.make(), lorakit.LoRAConfig(**A)), seed=5)
    ids = _ids(llama)
    dynamo.reset()
    compiled = torch.compile(model)
    _close(_run(compiled, ids), _run(model, ids), "compiled output")
    with dynamo.config.patch(error_on_recompile=True):
        lorakit.hotswap_adapter(model, lorakit.AdapterState.from_model(other))
        _close(_run(compiled, ids), _run(other, ids), "compiled, after hot-swapping (no recompilation)")
    dynamo.reset()


def test_mixed_batch_with_embeddings_as_peft(llama, tmp_path):
    kwargs = dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    theirs = get_peft_model(llama.make(), LoraConfig(**copy.deepcopy(kwargs)))
    theirs.add_adapter("b", LoraConfig(**{**copy.deepcopy(kwargs), "r": 2}))
    theirs.eval().save_pretrained(tmp_path)
    ours = lorakit.load_peft(llama.make(), tmp_path)
    lorakit.load_peft(ours, tmp_path, adapter_name="b")
    ids = _ids(llama)
    _close(_run(ours, ids, adapter_names=ROWS), _run(theirs, ids, adapter_names=ROWS), "mixed batch, embeddings")
    theirs.base_model.set_adapter(["default", "b"]), lorakit.set_adapter(ours, ["default", "b"])
    _close(_run(ours, ids), _run(theirs, ids), "both active, embeddings")
    from safetensors.torch import load_file, save_file

    file = tmp_path / "b" / "adapter_model.safetensors"
    tensors = load_file(str(file))
    key = next(k for k in tensors if k.endswith("embed_tokens.base_layer.weight"))  # peft saves the embeddings
    tensors[key] = tensors[key] + 1
    save_file(tensors, str(file))
    with pytest.raises(lorakit.AdapterFileError, match="base weights that differ from the model's"):
        lorakit.load_peft(ours, tmp_path / "b", adapter_name="c")
    assert lorakit.adapter_names(ours) == ["default", "b"], "a refused load adds nothing"
