"""An HTTP error answered in OpenAI's shape, ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

from typing import Any, Optional


class APIError(Exception):
    """An error answered with ``status`` and OpenAI's body ``{"error": {...}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: Optional[str] = None,
        code: Optional[str] = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param, code=code)
