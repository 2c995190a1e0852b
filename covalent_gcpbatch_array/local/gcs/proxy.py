"""A fault-injecting HTTP proxy in front of fake-gcs-server: ``python -m ...local.gcs.proxy``.

With ``LocalCloud(gcs_faults=True)`` every Cloud Storage request, the executor's and the tasks',
goes through this proxy, which forwards it to fake-gcs-server unchanged unless a planned fault
matches it. A fault is "the next ``count`` requests whose method is M and whose path contains P":

- ``status=503`` (or 500, 429, ...): answer with Google's error JSON instead of forwarding;
- ``drop=True``: close the connection without answering (the request never arrives);
- ``lose_answer=True``: forward the request (the write *happens*), then replace the answer
  with the error status, or with ``drop`` send half of it and close: the client learns nothing;
- ``corrupt=True``: forward the request and pass the answer on with one byte of its body
  flipped (bit rot in transit: the client's checksum check, if any, must catch it).

Batch requests (``POST /batch/storage/v1``, up to 100 calls in one multipart/mixed request)
are answered here (:mod:`.batch_requests`), not by fake-gcs-server's own batch API, which
answers a delete ``200 null`` and a part without a ``Content-ID`` not at all: each call goes to
fake-gcs-server as a request of its own, on the same kept-alive connections as every
forwarded request, meets the checks below and the planned faults as one (a ``drop`` loses the
whole batch's answer); a fault can also hit the batch request itself (``method="POST",
path="/batch/"``). A malformed batch is refused with 400, a malformed part with its part's 400.

Where fake-gcs-server answers otherwise than Cloud Storage, the proxy answers as Google does: an
upload whose declared CRC32C or MD5 does not match its bytes is refused with 400
(:mod:`.checksums`; a resumable upload sent in chunks is checked against what fake-gcs-server
stored once it completes, and the object deleted if they differ), an object DELETE answers 204
without a body (in batch requests too), and a request whose precondition
(``ifGenerationMatch`` and the three others) does not hold is refused with 412 (304 for a
read), on every kind of upload, read and delete (:mod:`.preconditions`): the check and the
write it guards hold a lock on the object's name, so of two concurrent creates only one
succeeds. A resumable upload's conditions are checked when it completes (its
session URL carries them, as Google's does).

Process contract (like the Batch emulator's)::

    python -m covalent_gcpbatch_array.local.gcs.proxy --upstream http://127.0.0.1:G \\
        [--host 127.0.0.1] [--port 0]

prints one JSON line ``{"endpoint": "http://127.0.0.1:PORT", "pid": PID}`` once it serves;
logs (one line per injected fault) go to stderr; SIGTERM or SIGINT stop it. Its admin API
lives under ``/_proxy/``: ``POST /_proxy/faults`` (plan), ``DELETE /_proxy/faults`` (forget
the plan), ``GET /_proxy/stats``.

It is its own process, not a thread of the test or of the Batch emulator: the executor under
test and the tasks (other processes) both reach it, a 100 MB body does not compete for the
GIL with the executor it is testing, and LocalCloud starts and stops it with the same
plumbing as the other two servers. The client side's HTTP/1.1 framing is h11's (keep-alive,
chunked bodies); requests to fake-gcs-server go through httpcore's connection pool, which keeps
a connection alive only when its exchange was read to the end. Bodies stream through in chunks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import sys
import urllib.parse
from collections import Counter, deque
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import h11
import httpcore

from covalent_gcpbatch_array.local.gcs.batch_requests import (
    BATCH_PATH,
    BatchFormatError,
    InnerRequest,
    InnerResponse,
    RefusedPart,
    compose_batch_response,
    inner_headers,
    parse_batch_request,
)
from covalent_gcpbatch_array.local.gcs.checksums import (
    HashHeaderError,
    declared_in_header,
    multipart_parts,
    stored_mismatch,
    upload_mismatch,
)
from covalent_gcpbatch_array.local.gcs.preconditions import (
    NOT_MET_MESSAGE,
    ObjectKey,
    ObjectLocks,
    ObjectState,
    conditions_in,
    failed_status,
    is_final_chunk,
    object_of,
    unsupported,
)

__all__ = ["ProxyStats", "StorageFault", "StorageFaults", "main", "serve"]

logger = logging.getLogger("covalent_gcpbatch_array.local.gcs.proxy")

#: Methods a fault can name; ``*`` matches any.
FAULT_METHODS = ("*", "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
_ADMIN_PREFIX = "/_proxy/"
_CHUNK = 256 * 1024  # bytes read from a socket at a time
_MAX_HEAD = 64 * 1024  # largest request or response head h11 accepts
_FAULT_LOG = 200  # how many faulted requests the stats remember
_IDLE_CONNECTIONS = 32  # kept-alive upstream connections kept for reuse, at most
#: What httpcore raises when fake-gcs-server cannot be reached or breaks off an answer.
_UPSTREAM_ERRORS = (
    OSError,
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.TimeoutException,
)
_UPLOAD_NAME = re.compile(rb'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')  # in an upload's metadata
#: Uploads whose body (small: metadata, or metadata and data) the proxy reads ahead for the name.
_NAMED_IN_BODY = re.compile(r"[?&]uploadType=(multipart|resumable)(&|$)")
_READS = ("GET", "HEAD")
_REASONS = {
    400: "badRequest",
    401: "required",
    403: "forbidden",
    404: "notFound",
    408: "requestTimeout",
    409: "conflict",
    412: "conditionNotMet",
    429: "rateLimitExceeded",
    500: "backendError",
    502: "badGateway",
    503: "backendError",
    504: "gatewayTimeout",
}


@dataclass(frozen=True)
class StorageFault:
    """What one faulted request gets."""

    method: str  # the HTTP method it matches, or "*"
    path: str  # a substring of the decoded path and query it must contain ("" matches all)
    status: int  # the HTTP status answered (unused when dropping)
    drop: bool  # close the connection instead of answering
    lose_answer: bool  # forward the request first: it takes effect, only the answer is lost
    corrupt: bool = False  # forward it, and flip one byte of the answer's body

    def matches(self, method: str, target: str) -> bool:
        """Whether a request ``method target`` (target decoded) is one this fault hits."""
        return self.method in ("*", method) and self.path in target


class StorageFaults:
    """The planned faults, each used once, first planned first used."""

    def __init__(self) -> None:
        self._planned: deque[StorageFault] = deque()  # in the order they were planned

    def add(
        self,
        *,
        method: str = "*",
        status: int = 503,
        count: int = 1,
        drop: bool = False,
        path: str = "",
        lose_answer: bool = False,
        corrupt: bool = False,
    ) -> None:
        """Plan that the next ``count`` matching requests fail.

        :raises ValueError: an unknown method, a status that is not an HTTP error, count < 0
        """
        method = str(method).upper()
        if method not in FAULT_METHODS:
            raise ValueError(f"method {method!r} is not one of {', '.join(FAULT_METHODS)}")
        if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
            raise ValueError(f"status must be an HTTP error status (400-599), got {status!r}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"count must be an integer >= 0, got {count!r}")
        if not isinstance(path, str):
            raise ValueError(f"path must be a string, got {path!r}")
        fault = StorageFault(method, path, status, bool(drop), bool(lose_answer), bool(corrupt))
        self._planned.extend([fault] * count)

    def take(self, method: str, target: str) -> StorageFault | None:
        """The fault this request gets (removed from the plan), or None to forward it."""
        for position, fault in enumerate(self._planned):
            if fault.matches(method, target):
                del self._planned[position]
                return fault
        return None

    def clear(self) -> int:
        """Forget every planned fault; returns how many there were."""
        count = len(self._planned)
        self._planned.clear()
        return count

    def pending(self) -> int:
        """How many planned faults are left."""
        return len(self._planned)


@dataclass
class ProxyStats:
    """What the proxy counts (admin requests excluded)."""

    requests: Counter[str] = field(default_factory=Counter)  # method -> requests received
    forwarded: int = 0  # requests that reached fake-gcs-server
    failed: int = 0  # requests answered with an injected error status
    dropped: int = 0  # connections closed by an injected drop
    answers_lost: int = 0  # of those failed or dropped: requests forwarded first
    corrupted: int = 0  # answers passed on with a flipped byte
    batches: int = 0  # batch requests answered (their calls count as requests of their own)
    refused: int = 0  # refused here as Google would: a checksum that does not match, a
    # malformed part of a batch request
    conditions_not_met: int = 0  # requests answered 412 or 304: a precondition did not hold
    faulted: deque[str] = field(default_factory=lambda: deque(maxlen=_FAULT_LOG))  # recent hits

    def to_json(self, pending: int) -> dict[str, Any]:
        return {
            "requests": dict(self.requests),
            "forwarded": self.forwarded,
            "failed": self.failed,
            "dropped": self.dropped,
            "answers_lost": self.answers_lost,
            "corrupted": self.corrupted,
            "batches": self.batches,
            "refused": self.refused,
            "conditions_not_met": self.conditions_not_met,
            "pending": pending,
            "faulted": list(self.faulted),
        }


class _Closed(Exception):
    """The peer went away (or broke the protocol) mid-exchange: drop the connection."""


class _Peer:
    """One side of a proxied exchange: a byte stream and its h11 state machine."""

    def __init__(self, stream: anyio.abc.ByteStream, role: Any) -> None:
        self.stream = stream
        self.conn = h11.Connection(role, max_incomplete_event_size=_MAX_HEAD)

    async def next_event(self) -> Any:
        """The next h11 event, reading from the socket as needed.

        :raises _Closed: the peer closed the connection or sent something h11 refuses
        """
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise _Closed(str(exc)) from exc
            if event is not h11.NEED_DATA:
                if isinstance(event, h11.ConnectionClosed):
                    raise _Closed("connection closed")
                return event
            try:
                data = await self.stream.receive(_CHUNK)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                data = b""
            self.conn.receive_data(data)

    async def send(self, *events: Any) -> None:
        """Send h11 events in one write (fewer segments, fewer wakeups on the other side).

        :raises _Closed: the peer is gone
        """
        try:
            data = b"".join(self.conn.send(event) or b"" for event in events)
            if data:
                await self.stream.send(data)
        except (h11.LocalProtocolError, anyio.BrokenResourceError, anyio.ClosedResourceError) as e:
            raise _Closed(str(e)) from e


class GcsProxy:
    """Forwards HTTP/1.1 requests to ``upstream``, failing the planned ones.

    :param upstream: fake-gcs-server's base URL, ``http://host:port``
    """

    def __init__(self, upstream: str) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        if parsed.scheme != "http" or not parsed.hostname or not parsed.port:
            raise ValueError(f"upstream must be http://HOST:PORT, got {upstream!r}")
        self.upstream = upstream.rstrip("/")
        self._upstream_host: str = parsed.hostname
        self._upstream_port: int = parsed.port
        self.endpoint = ""  # our own base URL, set once listening (for Location rewrites)
        self.faults = StorageFaults()
        self.stats = ProxyStats()
        self._pool = httpcore.AsyncConnectionPool(max_keepalive_connections=_IDLE_CONNECTIONS)
        self._locks = ObjectLocks()  # per object: a precondition's check and the write it guards

    async def aclose(self) -> None:
        """Close the kept-alive connections to fake-gcs-server."""
        await self._pool.aclose()

    async def handle(self, stream: anyio.abc.ByteStream) -> None:
        """Serve one client connection until it closes (keep-alive)."""
        client = _Peer(stream, h11.SERVER)
        async with stream:
            try:
                while await self._exchange(client):
                    if client.conn.our_state is not h11.DONE:
                        return
                    client.conn.start_next_cycle()
            except _Closed:
                return
            except h11.LocalProtocolError:
                return

    async def _exchange(self, client: _Peer) -> bool:
        """One request and its answer; False when the connection must close."""
        request = await client.next_event()
        if not isinstance(request, h11.Request):
            return False
        method = request.method.decode("ascii")
        target = request.target.decode("latin-1")
        if target.startswith(_ADMIN_PREFIX):
            await self._admin(client, method, target)
            return True
        self.stats.requests[method] += 1
        described = urllib.parse.unquote(target)
        body: bytes | None = None  # read ahead only for multipart uploads (small by design)
        upload_name: str | None = None
        if method == "POST" and (kind := _NAMED_IN_BODY.search(target)):
            # A multipart or resumable upload names its object in the body's metadata, not the URL.
            body = await _read_body(client)
            if match := _UPLOAD_NAME.search(body[:_MAX_HEAD]):
                with contextlib.suppress(ValueError):
                    upload_name = str(json.loads(b'"' + match[1] + b'"'))
            if upload_name is not None and kind[1] == "multipart":
                described += "&name=" + upload_name
        fault = self.faults.take(method, described)
        if fault is not None:
            self.stats.faulted.append(f"{method} {described}")
            logger.info("injecting %s into %s %s", fault, method, described)
        if fault is not None and not (fault.lose_answer or fault.corrupt):
            if fault.drop:
                self.stats.dropped += 1
                return False  # closed unread: the client sees a reset connection
            if body is None:
                await _read_body(client)
            self.stats.failed += 1
            await _send_error(client, fault.status, f"Injected fault: {method} {described}")
            return True
        if method == "POST" and urllib.parse.urlsplit(target).path == BATCH_PATH:
            return await self._batch(client, request, fault)
        if target.startswith("/upload/") and not _later_chunk(request):
            if body is None and _header(request, b"x-goog-hash"):
                body = await _read_body(client)  # a media upload declaring its checksum
            started = method == "POST" and "uploadType=resumable" in target  # body: metadata
            if refusal := _upload_refusal(request, None if started else body):
                if body is None:
                    await _read_body(client)
                self.stats.refused += 1
                await _send_error(client, 400, refusal, reason="invalid")
                return True
        if reason := unsupported(target):
            if body is None:
                await _read_body(client)
            await _send_error(client, 400, reason, reason="invalid")
            return True
        key = object_of(method, target, upload_name)
        if key is None:
            return await self._forward(client, request, body, fault)
        if method in _READS:
            return await self._conditional(client, request, key, body, fault)
        async with self._locks.hold(key):  # a write: no other write of it in between
            return await self._conditional(client, request, key, body, fault)

    async def _conditional(
        self,
        client: _Peer,
        request: h11.Request,
        key: ObjectKey,
        body: bytes | None,
        fault: StorageFault | None,
    ) -> bool:
        """Forward a request on object ``key`` if its preconditions hold, else refuse it."""
        method, target = request.method.decode("ascii"), request.target.decode("latin-1")
        refusal = await self._precondition_refusal(method, target, key, request.headers)
        if refusal is None:
            suffix = ""
            if method == "POST" and "uploadType=resumable" in target:
                suffix = _condition_query(target)  # checked when the upload completes
            return await self._forward(client, request, body, fault, location_query=suffix)
        if body is None:
            await _read_body(client)
        if refusal.status == 304:
            await client.send(h11.Response(status_code=304, headers=[]), h11.EndOfMessage())
        else:
            await _send_inner(client, refusal)
        return True

    async def _precondition_refusal(
        self, method: str, target: str, key: ObjectKey, headers: Iterable[tuple[bytes, bytes]]
    ) -> InnerResponse | None:
        """Google's answer to a request on ``key`` whose precondition does not hold, or None.

        A resumable upload's are checked when it completes, not when it starts; a read or a
        delete of an object that does not exist is left to fake-gcs-server (404).
        """
        try:
            conditions = conditions_in(urllib.parse.urlsplit(target).query)
        except ValueError as exc:
            return _error_answer(400, str(exc), reason="invalid")
        if not conditions or (method == "POST" and "uploadType=resumable" in target):
            return None
        if method == "PUT" and "upload_id=" in target:
            content_range = next((v for k, v in headers if k.lower() == b"content-range"), b"")
            if not is_final_chunk(content_range.decode("latin-1")):
                return None
        try:
            state = await self._object_state(key)
        except OSError as exc:
            return _error_answer(502, f"the proxy could not read {key.name}'s generation: {exc}")
        if state is None and not target.startswith("/upload/"):
            return None
        status = failed_status(method, conditions, state)
        if not status:
            return None
        self.stats.conditions_not_met += 1
        if status == 304:
            return InnerResponse(304, (), b"")
        return _error_answer(412, NOT_MET_MESSAGE, location="If-Match")

    async def _object_state(self, key: ObjectKey) -> ObjectState | None:
        """Object ``key``'s generation and metageneration, or None if it does not exist.

        :raises OSError: fake-gcs-server cannot be reached, or answers neither 200 nor 404
        """
        try:
            response = await self._send_upstream(b"GET", key.metadata_target(), (), b"")
            try:
                answer = await _read_upstream(response)
            finally:
                await response.aclose()
        except _Closed as exc:
            raise OSError(str(exc)) from exc
        if response.status == 404:
            return None
        try:
            document = json.loads(answer)
            return ObjectState(int(document["generation"]), int(document["metageneration"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise OSError(f"answer {response.status} {answer[:200]!r}") from exc

    async def _batch(self, client: _Peer, request: h11.Request, fault: StorageFault | None) -> bool:
        """Answer a batch request, each call through :meth:`_batch_call` (see the module's
        docstring for why fake-gcs-server's own batch API is not asked)."""
        body = await _read_body(client)
        content_type = _header(request, b"content-type").decode("latin-1")
        try:
            calls = parse_batch_request(content_type, body)
        except BatchFormatError as exc:
            await _send_error(client, 400, str(exc))
            return True
        self.stats.batches += 1
        answers: list[tuple[InnerRequest | RefusedPart, InnerResponse]] = []
        for call in calls:
            if isinstance(call, RefusedPart):
                self.stats.refused += 1
                answers.append((call, _error_answer(400, call.reason, reason="invalid")))
                continue
            answer = await self._batch_call(request, call)
            if answer is None:
                return False  # an injected drop: the whole batch's answer is lost
            answers.append((call, answer))
        answer_type, answer_body = compose_batch_response(answers)
        head = h11.Response(status_code=200, headers=[(b"content-type", answer_type)])
        if fault is not None and fault.corrupt:
            self.stats.corrupted += 1
            answer_body = _flip_a_byte(answer_body)
        elif fault is not None:
            return await self._lose_answer(client, head, answer_body, fault)
        await client.send(
            self._rewritten(head, len(answer_body)), h11.Data(data=answer_body), h11.EndOfMessage()
        )
        return True

    async def _batch_call(self, request: h11.Request, call: InnerRequest) -> InnerResponse | None:
        """One call of a batch, through the faults like a request of its own; None: drop all."""
        self.stats.requests[call.method] += 1
        described = urllib.parse.unquote(call.target)
        fault = self.faults.take(call.method, described)
        if fault is not None:
            self.stats.faulted.append(f"{call.method} {described}")
            logger.info("injecting %s into %s %s (in a batch)", fault, call.method, described)
            if not (fault.lose_answer or fault.corrupt):
                if fault.drop:
                    self.stats.dropped += 1
                    return None
                self.stats.failed += 1
                return _error_answer(fault.status, f"Injected fault: {call.method} {described}")
        if reason := unsupported(call.target):
            return _error_answer(400, reason, reason="invalid")
        key = object_of(call.method, call.target, None)
        if key is None:
            return await self._batch_forward(request, call, fault)
        async with self._locks.hold(key):
            refusal = await self._precondition_refusal(call.method, call.target, key, ())
            return refusal or await self._batch_forward(request, call, fault)

    async def _batch_forward(
        self, request: h11.Request, call: InnerRequest, fault: StorageFault | None
    ) -> InnerResponse | None:
        """Send one call of a batch to fake-gcs-server; its answer as Google would give it."""
        headers = inner_headers(request.headers, call)
        try:
            response = await self._send_upstream(
                call.method.encode("ascii"), call.target.encode("latin-1"), headers, call.body
            )
            try:
                body = await _read_upstream(response)
            finally:
                await response.aclose()
        except (OSError, _Closed) as exc:
            return _error_answer(502, f"the proxy could not reach {self.upstream}: {exc}")
        self.stats.forwarded += 1
        status = response.status
        kept = tuple(
            (name.lower(), value)
            for name, value in response.headers
            if name.lower() not in (b"connection", b"keep-alive")
        )
        body = self._rewrite_links(body)
        if call.method == "DELETE" and status == 200:
            status, kept, body = 204, (), b""  # Google's answer to a delete has no body
        if fault is not None and fault.corrupt:
            self.stats.corrupted += 1
            body = _flip_a_byte(body)
        elif fault is not None:
            self.stats.answers_lost += 1
            if fault.drop:
                self.stats.dropped += 1
                return None
            self.stats.failed += 1
            return _error_answer(fault.status, "Injected fault after the request was applied")
        return InnerResponse(status, kept, body)

    async def _forward(
        self,
        client: _Peer,
        request: h11.Request,
        body: bytes | None,
        fault: StorageFault | None,
        location_query: str = "",
    ) -> bool:
        """Forward a request to fake-gcs-server and its answer to the client.

        :param location_query: appended to the answer's ``Location`` (a resumable session's
            URL then carries the upload's preconditions to the request that completes it)
        """
        if body is None and not _declares_body(request):
            body = await _read_body(client)  # only the end of the message: nothing to stream
        try:
            response = await self._send_upstream(
                request.method, request.target, request.headers, client if body is None else body
            )
        except OSError as exc:
            if client.conn.their_state is not h11.DONE:
                await _read_body(client)
            await _send_error(client, 502, f"the proxy could not reach {self.upstream}: {exc}")
            return True
        self.stats.forwarded += 1
        head = _head(response)
        deleted = request.method == b"DELETE" and head.status_code == 200
        try:
            if fault is None and not _is_json(head) and not deleted:
                # Media (up to 100 MB here) streams through, in writes of about _CHUNK bytes.
                pending: list[Any] = [self._rewritten(head, location_query=location_query)]
                size = 0
                async for chunk in _upstream_chunks(response):
                    pending.append(h11.Data(data=chunk))
                    size += len(chunk)
                    if size >= _CHUNK:
                        await client.send(*pending)
                        pending, size = [], 0
                await client.send(*pending, h11.EndOfMessage())
                return True
            # Metadata carries links (mediaLink, selfLink) a client may follow: make them ours.
            answer = self._rewrite_links(await _read_upstream(response))
            if head.status_code == 200 and (refusal := await self._stored_refusal(request, answer)):
                self.stats.refused += 1
                await _send_error(client, 400, refusal, reason="invalid")
                return True
            if deleted:  # fake-gcs-server answers 200 "null"; Google 204 and no body
                head, answer = _no_content(head), b""
            if fault is not None and fault.corrupt and answer:
                self.stats.corrupted += 1
                answer = _flip_a_byte(answer)
            elif fault is not None:
                return await self._lose_answer(client, head, answer, fault)
            body_events = [h11.Data(data=answer)] if answer else []
            rewritten = self._rewritten(head, len(answer), location_query)
            await client.send(rewritten, *body_events, h11.EndOfMessage())
            return True
        finally:
            await response.aclose()

    async def _stored_refusal(self, request: h11.Request, answer: bytes) -> str | None:
        """Why Google would refuse the resumable upload whose last chunk this answer completes.

        Its ``X-Goog-Hash`` declares the whole object's checksums, which only fake-gcs-server
        saw whole: they are compared with those it stored, and the object is deleted if they
        differ (Google keeps the previous one; here the object is gone).
        """
        hash_header = _header(request, b"x-goog-hash").decode("latin-1")
        if not hash_header or not _later_chunk(request):
            return None
        try:
            stored = json.loads(answer)
            refusal = stored_mismatch(declared_in_header(hash_header), stored)
        except HashHeaderError as exc:
            refusal = str(exc)
        except ValueError:
            return None  # not an object's metadata: nothing to compare
        key = object_of("PUT", request.target.decode("latin-1"), None)
        if refusal and key is not None:
            with contextlib.suppress(OSError):
                response = await self._send_upstream(b"DELETE", key.metadata_target(), (), b"")
                await response.aclose()
        return refusal

    async def _send_upstream(
        self,
        method: bytes,
        target: bytes,
        headers: Iterable[tuple[bytes, bytes]],
        body: bytes | _Peer,
    ) -> httpcore.Response:
        """Send a request to fake-gcs-server through the pool; its answer, body unread.

        :param headers: the request's headers; ``Host`` is set to fake-gcs-server's
        :param body: the request's body, or the client to stream it from
        :raises OSError: fake-gcs-server cannot be reached
        :raises _Closed: the client went away while its body streamed
        """
        sent = [
            (name, value)
            for name, value in headers
            if name.lower() not in (b"host", b"connection", b"keep-alive")
        ]
        sent.append((b"host", f"{self._upstream_host}:{self._upstream_port}".encode()))
        url = httpcore.URL(
            scheme=b"http",
            host=self._upstream_host.encode(),
            port=self._upstream_port,
            target=target,
        )
        content = body if isinstance(body, bytes) else _client_body(body)
        request = httpcore.Request(method, url, headers=sent, content=content)
        try:
            return await self._pool.handle_async_request(request)
        except _UPSTREAM_ERRORS as exc:
            raise OSError(f"{type(exc).__name__}: {exc}") from exc

    async def _lose_answer(
        self, client: _Peer, response: h11.Response, body: bytes, fault: StorageFault
    ) -> bool:
        """The request took effect upstream; the client gets an error, or half an answer."""
        self.stats.answers_lost += 1
        if not fault.drop:
            self.stats.failed += 1
            await _send_error(client, fault.status, "Injected fault after the request was applied")
            return True
        self.stats.dropped += 1
        # The head promised the whole body: half of it, then a closed connection.
        await client.send(self._rewritten(response, len(body)))
        if body:
            await client.send(h11.Data(data=body[: len(body) // 2]))
        return False

    def _rewrite_links(self, body: bytes) -> bytes:
        if not self.endpoint:
            return body
        return body.replace(self.upstream.encode(), self.endpoint.encode())

    def _rewritten(
        self, response: h11.Response, length: int | None = None, location_query: str = ""
    ) -> h11.Response:
        """The upstream's response head for our client: Location points at the proxy.

        :param length: the body's new length, when the proxy rewrote the body
        :param location_query: parameters appended to Location's query (``&a=1&b=2``)
        """
        headers = []
        for name, value in response.headers:
            lower = name.lower()
            if lower in (b"connection", b"keep-alive"):
                continue
            if length is not None and lower in (b"content-length", b"transfer-encoding"):
                continue
            if lower == b"location":
                value = self._rewrite_links(value) + location_query.encode()
            headers.append((name, value))
        if length is not None:
            headers.append((b"content-length", b"%d" % length))
        return h11.Response(
            status_code=response.status_code, headers=headers, reason=response.reason
        )

    async def _admin(self, client: _Peer, method: str, target: str) -> None:
        body = await _read_body(client)
        path = urllib.parse.urlsplit(target).path
        try:
            if path == "/_proxy/stats" and method == "GET":
                answer: dict[str, Any] = self.stats.to_json(self.faults.pending())
            elif path == "/_proxy/faults" and method == "POST":
                spec = json.loads(body or b"{}")
                if not isinstance(spec, dict):
                    raise ValueError("the body must be a JSON object")
                known = {"method", "status", "count", "drop", "path", "lose_answer", "corrupt"}
                if unknown := sorted(set(spec) - known):
                    raise ValueError(f"unknown fields {unknown}; known: {sorted(known)}")
                self.faults.add(**spec)
                answer = {"pending": self.faults.pending()}
            elif path == "/_proxy/faults" and method == "DELETE":
                answer = {"cleared": self.faults.clear()}
            else:
                await _send_error(client, 404, f"no admin endpoint {method} {path}")
                return
        except ValueError as exc:
            await _send_error(client, 400, str(exc))
            return
        await _send_json(client, 200, answer)


def _header(message: h11.Request | h11.Response, name: bytes) -> bytes:
    return next((value for key, value in message.headers if key.lower() == name), b"")


def _flip_a_byte(data: bytes) -> bytes:
    """``data`` with one bit of its middle byte flipped (bit rot in transit)."""
    if not data:
        return data
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1 :]


def _error_answer(status: int, message: str, reason: str = "", location: str = "") -> InnerResponse:
    """Cloud Storage's error JSON as an answer (to one call of a batch, or to a request).

    :param location: the header the error is about (Google names ``If-Match`` for a 412)
    """
    document = _error_document(status, message, reason)
    if location:
        document["errors"][0].update(domain="global", locationType="header", location=location)
    body = json.dumps({"error": document}).encode()
    return InnerResponse(status, ((b"content-type", b"application/json; charset=UTF-8"),), body)


async def _send_inner(peer: _Peer, answer: InnerResponse) -> None:
    """Send an answer composed here (with its body) to the client."""
    headers = [*answer.headers, (b"content-length", b"%d" % len(answer.body))]
    await peer.send(
        h11.Response(status_code=answer.status, headers=headers),
        h11.Data(data=answer.body),
        h11.EndOfMessage(),
    )


def _condition_query(target: str) -> str:
    """A request's precondition parameters, as ``&name=value...`` (empty without any)."""
    query = urllib.parse.urlsplit(target).query
    return "".join(f"&{name}={value}" for name, value in conditions_in(query).items())


def _declares_body(request: h11.Request) -> bool:
    """Whether a request has a body to stream (a GET or DELETE normally has none)."""
    length = _header(request, b"content-length")
    return bool(_header(request, b"transfer-encoding")) or (bool(length) and length != b"0")


def _head(response: httpcore.Response) -> h11.Response:
    """An upstream answer's status line and headers, as h11 sends them to our client."""
    reason = response.extensions.get("reason_phrase", b"")
    return h11.Response(status_code=response.status, headers=response.headers, reason=reason)


async def _client_body(client: _Peer) -> AsyncIterator[bytes]:
    """The client's request body as it arrives, for httpcore to stream upstream."""
    while not isinstance(event := await client.next_event(), h11.EndOfMessage):
        yield event.data


async def _upstream_chunks(response: httpcore.Response) -> AsyncIterator[bytes]:
    """An upstream answer's body as it arrives.

    :raises _Closed: fake-gcs-server broke the answer off (the client's connection must close)
    """
    try:
        async for chunk in response.aiter_stream():
            yield chunk
    except _UPSTREAM_ERRORS as exc:
        raise _Closed(f"fake-gcs-server broke off its answer: {exc}") from exc


async def _read_upstream(response: httpcore.Response) -> bytes:
    return b"".join([chunk async for chunk in _upstream_chunks(response)])


def _no_content(response: h11.Response) -> h11.Response:
    """``response`` as a 204 without a body."""
    framing = (b"content-length", b"content-type", b"transfer-encoding")
    headers = [(name, value) for name, value in response.headers if name.lower() not in framing]
    return h11.Response(status_code=204, headers=headers, reason=b"No Content")


def _later_chunk(request: h11.Request) -> bool:
    """Whether this is a chunk of a resumable upload that does not carry the whole object."""
    if request.method != b"PUT" or b"upload_id=" not in request.target:
        return False
    content_range = _header(request, b"content-range").decode("latin-1")
    whole = re.fullmatch(r"bytes 0-(\d+)/(\d+)", content_range.strip())
    return whole is None or int(whole[1]) + 1 != int(whole[2])


def _upload_refusal(request: h11.Request, body: bytes | None) -> str | None:
    """Why Cloud Storage would refuse this upload (a checksum its bytes lack), or None.

    :param body: the request's body, if the proxy read it ahead (multipart, or X-Goog-Hash)
    """
    hash_header = _header(request, b"x-goog-hash").decode("latin-1")
    parts = None if body is None else multipart_parts(_header(request, b"content-type"), body)
    if hash_header and body is None:
        return (
            "X-Goog-Hash on the request that starts a resumable upload is not supported by the "
            "local cloud: declare the checksum on its last chunk, or in a single-request upload"
        )
    declared: dict[str, object] = dict(parts[0]) if parts is not None else {}
    if hash_header:
        try:
            declared.update(declared_in_header(hash_header))
        except HashHeaderError as exc:
            return str(exc)
    if not declared or body is None:
        return None
    return upload_mismatch(declared, parts[1] if parts is not None else body)


def _is_json(response: h11.Response) -> bool:
    return any(
        name.lower() == b"content-type" and value.lower().startswith(b"application/json")
        for name, value in response.headers
    )


async def _read_body(peer: _Peer) -> bytes:
    body = bytearray()
    while not isinstance(event := await peer.next_event(), h11.EndOfMessage):
        body += event.data
    return bytes(body)


async def _send_json(peer: _Peer, status: int, payload: dict[str, Any]) -> None:
    data = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(data))]
    await peer.send(
        h11.Response(status_code=status, headers=headers), h11.Data(data=data), h11.EndOfMessage()
    )


async def _send_error(peer: _Peer, status: int, message: str, reason: str = "") -> None:
    """Answer with Cloud Storage's error JSON, which google-cloud-storage maps by status."""
    await _send_json(peer, status, {"error": _error_document(status, message, reason)})


def _error_document(status: int, message: str, reason: str = "") -> dict[str, Any]:
    reason = reason or _REASONS.get(status, "backendError")
    return {"code": status, "message": message, "errors": [{"message": message, "reason": reason}]}


async def serve(
    upstream: str,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run a proxy until cancelled; ``task_status.started`` gets its endpoint."""
    proxy = GcsProxy(upstream)
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port, backlog=1024)
    async with listener:
        bound_port = listener.extra(anyio.abc.SocketAttribute.local_port)
        proxy.endpoint = f"http://{host}:{bound_port}"
        task_status.started(proxy.endpoint)
        try:
            await listener.serve(proxy.handle)
        finally:
            with anyio.CancelScope(shield=True):
                await proxy.aclose()


async def _serve_until_signal(options: argparse.Namespace) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with anyio.create_task_group() as tg:
            endpoint = await tg.start(serve, options.upstream, options.host, options.port)
            print(json.dumps({"endpoint": endpoint, "pid": os.getpid()}), flush=True)
            logger.info(
                "GCS fault proxy serving on %s, forwarding to %s", endpoint, options.upstream
            )
            async for signum in signals:
                logger.info("received signal %d: stopping", signum)
                break
            tg.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> None:
    """Run the proxy until SIGTERM/SIGINT (see the module docstring for the contract)."""
    parser = argparse.ArgumentParser(
        prog="python -m covalent_gcpbatch_array.local.gcs.proxy",
        description="A fault-injecting HTTP proxy in front of fake-gcs-server.",
    )
    parser.add_argument("--upstream", required=True, help="fake-gcs-server's URL")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    options = parser.parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s gcs_proxy %(levelname)s: %(message)s",
    )
    anyio.run(_serve_until_signal, options)


if __name__ == "__main__":
    main()
