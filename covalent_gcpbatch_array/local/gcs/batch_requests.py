"""Cloud Storage batch requests (``POST /batch/storage/v1``), taken apart and put together.

fake-gcs-server has a batch API of its own, but it answers otherwise than Cloud Storage: a
delete's part says ``200`` with the body ``null`` (Google's is ``204`` without a body, and
google-cloud-storage's parser cannot read the other), a part without a ``Content-ID`` (all of
google-cloud-storage's) gets no answer at all, uploads run inside a batch, there is no limit of
100 calls, and the calls meet neither the proxy's planned faults nor its Google-like checks
(preconditions under the object's lock, Google's error JSON). So the proxy (:mod:`.proxy`)
answers batch requests itself: it parses the multipart/mixed request into its parts
(:func:`parse_batch_request`), sends each call to fake-gcs-server as an ordinary request, and
composes the multipart/mixed answer (:func:`compose_batch_response`) the way Google documents
it (https://cloud.google.com/storage/docs/batch):

- each part of the answer is ``Content-Type: application/http``, in the order of the calls;
- a call whose part had ``Content-ID: <X>`` gets ``Content-ID: <response-X>`` (google-cloud-storage
  sends none, so its parts get none);
- the part's body is a whole HTTP response: status line, headers, a blank line, the body;
- the outer request's headers apply to every inner call, except its ``Content-*`` headers, and
  an inner call's own header wins over the outer one;
- all inner calls go to the JSON API (``/storage/v1/...``); no uploads or downloads;
- at most 100 calls per batch (:data:`MAX_BATCH_CALLS`).

What is refused, and how. A request that is not a multipart/mixed body closed by its close
delimiter, holds no part, or holds more than 100 is refused whole (:class:`BatchFormatError`, a
400; fake-gcs-server runs the parts of a body cut short before its close delimiter, and refuses
only the last, but a request cut short in transit should change nothing). A malformed part is
refused on its own (:class:`RefusedPart`, its part of the answer a 400), and the others run:
Google does not document which it does, and this is what fake-gcs-server's batch API does. A
part is malformed if its header block or its HTTP request's header block is not ended by an
empty line (the line end before the next ``--boundary`` belongs to that delimiter, RFC 2046
section 5.1.1, not to the part), if it is not ``Content-Type: application/http`` (a nested
multipart included), if its request line is not ``METHOD target HTTP/x.y`` or its header lines
not ``name: value`` (RFC 7230), if its body is shorter than its ``Content-Length``, or if its
call is not one of the JSON API's.

Line ends may be CRLF or bare LF, as in HTTP (RFC 7230 section 3.5) and in fake-gcs-server:
google-cloud-storage's ``email`` generator writes the whole request with bare LF.
"""

from __future__ import annotations

import dataclasses
import email.message
import http
import re
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
    "RefusedPart",
    "compose_batch_response",
    "inner_headers",
    "parse_batch_request",
]

#: The most calls Cloud Storage accepts in one batch request.
MAX_BATCH_CALLS = 100
#: The path of the batch endpoint, relative to the JSON API's base URL.
BATCH_PATH = "/batch/storage/v1"
# The JSON API's paths: the only ones a batch's calls may go to.
_JSON_API_PATH = "/storage/v1/"
# Outer headers that describe the outer message itself, so never apply to an inner call.
_NOT_INHERITED = (b"host", b"connection", b"keep-alive", b"transfer-encoding", b"accept-encoding")
_REQUEST_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) (\S+) HTTP/\d\.\d")


class BatchFormatError(ValueError):
    """The batch request is not one Cloud Storage would accept (answered with a 400)."""


class _MalformedPart(ValueError):
    """One part of the batch request is not one Cloud Storage would run."""


@dataclass(frozen=True)
class InnerRequest:
    """One call inside a batch request."""

    method: str  # the HTTP method, e.g. "DELETE"
    target: str  # path and query, as raw (still percent-encoded) as the client sent them
    headers: tuple[tuple[bytes, bytes], ...]  # the call's own headers, names lower-case
    body: bytes  # the call's body (empty for a delete)
    content_id: str | None  # the part's Content-ID without its <>, if it had one


@dataclass(frozen=True)
class RefusedPart:
    """A part of a batch request that is not a call Cloud Storage would run (its answer: 400)."""

    reason: str  # what is wrong with it, and the fix
    content_id: str | None  # the part's Content-ID without its <>, if it had a readable one


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


def _split_parts(boundary: str, body: bytes) -> list[bytes]:
    """The parts of a multipart body (RFC 2046 section 5.1.1), each without the line end that
    belongs to the delimiter after it.

    A delimiter is a line of ``--boundary``, or ``--boundary--`` for the last, then only
    white space; a line that merely starts with one is the part's content.

    :raises BatchFormatError: the body has no close delimiter
    """
    delimiter = b"\n--" + boundary.encode("latin-1")
    chunks = (b"\n" + body).split(delimiter)
    parts: list[bytes] = []
    content = chunks[0]  # what follows the last delimiter line (first: the preamble)
    in_part = False
    for chunk in chunks[1:]:
        line, _, rest = chunk.partition(b"\n")
        closing = line.startswith(b"--")
        if (line[2:] if closing else line).strip(b" \t\r"):
            content += delimiter + chunk  # not a delimiter line
            continue
        if in_part:
            parts.append(content.removesuffix(b"\r"))
        if closing:
            return parts
        content, in_part = rest, True
    raise BatchFormatError(
        f"the batch request's multipart body has no close delimiter (--{boundary}--): it was "
        "cut short, or its boundary is not the Content-Type's"
    )


