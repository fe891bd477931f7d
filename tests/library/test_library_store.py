"""``Library``: entries round-trip, writes are atomic, a corrupt manifest and another base are refused by name."""
from __future__ import annotations

import json
import os

import pytest
import torch
from library_helpers import Net, save_adapter, snapshot

import lorakit
from lorakit.core import fingerprint
from lorakit.formats.peft import BASE_NAME
from lorakit.library import Library, LibraryError
from lorakit.library import manifest, store


@pytest.fixture
def lib(tmp_path):
    library = Library(tmp_path / "lib")
    library.add(save_adapter(tmp_path / "a", seed=1), name="alpha", description="first task", tags=["x", "y"],
                metrics={"accuracy": 0.9}, command="lorakit train --seed 1")
    return library


def _same_tensors(a, b):
    sa, sb = lorakit.load_state(a), lorakit.load_state(b)
    assert sa.modules() == sb.modules()
    for path in sa.modules():
        for k, t in sa.tensors[path].items():
            assert torch.equal(t, sb.tensors[path][k]), (path, k)


def test_round_trip(lib, tmp_path):
    lib.add(save_adapter(tmp_path / "b", seed=2), name="beta")
    again = Library(lib.root)  # a fresh object reads the same manifest
    assert again.names() == ["alpha", "beta"] and [e.name for e in again.list()] == ["alpha", "beta"]
    alpha = again.get("alpha")
    assert (alpha.description, alpha.tags, alpha.metrics, alpha.method) == ("first task", ("x", "y"), {"accuracy": 0.9}, "lora")
    record = json.loads((tmp_path / "a" / BASE_NAME).read_text())
    assert alpha.fingerprint == record["fingerprint"] == fingerprint.record(Net())["fingerprint"]
    assert alpha.provenance["source"] == str((tmp_path / "a").resolve())
    assert alpha.provenance["command"] == "lorakit train --seed 1" and alpha.provenance["created"].endswith("Z")
    _same_tensors(again.path_of("alpha"), tmp_path / "a")
    _same_tensors(again.path_of("beta"), tmp_path / "b")
    lorakit.load_peft(Net(), again.path_of("alpha"))  # the copy is an ordinary adapter directory
    folder = again.path_of("alpha")
    assert again.remove("alpha").name == "alpha"
    assert again.names() == ["beta"] and not folder.exists()
    with pytest.raises(LibraryError, match="no entry .alpha. in the library .*; entries: beta"):
        again.get("alpha")


def test_an_existing_name_is_refused_unless_overwrite(lib, tmp_path):
    old = lib.path_of("alpha")
    with pytest.raises(LibraryError, match="entry 'alpha' already exists.*overwrite"):
        lib.add(save_adapter(tmp_path / "c", seed=3), name="alpha")
    _same_tensors(lib.path_of("alpha"), tmp_path / "a")
    entry = lib.add(tmp_path / "c", name="alpha", description="replaced", overwrite=True)
    assert entry.description == "replaced" and lib.get("alpha").sha256 == entry.sha256 != ""
    _same_tensors(lib.path_of("alpha"), tmp_path / "c")
    assert not old.exists()  # the replaced copy is gone


def _crash(*_args, **_kwargs):
    raise KeyboardInterrupt("simulated crash")


