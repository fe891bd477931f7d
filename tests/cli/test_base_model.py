"""Which base model an adapter records: a portable name, and a fingerprint that loading and merging check."""
from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch

import lorakit
from lorakit import zoo
from lorakit.cli import main
from lorakit.core import fingerprint
from lorakit.formats.peft import BASE_NAME, AdapterFileError

from trust_helpers import Net, one_line_error, save_adapter, snapshot, write_task


def _train(data, out, model):
    return main(["train", "--model", model, "--task", str(data), "--targets", "query,value", "-r", "2",
                 "--max-steps", "1", "--batch-size", "4", "--max-eval", "4", "--max-length", "16", "-o", str(out)])


def test_the_adapter_records_the_zoo_name_or_the_path_the_user_gave(tmp_path, capsys):
    data = write_task(tmp_path / "task.csv", n=16)
    given = str(zoo.minilm_dir())
    assert _train(data, tmp_path / "by_name", "minilm") == 0
    assert _train(data, tmp_path / "by_path", given) == 0
    capsys.readouterr()
    assert lorakit.load_state(tmp_path / "by_name" / "adapter").config.base_model_name_or_path == "minilm"
    assert lorakit.load_state(tmp_path / "by_path" / "adapter").config.base_model_name_or_path == given
    # a zoo name and a path to the same model are the same base: the records agree, and eval (which takes the
    # base model from the adapter when --model is not given) and merge accept them
    records = [json.loads((tmp_path / d / "adapter" / BASE_NAME).read_text()) for d in ("by_name", "by_path")]
    assert fingerprint.mismatch(*records) is None
    assert main(["eval", str(tmp_path / "by_path" / "adapter"), "--task", str(data), "--max-eval", "4"]) == 0
    assert "eval test" in capsys.readouterr().err  # the progress bar
    assert main(["merge", str(tmp_path / "by_name" / "adapter"), str(tmp_path / "by_path" / "adapter"),
                 "--method", "linear", "-o", str(tmp_path / "merged")]) == 0


def test_loading_onto_another_base_names_both_fingerprints_and_what_differs(tmp_path):
    path = save_adapter(tmp_path / "a", base_seed=0)
    recorded = json.loads((path / BASE_NAME).read_text())["fingerprint"]
    other = Net(seed=1)
    with pytest.raises(AdapterFileError) as e:
        lorakit.load_peft(other, path)
    msg = str(e.value)
    assert recorded in msg and fingerprint.record(Net(seed=1))["fingerprint"] in msg
    assert "different weights" in msg
    assert not lorakit.adapters(other)  # nothing was applied

    class Wider(Net):
        def __init__(self):
            super().__init__()
            self.q = torch.nn.Linear(8, 8, bias=False)

    wider = Wider()
    with pytest.raises(AdapterFileError, match="architecture Net vs Wider"):
        lorakit.load_peft(wider, path)
    assert not lorakit.adapters(wider) and isinstance(wider.q, torch.nn.Linear)  # the refused load is undone


def test_eval_or_resume_on_another_base_is_a_one_line_error(tmp_path, capsys):
    data = write_task(tmp_path / "task.csv", n=16)
    run = tmp_path / "run"
    assert _train(data, run, "tiny-bert") == 0
    capsys.readouterr()
    recorded = json.loads((run / "adapter" / BASE_NAME).read_text())["fingerprint"]
    assert main(["info", str(run / "adapter")]) == 0
    assert f"{recorded} (BertForSequenceClassification)" in capsys.readouterr().out
    assert main(["eval", str(run / "adapter"), "--task", str(data), "--seed", "1"]) == 2
    one_line_error(capsys, "made for base model tiny-bert (fingerprint", recorded, "but this model has fingerprint",
                   "different weights")
    before = snapshot(run)
    assert main(["train", "--model", "tiny-gpt2", "--task", str(data), "--targets", "query,value", "-r", "2",
                 "--max-steps", "1", "--batch-size", "4", "--max-eval", "4", "--max-length", "16", "-o", str(run),
                 "--resume"]) == 2
    one_line_error(capsys, "was trained on base model tiny-bert", recorded, "architecture BertForSequenceClassification")
    assert snapshot(run) == before


def test_the_same_base_in_another_precision_or_with_another_head_is_accepted(tmp_path):
    path = save_adapter(tmp_path / "a", modules_to_save=["classifier"])
    lorakit.load_peft(Net().to(torch.bfloat16), path)
    other_head = Net()
    torch.nn.init.normal_(other_head.classifier.weight)  # the adapter brings its own classifier
    lorakit.load_peft(other_head, path)


