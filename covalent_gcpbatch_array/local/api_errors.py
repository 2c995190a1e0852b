"""Google API errors as the Batch emulator raises and answers them.

Google's REST APIs answer a refused call with an HTTP status and a body of the form
``{"error": {"code": 404, "message": "...", "status": "NOT_FOUND", "details": [...]}}``;
``google.api_core`` turns that into ``NotFound``, ``InvalidArgument``, ``ServiceUnavailable`` and
so on. The emulator's state raises :class:`ApiError` and its HTTP layer renders it with
:meth:`ApiError.to_json`, so the real client sees exactly what Google would send; the gRPC front
end sends the status name's gRPC code.

An HTTP status does not name the error alone: Google answers 400 for INVALID_ARGUMENT,
FAILED_PRECONDITION and OUT_OF_RANGE alike (``google/rpc/code.proto``), so an error may carry
its status name; without one it gets the usual name of its HTTP status (:data:`STATUS_NAMES`).
:func:`error_response` renders one for the REST front ends (Batch and Logging), which read a
request's body with :func:`json_object`.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

__all__ = ["HTTP_STATUSES", "STATUS_NAMES", "ApiError", "error_response", "json_object"]

#: google.rpc.Code name -> the HTTP status Google's REST APIs answer it with (code.proto).
HTTP_STATUSES: dict[str, int] = {
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "UNAUTHENTICATED": 401,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
}

#: HTTP status -> the google.rpc.Code name an error of that status has unless it names its own
#: (412 is Cloud Storage's failed ``ifGenerationMatch``, FAILED_PRECONDITION in gRPC terms).
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
    :param status: the google.rpc.Code name, when not the usual one of ``code`` (e.g.
        ``FAILED_PRECONDITION``, a 400 too)
    :param field: the request field at fault, reported as a ``BadRequest`` field violation
    :param reason: an ``ErrorInfo`` reason (e.g. ``RATE_LIMIT_EXCEEDED``)
    :raises ValueError: ``code`` has no status name, or ``status`` is not one Google answers
        with ``code``
    """

    def __init__(
        self,
        code: int,
        message: str,
        *,
        status: str | None = None,
        field: str | None = None,
        reason: str | None = None,
    ) -> None:
        if code not in STATUS_NAMES:
            raise ValueError(
                f"HTTP status {code} has no Google status name; use one of {sorted(STATUS_NAMES)}"
            )
        if status is not None and HTTP_STATUSES.get(status) != code:
            named = sorted(name for name, http in HTTP_STATUSES.items() if http == code)
            raise ValueError(
                f"Google does not answer {status!r} with HTTP {code}; with {code} use one of "
                f"{named}"
            )
        super().__init__(message)
        self.code = code
        self.status = status or STATUS_NAMES[code]
        self.message = message
        self.field = field
        self.reason = reason

    @classmethod
    def invalid_argument(cls, field: str, message: str) -> ApiError:
        """A 400 INVALID_ARGUMENT about ``field``; the message is prefixed with the field name."""
        return cls(400, f"Invalid value for field '{field}': {message}", field=field)

    @classmethod
    def failed_precondition(cls, message: str) -> ApiError:
        """A 400 FAILED_PRECONDITION: the resource is not in a state the call needs."""
        return cls(400, message, status="FAILED_PRECONDITION")

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


def error_response(exc: ApiError) -> JSONResponse:
    """The REST answer to a refused call: Google's error body, with its HTTP status."""
    return JSONResponse(exc.to_json(), status_code=exc.code)


async def json_object(request: Request, what: str) -> dict[str, Any]:
    """The request's body, a JSON object (an empty body is ``{}``).

    :param what: the request message, for the error (e.g. ``ListLogEntriesRequest``)
    :raises ApiError: 400, the body is not JSON or not an object
    """
    raw = await request.body()
    try:
        body = json.loads(raw or b"{}")
    except ValueError as exc:
        raise ApiError(400, f"the request body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object ({what}), got {body!r:.80}")
    return body
