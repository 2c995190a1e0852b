"""Google API errors as the Batch emulator raises and answers them.

Google's REST APIs answer a refused call with an HTTP status and a body of the form
``{"error": {"code": 404, "message": "...", "status": "NOT_FOUND", "details": [...]}}``;
``google.api_core`` turns that into ``NotFound``, ``InvalidArgument``, ``ServiceUnavailable`` and
so on. The emulator's state raises :class:`ApiError` and its HTTP layer renders it with
:meth:`ApiError.to_json`, so the real client sees exactly what Google would send.
"""

from __future__ import annotations

from typing import Any

__all__ = ["STATUS_NAMES", "ApiError"]

# HTTP status -> google.rpc.Code name, as Google's REST APIs pair them.
STATUS_NAMES: dict[int, str] = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ALREADY_EXISTS",
    412: "FAILED_PRECONDITION",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

_BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"
_ERROR_INFO_TYPE = "type.googleapis.com/google.rpc.ErrorInfo"


class ApiError(Exception):
    """A call the emulator refuses, with the HTTP status and message Google would give.

    :param code: the HTTP status (a key of :data:`STATUS_NAMES`)
    :param message: what went wrong and how to fix it
    :param field: the request field at fault, reported as a ``BadRequest`` field violation
    :param reason: an ``ErrorInfo`` reason (e.g. ``RATE_LIMIT_EXCEEDED``)
    """

    def __init__(
        self, code: int, message: str, *, field: str | None = None, reason: str | None = None
    ) -> None:
        if code not in STATUS_NAMES:
            raise ValueError(
                f"HTTP status {code} has no Google status name; use one of {sorted(STATUS_NAMES)}"
            )
        super().__init__(message)
        self.code = code
        self.status = STATUS_NAMES[code]
        self.message = message
        self.field = field
        self.reason = reason

    @classmethod
    def invalid_argument(cls, field: str, message: str) -> ApiError:
        """A 400 INVALID_ARGUMENT about ``field``; the message is prefixed with the field name."""
        return cls(400, f"Invalid value for field '{field}': {message}", field=field)

    @classmethod
    def not_found(cls, message: str) -> ApiError:
        """A 404 NOT_FOUND."""
        return cls(404, message)

    @classmethod
    def already_exists(cls, message: str) -> ApiError:
        """A 409 ALREADY_EXISTS."""
        return cls(409, message)

    @classmethod
    def resource_exhausted(cls, message: str) -> ApiError:
        """A 429 RESOURCE_EXHAUSTED, as a quota refusal."""
        return cls(429, message, reason="RATE_LIMIT_EXCEEDED")

    def to_json(self) -> dict[str, Any]:
        """The error body Google's REST APIs send."""
        details: list[dict[str, Any]] = []
        if self.field is not None:
            details.append(
                {
                    "@type": _BAD_REQUEST_TYPE,
                    "fieldViolations": [{"field": self.field, "description": self.message}],
                }
            )
        if self.reason is not None:
            details.append(
                {"@type": _ERROR_INFO_TYPE, "reason": self.reason, "domain": "googleapis.com"}
            )
        body: dict[str, Any] = {"code": self.code, "message": self.message, "status": self.status}
        if details:
            body["details"] = details
        return {"error": body}
