"""Cloud Storage batch requests (``POST /batch/storage/v1``), taken apart and put together.

fake-gcs-server has no batch endpoint, so the proxy (:mod:`.gcs_proxy`) answers it: it parses
the multipart/mixed request into its inner calls (:func:`parse_batch_request`), forwards each
one to fake-gcs-server as an ordinary request, and composes the multipart/mixed answer
(:func:`compose_batch_response`) the way Google documents it
(https://cloud.google.com/storage/docs/batch):

- each part of the answer is ``Content-Type: application/http``, in the order of the calls;
- a call whose part had ``Content-ID: <X>`` gets ``Content-ID: <response-X>`` (google-cloud-storage
  sends none, so its parts get none);
- the part's body is a whole HTTP response: status line, headers, a blank line, the body;
- the outer request's headers apply to every inner call, except its ``Content-*`` headers, and
  an inner call's own header wins over the outer one;
- at most 100 calls per batch (:data:`MAX_BATCH_CALLS`); more is a 400.

Parsing is lenient about line ends: google-cloud-storage's ``email`` generator writes the
multipart frame with bare LF and the inner request lines with CRLF.
"""

from __future__ import annotations

import email.message
import http
import secrets
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "BATCH_PATH",
    "MAX_BATCH_CALLS",
    "BatchFormatError",
    "InnerRequest",
    "InnerResponse",
    "compose_batch_response",
    "inner_headers",
    "parse_batch_request",
]

#: The most calls Cloud Storage accepts in one batch request.
MAX_BATCH_CALLS = 100
#: The path of the batch endpoint, relative to the JSON API's base URL.
BATCH_PATH = "/batch/storage/v1"
# Outer headers that describe the outer message itself, so never apply to an inner call.
_NOT_INHERITED = (b"host", b"connection", b"keep-alive", b"transfer-encoding", b"accept-encoding")


class BatchFormatError(ValueError):
    """The batch request is not one Cloud Storage would accept (answered with a 400)."""


@dataclass(frozen=True)
class InnerRequest:
    """One call inside a batch request."""

    method: str  # the HTTP method, e.g. "DELETE"
    target: str  # path and query, as raw (still percent-encoded) as the client sent them
    headers: tuple[tuple[bytes, bytes], ...]  # the call's own headers, names lower-case
    body: bytes  # the call's body (empty for a delete)
    content_id: str | None  # the part's Content-ID without its <>, if it had one


@dataclass(frozen=True)
class InnerResponse:
    """The answer to one call, as it goes into the batch answer."""

    status: int  # the HTTP status code
    headers: tuple[tuple[bytes, bytes], ...]  # response headers (framing ones are redone)
    body: bytes  # the response body


def _boundary_of(content_type: str) -> str:
    message = email.message.Message()
    message["content-type"] = content_type
    boundary = message.get_boundary()
    if message.get_content_type() != "multipart/mixed" or not boundary:
        raise BatchFormatError(
            f"a batch request must be multipart/mixed with a boundary, got {content_type!r}"
        )
    return boundary


def _split_head(block: bytes) -> tuple[list[bytes], bytes]:
    """Header lines and the rest, split at the first empty line (LF or CRLF)."""
    lines: list[bytes] = []
    rest = block
    while rest:
        line, newline, rest = rest.partition(b"\n")
        line = line.rstrip(b"\r")
        if not line:
            return lines, rest
        lines.append(line)
        if not newline:
            break
    return lines, b""


def _header_fields(lines: Iterable[bytes]) -> list[tuple[bytes, bytes]]:
    fields = []
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not name.strip():
            raise BatchFormatError(f"malformed header line {line[:100]!r} in a batch part")
        fields.append((name.strip().lower(), value.strip()))
    return fields


