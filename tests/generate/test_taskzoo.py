"""The task zoo: index, adapters that load, the real zoo's task list."""
from __future__ import annotations

import json

import pytest
import torch

import lorakit
from lorakit import zoo as models
from lorakit.generate.tasks import TASKS
from lorakit.generate.zooindex import Zoo, ZooError
from synthetic_zoo import BUDGET, TASKS as SYNTHETIC


def test_real_zoo_has_enough_tasks_with_descriptions():
    experts = [t for t in TASKS if t.split == "expert"]
    heldout = [t for t in TASKS if t.split == "heldout"]
    assert len(experts) >= 24 and len(heldout) >= 4
    assert len({t.name for t in TASKS}) == len(TASKS) and len({t.description for t in TASKS}) == len(TASKS)
    assert all(t.description.endswith("?") for t in TASKS)
    from lorakit.generate.tasks import CAUSAL_TASKS, by_name

    assert len(set(CAUSAL_TASKS)) >= 8 and all(by_name(n) for n in CAUSAL_TASKS)  # `make zoo`'s causal-LM adapters


def test_a_zoo_task_keeps_its_two_classes_renumbered():
    from lorakit.data.fortunes import FORTUNES_DIR

    if not (FORTUNES_DIR / "computers").is_file():
        pytest.skip("needs the Debian package fortunes (make data)")
    from lorakit.generate.tasks import by_name

    task = by_name("fortunes-computers-love").load(max_train=20, max_eval=10)
    assert task.label_names == ("computers", "love") and len(task.train) == 20 and len(task.test) == 10
    assert {r["label"] for r in task.train} == {0, 1}
    assert not {r["text"] for r in task.train} & {r["text"] for r in task.test}
    with pytest.raises(KeyError, match="no zoo task 'nope'"):
        by_name("nope")


def test_carve_keeps_only_the_chosen_labels_in_their_order():
    from lorakit.data.task import load_task
    from lorakit.generate.tasks import carve

    full = load_task("wordnet-category")
    task = carve("wordnet-category", ("noun.plant", "noun.animal"))
    assert task.label_names == ("plant", "animal")
    plant, animal = full.label_names.index("noun.plant"), full.label_names.index("noun.animal")
    for split in ("train", "test"):
        want = [(r["text"], {plant: 0, animal: 1}[r["label"]]) for r in getattr(full, split)
                if r["label"] in (plant, animal)]
        assert [(r["text"], r["label"]) for r in getattr(task, split)] == want
    assert carve("wordnet-category").label_names == full.label_names  # no labels: the whole task
    with pytest.raises(KeyError, match="no label 'noun.unicorn'"):
        carve("wordnet-category", ("noun.animal", "noun.unicorn"))


def test_zoo_task_load_is_carve_then_a_stratified_sample():
    from lorakit.data import subsample
    from lorakit.generate.tasks import by_name, carve

    spec = by_name("wordnet-animal-plant")
    task, full = spec.load(40, 10, seed=3), carve(spec.source, spec.labels)
    assert task.train == subsample(full.train, 40, 3, "label") and task.test == subsample(full.test, 10, 3, "label")
    assert task.source == spec.name and task.label_names == ("animal", "plant")


def test_index_lists_every_task_with_its_adapter(tiny_zoo):
    zoo = Zoo.open(tiny_zoo)
    assert zoo.index["base"] == "tiny-bert" and len(zoo.entries("expert")) == 5 and len(zoo.entries("heldout")) == 1
    for entry in zoo.entries():
        assert (tiny_zoo / entry["path"] / "adapter_config.json").is_file()
        assert len(entry["demos"]) > 0 and ": " in entry["demos"][0]
        assert 0.0 <= entry["metrics"]["test_accuracy"] <= 1.0
        final, first = zoo.state(entry["name"]), zoo.state(entry["name"], entry["snapshots"][0])
        assert not final.modules_to_save and zoo.state(entry["name"], with_head=True).modules_to_save
        path = final.modules()[0]
        assert not torch.equal(final.tensors[path]["lora_B.weight"], first.tensors[path]["lora_B.weight"])


def test_zoo_adapters_start_from_one_shared_draw():
    # every zoo LoRA starts from the same A (INIT_SEED), whatever the global RNG did before: their raw factors share
    # one coordinate system
    from lorakit.generate.taskzoo import init_lora

    config = lorakit.LoRAConfig(r=2, target_modules=["query"])
    torch.manual_seed(1)
    a = init_lora(models.load("tiny-bert", num_labels=2)[0], config)
    torch.manual_seed(2)
    b = init_lora(models.load("tiny-bert", num_labels=3)[0], config)
    c = lorakit.apply(models.load("tiny-bert", num_labels=2)[0], config)
    sa, sb, sc = (lorakit.AdapterState.from_model(m) for m in (a, b, c))
    path = sa.modules()[0]
    assert torch.equal(sa.tensors[path]["lora_A.weight"], sb.tensors[path]["lora_A.weight"])
    assert not torch.equal(sa.tensors[path]["lora_A.weight"], sc.tensors[path]["lora_A.weight"])


def test_rebuild_reuses_the_cache(tiny_zoo):
    from lorakit.generate.taskzoo import build_zoo

    stamp = (tiny_zoo / SYNTHETIC[0].name / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    build_zoo(tiny_zoo, "tiny-bert", SYNTHETIC, BUDGET, progress=False)
    assert (tiny_zoo / SYNTHETIC[0].name / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == stamp


def test_corrupt_or_missing_index_names_the_file(tmp_path):
    with pytest.raises(ZooError, match="index.json: no zoo index"):
        Zoo.open(tmp_path)
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(ZooError, match=r"index.json: not valid JSON"):
        Zoo.open(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"tasks": []}))
    with pytest.raises(ZooError, match="not a zoo index"):
        Zoo.open(tmp_path)


def test_another_base_is_refused_naming_both_fingerprints(tiny_zoo):
    zoo = Zoo.open(tiny_zoo)
    zoo.check_base(models.load("tiny-bert", num_labels=3)[0])  # the same backbone, another head: accepted
    other = models.load("tiny-bert", num_labels=2, seed=1)[0]
    with pytest.raises(ZooError) as e:
        zoo.check_base(other)
    assert zoo.index["fingerprint"] in str(e.value)
    assert lorakit.generate.zooindex.backbone_fingerprint(other) in str(e.value)