def _split_head(block: bytes) -> tuple[list[bytes], bytes | None]:
    """Header lines and the rest, split at the first empty line (LF or CRLF).

    The rest is None if no empty line ends the header lines.
    """
    lines: list[bytes] = []
    rest = block
    while rest:
        line, newline, rest = rest.partition(b"\n")
        line = line.rstrip(b"\r")
        if not line and newline:
            return lines, rest
        lines.append(line)
    return lines, None


def _header_fields(lines: Iterable[bytes], where: str) -> list[tuple[bytes, bytes]]:
    fields = []
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not name.strip():
            raise _MalformedPart(f"malformed header line {line[:100]!r} in {where}")
        fields.append((name.strip().lower(), value.strip()))
    return fields


def _parse_call(part_headers: dict[bytes, bytes], http_request: bytes) -> InnerRequest:
    media_type = part_headers.get(b"content-type", b"").split(b";")[0].strip().lower()
    if media_type != b"application/http":
        raise _MalformedPart(
            f"it is Content-Type {media_type.decode('latin-1')!r}: each part of a batch "
            "request must be Content-Type: application/http, one HTTP request (no nesting)"
        )
    head, body = _split_head(http_request)
    if body is None:
        raise _MalformedPart(
            "its HTTP request's headers are not ended by an empty line: end them with a blank "
            "line of their own; the line end before the next --boundary belongs to the "
            "delimiter (RFC 2046 section 5.1.1)"
        )
    if not head or not (request_line := _REQUEST_LINE.fullmatch(head[0])):
        line = head[0][:100] if head else b""
        raise _MalformedPart(f"its request line {line!r} is not 'METHOD target HTTP/1.1'")
    method, url = request_line[1].decode("ascii"), request_line[2].decode("latin-1")
    # The client library sends absolute URLs; Google's guide, paths: accept both.
    split = urllib.parse.urlsplit(url)
    target = split.path + (f"?{split.query}" if split.query else "")
    if not target.startswith(_JSON_API_PATH) or ("alt", "media") in urllib.parse.parse_qsl(
        split.query
    ):
        raise _MalformedPart(
            f"its call {method} {url!r} is not one of the JSON API's ({_JSON_API_PATH}...): "
            "a batch holds no uploads, downloads or batches; send those on their own"
        )
    headers = _header_fields(head[1:], "its HTTP request")
    length = dict(headers).get(b"content-length")
    if length is not None:
        if not length.isdigit() or int(length) > len(body):
            raise _MalformedPart(
                f"its body has {len(body)} bytes, its Content-Length says {length!r}"
            )
        body = body[: int(length)]
    return InnerRequest(method, target, tuple(headers), body, None)


def _parse_part(number: int, part: bytes) -> InnerRequest | RefusedPart:
    content_id = None
    try:
        part_head, http_request = _split_head(part)
        part_headers = dict(_header_fields(part_head, "its part headers"))
        if raw_id := part_headers.get(b"content-id"):
            content_id = raw_id.decode("latin-1").strip("<>")
        if http_request is None:
            raise _MalformedPart("its part headers are not ended by an empty line")
        return dataclasses.replace(_parse_call(part_headers, http_request), content_id=content_id)
    except _MalformedPart as exc:
        named = f" (Content-ID {content_id})" if content_id is not None else ""
        return RefusedPart(f"part {number} of the batch request{named}: {exc}", content_id)


def parse_batch_request(content_type: str, body: bytes) -> list[InnerRequest | RefusedPart]:
    """The parts of a batch request, in order: each a call, or a part refused on its own.

    :param content_type: the outer request's Content-Type (multipart/mixed; boundary=...)
    :param body: the outer request's body
    :raises BatchFormatError: not a multipart/mixed body with its close delimiter, no parts,
        or more than :data:`MAX_BATCH_CALLS`
    """
    parts = _split_parts(_boundary_of(content_type), body)
    if not parts:
        raise BatchFormatError("the batch request holds no calls")
    if len(parts) > MAX_BATCH_CALLS:
        raise BatchFormatError(
            f"a batch request may hold at most {MAX_BATCH_CALLS} calls, this one holds "
            f"{len(parts)}: split it into several batch requests"
        )
    return [_parse_part(number, part) for number, part in enumerate(parts, 1)]


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
    answers: Sequence[tuple[InnerRequest | RefusedPart, InnerResponse]],
) -> tuple[bytes, bytes]:
    """The batch answer: its Content-Type header value and its body.

    :param answers: each part (a call, or a refused part) with its answer, in the order of the
        request
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
