"""Errors in OpenAI's body ``{"error": {"message", "type", "param", "code"}}``; 429 and 503 carry Retry-After."""
from __future__ import annotations

from typing import Optional

import json

from starlette.responses import Response

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_exceeded", 499: "invalid_request_error", 500: "server_error", 503: "service_unavailable"}
RETRY_AFTER_SECONDS = 1  # 429 (queue full) and 503 (shutting down, engine stopped): retry soon


class APIError(Exception):
    """A request the server answers with ``status`` and an OpenAI error body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error_response(status: int, message: str, param: Optional[str] = None) -> Response:
    """OpenAI's error body (ASCII JSON, so any text a client sent can be echoed); 429 and 503 say when to retry."""
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": status}}
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status in (429, 503) else None
    return Response(json.dumps(body), status_code=status, headers=headers, media_type="application/json")
