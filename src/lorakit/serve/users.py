"""Per-user adapters: a request for the per-user model is served with the adapter its ``user`` field maps to.

The map is a JSON object from user id to adapter name (``users.json`` as ``lorakit per-user`` writes it), read
once at start-up and checked against the adapters the server has: a name it lacks is refused then, not at the
first request. Clients cannot change the map. An unknown user gets, as the operator chose, a 404 naming the
field (``error``), the base model (``base``), or a named shared adapter.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

from .errors import APIError

MAX_USER_CHARS = 256


class UserAdapters:
    """user id -> adapter name, the per-user model's id, and what unknown users get."""

    def __init__(self, users: dict[str, str], model_name: str = "per-user", unknown: str = "error"):
        self.users, self.model_name, self.unknown = dict(users), model_name, unknown

    @classmethod
    def load(cls, path: str | Path, adapters: Iterable[str], model_name: str = "per-user",
             unknown: str = "error") -> "UserAdapters":
        """Read ``path``; refuse entries (or an ``unknown`` fallback) naming adapters not in ``adapters``."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"--user-adapters {path}: no such file") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"--user-adapters {path}: not JSON ({e})") from None
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            raise ValueError(f"--user-adapters {path}: expected a JSON object of user id -> adapter name")
        known = set(adapters)
        missing = sorted({v for v in data.values() if v not in known})
        if missing:
            raise ValueError(f"--user-adapters {path}: {len(missing)} adapters are not served, e.g. {missing[:3]}; "
                             "pass the folder that holds them as --adapters")
        if unknown not in ("error", "base") and unknown not in known:
            raise ValueError(f"--unknown-user {unknown}: not 'error', 'base' or a served adapter")
        return cls(data, model_name, unknown)

    def adapter_for(self, user: Optional[str]) -> Optional[str]:
        """The adapter name for ``user`` (None: the base model); APIError 400/404 naming ``user``."""
        if user is None:
            raise APIError(400, f"the model '{self.model_name}' picks each user's adapter: send the 'user' field", "user")
        if user in self.users:
            return self.users[user]
        if self.unknown == "error":
            raise APIError(404, "no adapter for this user; ask the operator to add one", "user")
        return None if self.unknown == "base" else self.unknown
