"""Per-user adapters over loopback HTTP: the per-user model serves each request with its ``user``'s adapter (as
``lorakit per-user`` exports them), unknown users get what the operator chose, and the map is checked at start."""
import json

import httpx
import pytest
import torch

from lorakit.per_user import PersonalizedLoRA, export_users
from lorakit.per_user.crm import CRM
from lorakit.serve.users import UserAdapters

from serve_helpers import load_model
from test_serve_api import AUTH, ok, refused
from test_serve_http import BASE, LiveServer, make_engine

BODY = {"prompt": "Hello", "max_tokens": 5, "temperature": 0, "logprobs": 1, "ignore_eos": True}


@pytest.fixture(scope="module")
def users_dir(tmp_path_factory):
    model, _ = load_model(BASE)
    vectors = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    bank = PersonalizedLoRA(model, vectors, experts=2, r=2, target_modules=("q_proj", "v_proj"), seed=0)
    with torch.no_grad():
        for name, p in bank.named_parameters():
            if "lora_B" in name or name.startswith("gate"):
                p.normal_(0, 1.0, generator=torch.Generator().manual_seed(len(name)))
    crm = CRM(model=None, user_index={11: 0, 12: 1, 13: 2, 14: 3}, item_index={})
    return export_users(bank, crm, [11, 12, 13, 14], tmp_path_factory.mktemp("per-user") / "users")


def _server(users_dir, unknown):
    engine = make_engine(users_dir)
    users = UserAdapters.load(users_dir / "users.json", engine.store.names(), unknown=unknown)
    return LiveServer(engine, users=users)


@pytest.fixture(scope="module")
def live(users_dir):
    server = _server(users_dir, "error")
    yield server
    server.close()


def answer(live, **fields):
    choice = ok(live, {**BODY, **fields})["choices"][0]
    return choice["text"], choice["logprobs"]["token_logprobs"]


def test_each_user_gets_the_adapter_the_map_names(live):
    """Catches: the user field ignored (base or one adapter for all), the wrong user's adapter."""
    by_user = {u: answer(live, model="per-user", user=u) for u in ("11", "12", "14")}
    for u, got in by_user.items():
        assert got == answer(live, model=f"user-{u}")
    base = answer(live, model=BASE)
    assert len({json.dumps(v) for v in (*by_user.values(), base)}) == 4  # every user differs, and from the base
    models = httpx.get(live.url + "/v1/models", headers=AUTH, timeout=30).json()["data"]
    assert {"per-user", "user-11", BASE} <= {m["id"] for m in models}


def test_unknown_or_missing_user_is_refused_naming_the_field(live):
    refused(live, {**BODY, "model": "per-user", "user": "99"}, "user", status=404)
    refused(live, {**BODY, "model": "per-user"}, "user")
    refused(live, {**BODY, "model": "per-user", "user": "x" * 300}, "user")
    refused(live, {**BODY, "model": "per-user", "user": 11}, "user")


def test_unknown_users_fall_back_as_configured(users_dir):
    server = _server(users_dir, "base")
    try:
        assert answer(server, model="per-user", user="99") == answer(server, model=BASE)
    finally:
        server.close()
    server = _server(users_dir, "user-13")
    try:
        assert answer(server, model="per-user", user="99") == answer(server, model="user-13")
    finally:
        server.close()


def test_the_map_is_checked_at_start(tmp_path, users_dir):
    names = [f"user-{u}" for u in (11, 12, 13, 14)]
    with pytest.raises(FileNotFoundError, match="no such file"):
        UserAdapters.load(tmp_path / "none.json", names)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not JSON"):
        UserAdapters.load(tmp_path / "bad.json", names)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        UserAdapters.load(tmp_path / "list.json", names)
    with pytest.raises(ValueError, match="not served"):
        UserAdapters.load(users_dir / "users.json", names[:2])
    with pytest.raises(ValueError, match="--unknown-user nobody"):
        UserAdapters.load(users_dir / "users.json", names, unknown="nobody")