def test_a_base_mutating_initialiser_records_the_base_before_it_changed(tmp_path):
    model = lorakit.apply(Net(), lorakit.LoRAConfig(r=2, target_modules=["q", "v"], init_lora_weights="pissa"))
    path = lorakit.save_peft(model, tmp_path / "pissa")
    lorakit.load_peft(Net(), path)  # the untouched base: accepted
    with pytest.raises(AdapterFileError, match="fingerprint"):
        lorakit.load_peft(Net(seed=3), path)


def test_merge_refuses_adapters_of_different_bases_naming_both_fingerprints(tmp_path, capsys):
    a, b = save_adapter(tmp_path / "a", base_seed=0), save_adapter(tmp_path / "b", base_seed=1)
    fa, fb = (json.loads((p / BASE_NAME).read_text())["fingerprint"] for p in (a, b))
    assert main(["merge", str(a), str(b), "--method", "linear", "-o", str(tmp_path / "out")]) == 2
    one_line_error(capsys, "different base models", fa, fb, "different weights")
    assert not (tmp_path / "out").exists()


def test_peft_loads_the_adapter_without_warnings_about_our_record(tmp_path):
    path = save_adapter(tmp_path / "a")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft.PeftModel.from_pretrained(Net(), str(path))
    assert not [w for w in caught if "Unexpected" in str(w.message) or BASE_NAME in str(w.message)]


def test_saving_an_adapter_without_a_record_removes_a_stale_one(tmp_path):
    path = save_adapter(tmp_path / "a")
    lorakit.save_state(lorakit.load_state(path), path)
    assert not (path / BASE_NAME).exists()


@pytest.fixture
def r4_adapter(tmp_path):
    return save_adapter(tmp_path / "a", r=4)


def _edit_config(path, **changes):
    data = json.loads((path / "adapter_config.json").read_text())
    data.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(data))


def test_a_config_that_disagrees_with_the_tensors_is_refused_by_info_merge_and_load(r4_adapter, tmp_path, capsys):
    _edit_config(r4_adapter, r=8)
    before = snapshot(tmp_path)
    assert main(["info", str(r4_adapter)]) == 2
    one_line_error(capsys, "module 'q'", "gives rank 8, the tensors have rank 4")
    other = save_adapter(tmp_path / "b", r=4)
    assert main(["merge", str(r4_adapter), str(other), "--method", "linear", "-o", str(tmp_path / "out")]) == 2
    one_line_error(capsys, "gives rank 8, the tensors have rank 4")
    with pytest.raises(AdapterFileError, match="gives rank 8, the tensors have rank 4"):
        lorakit.load_peft(Net(), r4_adapter)
    assert snapshot(tmp_path / "a") == {k: v for k, v in before.items() if "/a/" in k}
    assert not (tmp_path / "out").exists()


def test_a_rank_pattern_that_disagrees_with_the_tensors_is_refused(r4_adapter, capsys):
    _edit_config(r4_adapter, rank_pattern={"v": 2})
    assert main(["info", str(r4_adapter)]) == 2
    one_line_error(capsys, "module 'v'", "gives rank 2")


def test_a_targeted_module_without_tensors_is_refused_by_load(r4_adapter):
    from safetensors.torch import load_file, save_file

    file = r4_adapter / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_file(str(file)).items() if ".v." not in k}
    save_file(tensors, str(file))
    with pytest.raises(ValueError, match="no tensors for: v"):
        lorakit.load_peft(Net(), r4_adapter)


def test_a_module_with_one_factor_is_refused_by_info(r4_adapter, capsys):
    from safetensors.torch import load_file, save_file

    file = r4_adapter / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(str(file)).items() if not k.endswith("v.lora_B.weight")}, str(file))
    assert main(["info", str(r4_adapter)]) == 2
    one_line_error(capsys, "module 'v'", "not both LoRA factors")


def test_save_peft_on_a_zoo_model_records_the_zoo_name_not_the_package_path(tmp_path):
    model, _ = zoo.load("minilm", task="seq_cls", num_labels=3)
    lorakit.apply(model, lorakit.LoRAConfig(r=2, target_modules=["query"]))
    lorakit.save_peft(model, tmp_path / "a")
    assert lorakit.load_state(tmp_path / "a").config.base_model_name_or_path == "minilm"