def _parse_call(part: bytes) -> InnerRequest:
    part_head, http_request = _split_head(part)
    part_headers = dict(_header_fields(part_head))
    if part_headers.get(b"content-type", b"").split(b";")[0].strip() != b"application/http":
        raise BatchFormatError(
            "each part of a batch request must be Content-Type: application/http"
        )
    content_id = part_headers.get(b"content-id")
    head, body = _split_head(http_request)
    if not head:
        raise BatchFormatError("a part of the batch request holds no HTTP request")
    request_line = head[0].decode("latin-1").split()
    if len(request_line) not in (2, 3):
        raise BatchFormatError(f"malformed request line {head[0][:100]!r} in a batch part")
    method, url = request_line[0].upper(), request_line[1]
    # The client library sends absolute URLs; Google's guide, paths: accept both.
    split = urllib.parse.urlsplit(url)
    target = split.path + (f"?{split.query}" if split.query else "")
    if not target.startswith("/"):
        raise BatchFormatError(f"the call {method} {url!r} in a batch names no path")
    headers = _header_fields(head[1:])
    length = dict(headers).get(b"content-length")
    if length is not None and length.isdigit():
        body = body[: int(length)]
    return InnerRequest(
        method=method,
        target=target,
        headers=tuple(headers),
        body=body,
        content_id=content_id.decode("latin-1").strip("<>") if content_id else None,
    )


def parse_batch_request(content_type: str, body: bytes) -> list[InnerRequest]:
    """The calls of a batch request, in order.

    :param content_type: the outer request's Content-Type (multipart/mixed; boundary=...)
    :param body: the outer request's body
    :raises BatchFormatError: not a multipart/mixed batch, a malformed part, no calls, or more
        than :data:`MAX_BATCH_CALLS`
    """
    delimiter = b"\n--" + _boundary_of(content_type).encode("latin-1")
    chunks = (b"\n" + body).split(delimiter)
    calls = []
    closed = False
    for chunk in chunks[1:]:
        # What follows the delimiter on its line: "--" closes; anything else is padding.
        line, _, part = chunk.partition(b"\n")
        if line.startswith(b"--"):
            closed = True
            break
        calls.append(_parse_call(part.removesuffix(b"\r")))
    if not closed:
        raise BatchFormatError("the batch request's multipart body has no closing boundary")
    if not calls:
        raise BatchFormatError("the batch request holds no calls")
    if len(calls) > MAX_BATCH_CALLS:
        raise BatchFormatError(
            f"a batch request may hold at most {MAX_BATCH_CALLS} calls, this one holds "
            f"{len(calls)}: split it into several batch requests"
        )
    return calls


def inner_headers(
    outer: Iterable[tuple[bytes, bytes]], call: InnerRequest
) -> list[tuple[bytes, bytes]]:
    """The headers one call is forwarded with: the outer ones it inherits, then its own.

    ``Content-Length`` is set from the call's body; ``Accept-Encoding`` is dropped, so that
    each answer comes back as plain bytes to put into the batch answer.
    """
    own = {name for name, _ in call.headers}
    headers = [
        (name.lower(), value)
        for name, value in outer
        if name.lower() not in own
        and name.lower() not in _NOT_INHERITED
        and not name.lower().startswith(b"content-")
    ]
    headers += [
        (name, value)
        for name, value in call.headers
        if name not in _NOT_INHERITED and name != b"content-length"
    ]
    headers.append((b"content-length", b"%d" % len(call.body)))
    return headers


def compose_batch_response(
    answers: Sequence[tuple[InnerRequest, InnerResponse]],
) -> tuple[bytes, bytes]:
    """The batch answer: its Content-Type header value and its body.

    :param answers: each call with its answer, in the order of the request
    """
    boundary = b"batch_" + secrets.token_hex(12).encode()
    body = bytearray()
    for call, answer in answers:
        body += b"--" + boundary + b"\r\nContent-Type: application/http\r\n"
        if call.content_id is not None:
            body += b"Content-ID: <response-" + call.content_id.encode("latin-1") + b">\r\n"
        try:
            reason = http.HTTPStatus(answer.status).phrase.encode()
        except ValueError:
            reason = b"Unknown"
        body += b"\r\nHTTP/1.1 %d %s\r\n" % (answer.status, reason)
        for name, value in answer.headers:
            if name.lower() not in (b"content-length", b"transfer-encoding", b"connection"):
                body += name + b": " + value + b"\r\n"
        body += b"Content-Length: %d\r\n\r\n" % len(answer.body)
        body += answer.body + b"\r\n"
    body += b"--" + boundary + b"--\r\n"
    return b"multipart/mixed; boundary=" + boundary, bytes(body)