@pytest.mark.parametrize("where", ["copy", "manifest"])
def test_a_crash_mid_add_leaves_the_library_as_it_was(lib, tmp_path, monkeypatch, where):
    before = snapshot(lib.root / manifest.MANIFEST, lib.path_of("alpha"))
    folders = sorted(p.name for p in (lib.root / store.ADAPTERS).iterdir())
    if where == "copy":  # dies after copying part of the adapter
        def partial(source, target):
            (target / "adapter_config.json").write_text((source / "adapter_config.json").read_text())
            _crash()
        monkeypatch.setattr(store, "copy_adapter", partial)
    else:  # dies at the manifest's rename, after the new folder is complete
        real = os.replace
        monkeypatch.setattr(manifest.os, "replace", lambda a, b: _crash() if str(b).endswith("manifest.json") else real(a, b))
    with pytest.raises(KeyboardInterrupt):
        lib.add(save_adapter(tmp_path / "d", seed=4), name="alpha", overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        lib.add(tmp_path / "d", name="delta")
    monkeypatch.undo()
    assert snapshot(lib.root / manifest.MANIFEST, lib.path_of("alpha")) == before
    assert Library(lib.root).names() == ["alpha"]
    _same_tensors(lib.path_of("alpha"), tmp_path / "a")
    if where == "copy":
        assert sorted(p.name for p in (lib.root / store.ADAPTERS).iterdir()) == folders  # the staged copy is removed


def test_leftovers_of_a_killed_writer_are_ignored_then_collected(lib, tmp_path):
    adapters = lib.root / store.ADAPTERS
    (adapters / ".staging-dead").mkdir()
    (adapters / ".staging-dead" / "adapter_config.json").write_text("{")
    (adapters / "ghost-0000").mkdir()  # renamed into place, but the manifest was never written
    (lib.root / ".manifest.json.tmp").write_text("{")
    assert Library(lib.root).names() == ["alpha"]
    lib.add(save_adapter(tmp_path / "e", seed=5), name="epsilon")
    left = sorted(p.name for p in adapters.iterdir())
    assert len(left) == 2 and all(n.startswith(("alpha-", "epsilon-")) for n in left), left


@pytest.mark.parametrize("text, message", [
    ('{"format": "lorakit-library", "version": 1, "entries": {', "not valid JSON (line 1"),
    ('[1, 2]', "not a lorakit library manifest"),
    ('{"format": "lorakit-library", "version": 7, "entries": {}}', "manifest version 7"),
    ('{"format": "lorakit-library", "version": 1, "entries": {"a": {"name": "a", "folder": "a-1", "method": "lora"}}}',
     "entry 'a': missing field 'base'"),
    ('{"format": "lorakit-library", "version": 1, "entries": {"a": {"name": "a", "folder": "a-1", "method": "lora", '
     '"base": {}, "tags": "x"}}}', "entry 'a': field 'tags' should be a list, found str"),
    ('{"format": "lorakit-library", "version": 1, "entries": {"a": {"name": "a", "folder": "../x", "method": "lora", '
     '"base": {}}}}', "not a path inside the library"),
])
def test_a_corrupt_manifest_is_an_error_naming_the_file(lib, tmp_path, text, message):
    file = lib.root / manifest.MANIFEST
    file.write_text(text)
    for call in (lib.list, lambda: lib.add(save_adapter(tmp_path / "f"), name="phi"), lambda: lib.remove("alpha")):
        with pytest.raises(LibraryError) as e:
            call()
        assert str(file) in str(e.value) and message in str(e.value), str(e.value)
    assert file.read_text() == text  # an unreadable manifest is never overwritten


def test_an_entry_for_another_base_is_refused_naming_both_fingerprints(lib, tmp_path):
    ours = fingerprint.record(Net())["fingerprint"]
    theirs = fingerprint.record(Net(seed=1))["fingerprint"]
    assert lib.path_of("alpha", base=Net()) == lib.path_of("alpha")  # the right base passes
    for base in (Net(seed=1), theirs, {"fingerprint": theirs}):
        with pytest.raises(LibraryError) as e:
            lib.path_of("alpha", base=base)
        assert ours in str(e.value) and theirs in str(e.value) and "'alpha'" in str(e.value), str(e.value)
    with pytest.raises(LibraryError, match=f"fingerprint {ours}.*fingerprint {theirs}"):
        lib.add(tmp_path / "a", name="again", base=Net(seed=1))  # the adapter's record disagrees with the base given


def test_heads_of_other_sizes_share_the_base_fingerprint(tmp_path):
    lib = Library(tmp_path / "lib")
    two = lib.add(save_adapter(tmp_path / "h2", modules_to_save=["classifier"]), name="h2")
    wide = Net()
    wide.classifier = torch.nn.Linear(4, 5)  # another head size: the same base apart from what the adapter brings
    model = lorakit.apply(wide, lorakit.LoRAConfig(r=2, target_modules=["q", "v"], modules_to_save=["classifier"]))
    five = lib.add(lorakit.save_peft(model, tmp_path / "h5"), name="h5")
    assert two.fingerprint == five.fingerprint
    assert two.base["replaced"] == ["classifier.bias", "classifier.weight"]
    lib.path_of("h2", base=wide)
    with pytest.raises(LibraryError, match="different weights"):
        lib.path_of("h2", base=Net(seed=2))


def test_an_adapter_without_a_base_record_needs_the_base(tmp_path):
    path = save_adapter(tmp_path / "p")
    (path / BASE_NAME).unlink()  # as peft writes it
    lib = Library(tmp_path / "lib")
    with pytest.raises(LibraryError, match="records no base model.*--model"):
        lib.add(path, name="p")
    assert not (tmp_path / "lib" / manifest.MANIFEST).exists()
    entry = lib.add(path, name="p", base=Net())
    assert entry.fingerprint == fingerprint.record(Net())["fingerprint"]
    assert (lib.path_of("p") / BASE_NAME).is_file() and not (path / BASE_NAME).exists()  # the source is untouched


def test_what_is_not_a_library_or_an_adapter_is_refused(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")
    with pytest.raises(LibraryError, match="holds todo.txt but no manifest.json"):
        Library(tmp_path / "notes").add(save_adapter(tmp_path / "a"), name="a")
    assert sorted(p.name for p in (tmp_path / "notes").iterdir()) == ["todo.txt"]
    with pytest.raises(LibraryError, match="no such library"):
        Library(tmp_path / "nowhere").list()
    with pytest.raises(LibraryError, match="not an adapter directory"):
        Library(tmp_path / "lib").add(tmp_path / "notes", name="n")
    for bad in ("../x", ".hidden", "a b", ""):
        with pytest.raises(LibraryError, match="entry name"):
            Library(tmp_path / "lib").add(tmp_path / "a", name=bad)
