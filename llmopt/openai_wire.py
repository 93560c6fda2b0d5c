"""The OpenAI wire shapes that every HTTP surface shares (the server over one engine,
the router over replicas): the error body, the bearer-key check and the
server-sent-event frame."""

from __future__ import annotations

import hmac
import json
from typing import Any


class APIError(Exception):
    """An error answered in the OpenAI shape: {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def sse(payload: dict[str, Any] | str) -> str:
    """One server-sent event: `data: <json or literal>` and a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def authorized(authorization: str, api_key: str | None) -> bool:
    """Whether an Authorization header is `Bearer <api_key>` (anything is, with no key)."""
    if api_key is None:
        return True
    scheme, _, token = authorization.partition(" ")
    # compare_digest takes the same time wherever the strings differ
    return scheme.lower() == "bearer" and hmac.compare_digest(
        token.strip().encode(), api_key.encode()
    )


def unauthorized() -> APIError:
    return APIError(
        401,
        "a valid API key is required: Authorization: Bearer KEY",
        type="authentication_error",
        code="invalid_api_key",
    )
