"""MovieLens reading and splitting, the CRM, and the long-short retriever."""
from __future__ import annotations

import pytest
import torch

from lorakit.per_user import auc, read, short_history, train_crm
from lorakit.per_user.crm import CRM, MatrixFactorization
from lorakit.per_user.movielens import Event


def test_read_labels_and_splits_by_time(movielens_dir):
    data = read(movielens_dir, valid_per_user=1, test_per_user=2)
    assert len(data.users) == 24 and len(data.test) == 48 and len(data.validation) == 24
    assert len(data.train) == 24 * 12 - 72
    for user, events in data.by_user.items():
        assert [e.time for e in events] == sorted(e.time for e in events)
        assert {e for e in data.test if e.user == user} == set(events[-2:])  # the latest events are test
        assert [e for e in data.validation if e.user == user] == [events[-3]]
    assert {e.label for e in data.train} == {0, 1}  # ratings 5 -> like, 2 -> dislike
    first_test = next(e for e in data.test if e.user == 1)
    assert data.history(first_test) == data.by_user[1][:10]
    assert data.movies[1].genres == ("Action",)


def test_read_errors_name_the_file(tmp_path, movielens_dir):
    with pytest.raises(FileNotFoundError, match="ml-100k.inter.*make data"):
        read(tmp_path)
    (movielens_dir / "ml-100k.item").write_text("no header here\n")
    with pytest.raises(ValueError, match="ml-100k.item.*tab-separated"):
        read(movielens_dir)


def test_too_few_events_per_user_is_refused(movielens_dir):
    with pytest.raises(ValueError, match="user 1 has 12 events"):
        read(movielens_dir, valid_per_user=5, test_per_user=7)


def test_crm_learns_the_taste_groups(movielens_dir):
    data = read(movielens_dir)
    crm = train_crm(data.train, list(data.movies), dim=4, epochs=300, seed=0)
    assert auc(crm.scores(data.test), [e.label for e in data.test]) > 0.9
    with pytest.raises(KeyError, match="999"):
        crm.users_vectors([999])


def test_auc_matches_pairwise_definition():
    scores = torch.tensor([0.9, 0.1, 0.5, 0.5, 0.3])
    labels = [1, 0, 1, 0, 0]
    pairs = [(p, n) for p in (0, 2) for n in (1, 3, 4)]
    expected = sum(1.0 if scores[p] > scores[n] else 0.5 if scores[p] == scores[n] else 0.0 for p, n in pairs) / 6
    assert auc(scores, labels) == pytest.approx(expected)
    with pytest.raises(ValueError, match="both"):
        auc(scores[:2], [1, 1])


def _crm_with_items(vectors: dict[int, list[float]]) -> CRM:
    model = MatrixFactorization(1, len(vectors), 2)
    index = {item: k for k, item in enumerate(sorted(vectors))}
    with torch.no_grad():
        for item, k in index.items():
            model.item.weight[k] = torch.tensor(vectors[item])
    return CRM(model, {0: 0}, index)


def test_short_history_keeps_the_most_relevant_in_time_order():
    crm = _crm_with_items({1: [1, 0], 2: [0, 1], 3: [0.9, 0.1], 4: [0.1, 0.9], 5: [1, 0.05]})
    history = [Event(0, item, 1, t) for t, item in enumerate((1, 2, 3, 4))]
    shown = short_history(history, candidate=5, k=2, crm=crm)
    assert [e.item for e in shown] == [1, 3]
    assert [e.item for e in short_history(history, 5, 2, strategy="recent")] == [3, 4]
    assert short_history(history, 5, 0, crm=crm) == []
    assert short_history(history[:1], 5, 3, crm=crm) == history[:1]
    with pytest.raises(ValueError, match="crm="):
        short_history(history, 5, 2)
    with pytest.raises(ValueError, match="strategy"):
        short_history(history, 5, 2, crm=crm, strategy="random")


def test_cli_trains_and_exports_every_user(movielens_dir, tmp_path, capsys):
    from lorakit.cli import main

    out = tmp_path / "out"
    code = main(["per-user", "-o", str(out), "--model", "tiny-bert", "--data", str(movielens_dir), "--events", "64",
                 "--steps", "4", "--experts", "2", "--rank", "2", "--history", "2"])
    assert code == 0
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["users"] == 24 and 0.0 <= summary["bank_test_auc"] <= 1.0
    assert len(json.loads((out / "users" / "users.json").read_text())) == 24
    assert main(["per-user", "-o", str(out), "--model", "tiny-bert", "--data", str(movielens_dir)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["per-user", "-o", str(tmp_path / "x"), "--data", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and err.count("\n") == 1 and not (tmp_path / "x").exists()


def test_cli_keeps_every_user_in_a_library(movielens_dir, tmp_path, capsys):
    import json

    from lorakit.cli import main
    from lorakit.library import Library

    args = ["per-user", "--model", "tiny-bert", "--data", str(movielens_dir), "--events", "32", "--steps", "2",
            "--experts", "2", "--rank", "2", "--history", "1", "--library", str(tmp_path / "lib")]
    assert main(args + ["-o", str(tmp_path / "out")]) == 0
    users = json.loads((tmp_path / "out" / "users" / "users.json").read_text())
    lib = Library(tmp_path / "lib")
    entries = {e.name: e for e in lib.list()}
    assert set(entries) == set(users.values()) and len(entries) == 24
    assert all(list(e.tags) == ["user"] for e in entries.values())
    for user, name in list(users.items())[:3]:  # the library's copy is the exported adapter
        assert (lib.path_of(name) / "adapter_model.safetensors").read_bytes() == \
            (tmp_path / "out" / "users" / name / "adapter_model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(args + ["-o", str(tmp_path / "again")]) == 2  # the names are taken: refused, nothing replaced
    err = capsys.readouterr().err
    assert "already holds 24 of these users' entries" in err and err.count("\n") == 1

