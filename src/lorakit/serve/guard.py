"""The outermost ASGI layer: the API key on every request, and a cap on request bodies.

It wraps the whole application, so it runs before routing, middleware and path handling: the key check never
looks at the path (``//v1/models``, ``/v1/../v1/models``, ``%2e``, case, trailing slashes, HEAD or OPTIONS all
need the key, as do ``/health`` and ``/metrics``), and it does not depend on the middleware order of the
installed Starlette or FastAPI. The key is compared as SHA-256 digests with ``secrets.compare_digest``, so the
time taken does not depend on how much of the key a guess gets right, nor on its length. Bodies are read in full
(up to ``max_body`` bytes) before the application sees them; a larger one gets 413 without being read further.
"""
from __future__ import annotations

import hashlib
import secrets
from typing import Optional

from .errors import error_response


def key_digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def authorized(headers, digest: bytes) -> bool:
    """Exactly one ``Authorization: Bearer <key>`` header, whose key hashes to ``digest``."""
    values = [v for k, v in headers if k.lower() == b"authorization"]
    if len(values) != 1:
        return False
    scheme, _, token = values[0].partition(b" ")
    # compare even when the scheme is wrong, so the time taken does not tell which part failed
    same = secrets.compare_digest(key_digest(token.strip()), digest)
    return scheme.lower() == b"bearer" and same


class Guard:
    """ASGI wrapper: 401 without the key (when one is set), 413 for bodies over ``max_body`` bytes."""

    def __init__(self, app, api_key: Optional[str] = None, max_body: Optional[int] = None):
        self.app, self.max_body = app, max_body
        self.digest = key_digest(api_key.encode()) if api_key else None

    async def __call__(self, scope, receive, send):
        kind = scope["type"]
        if kind not in ("http", "websocket"):  # lifespan
            return await self.app(scope, receive, send)
        if self.digest is not None and not authorized(scope.get("headers", []), self.digest):
            if kind == "websocket":
                return await send({"type": "websocket.close", "code": 1008})
            response = error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")
            response.headers["WWW-Authenticate"] = "Bearer"
            return await response(scope, receive, send)
        if kind == "http" and self.max_body is not None:
            body = await self._read_body(scope, receive)
            if body is _GONE:
                return None
            if body is None:
                return await error_response(413, f"the request body is larger than this server's limit of "
                                                 f"{self.max_body:,} bytes")(scope, receive, send)
            receive = _replay(body, receive)
        return await self.app(scope, receive, send)

    async def _read_body(self, scope, receive) -> Optional[bytes]:
        """The whole body; None when it is (or says it will be) over the limit, ``_GONE`` if the client left."""
        for k, v in scope.get("headers", []):
            if k.lower() == b"content-length":
                try:
                    if int(v) > self.max_body:
                        return None
                except ValueError:
                    return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return _GONE
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


_GONE = b"<client gone>"


def _replay(body: bytes, receive):
    """A ``receive`` that gives the buffered body once, then the client's own messages (disconnects)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
