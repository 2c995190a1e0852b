"""Cloud Storage batch requests taken apart and put together: the requests google-cloud-storage
really builds, and answers its own parser reads."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator, Sequence

import pytest
from google.cloud import storage

from covalent_gcpbatch_array._core.clients import make_storage_client
from covalent_gcpbatch_array._core.object_http import ObjectHttp
from covalent_gcpbatch_array.local.gcs.batch_requests import (
    MAX_BATCH_CALLS,
    BatchFormatError,
    InnerRequest,
    InnerResponse,
    RefusedPart,
    compose_batch_response,
    inner_headers,
    parse_batch_request,
)
from tests.gcs_batch_client import batch_responses


class BatchEndpoint:
    """A Cloud Storage endpoint that records each batch request and answers it as scripted."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.received: list[tuple[str, bytes]] = []  # (Content-Type, body) of each request
        self.answers: Sequence[tuple[InnerRequest, InnerResponse]] = ()

    @classmethod
    @contextlib.contextmanager
    def serving(cls) -> Iterator[BatchEndpoint]:
        recorder: BatchEndpoint

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                recorder.received.append((self.headers["Content-Type"], body))
                content_type, answer = compose_batch_response(recorder.answers)
                self.send_response(200)
                self.send_header("Content-Type", content_type.decode())
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler) as server:
            recorder = cls(f"http://127.0.0.1:{server.server_address[1]}")
            thread = threading.Thread(target=server.serve_forever)
            thread.start()
            try:
                yield recorder
            finally:
                server.shutdown()
                thread.join()

    def client(self) -> storage.Client:
        return make_storage_client("p", self.endpoint)


def client_batch(names: list[str]) -> tuple[str, bytes]:
    """The Content-Type and body google-cloud-storage sends to delete ``names`` in a batch."""
    with BatchEndpoint.serving() as endpoint:
        endpoint.answers = [(call("DELETE", "/"), InnerResponse(204, (), b""))] * len(names)
        client = endpoint.client()
        with client.batch(raise_exception=False):
            for name in names:
                client.bucket("bk").blob(name).delete(retry=None)
    ((content_type, body),) = endpoint.received
    return content_type, body


def raw_batch(parts: list[bytes], boundary: str = "b1") -> tuple[str, bytes]:
    """A batch body written by hand, CRLF throughout, as Google's guide shows it."""
    body = b"".join(b"--%s\r\n%s\r\n" % (boundary.encode(), part) for part in parts)
    return f"multipart/mixed; boundary={boundary}", body + b"--%s--\r\n" % boundary.encode()


def call(method: str, target: str, content_id: str | None = None) -> InnerRequest:
    return InnerRequest(method, target, (), b"", content_id)


def calls_of(content_type: str, body: bytes) -> list[InnerRequest]:
    """The calls of a batch request none of whose parts may be refused."""
    parts = parse_batch_request(content_type, body)
    refused = [part for part in parts if isinstance(part, RefusedPart)]
    assert not refused
    return [part for part in parts if isinstance(part, InnerRequest)]


class TestParse:
    def test_the_clients_own_batch(self) -> None:
        calls = calls_of(*client_batch(["a/b c.txt", "d"]))
        assert [(c.method, c.target, c.body, c.content_id) for c in calls] == [
            ("DELETE", "/storage/v1/b/bk/o/a%2Fb%20c.txt?prettyPrint=false", b"", None),
            ("DELETE", "/storage/v1/b/bk/o/d?prettyPrint=false", b"", None),
        ]
        assert dict(calls[0].headers)[b"accept-encoding"] == b"gzip"

    def test_a_hand_written_batch_with_ids_and_a_body(self) -> None:
        patch = (
            b"Content-Type: application/http\r\nContent-ID: <item1>\r\n\r\n"
            b"PATCH /storage/v1/b/bk/o/x HTTP/1.1\r\nContent-Type: application/json\r\n"
            b'Content-Length: 11\r\n\r\n{"a": "b"}\n'
        )
        get = b"Content-Type: application/http\r\n\r\nGET /storage/v1/b/bk/o/y HTTP/1.1\r\n\r\n"
        patch_call, get_call = calls_of(*raw_batch([patch, get]))
        assert (patch_call.method, patch_call.content_id) == ("PATCH", "item1")
        assert patch_call.body == b'{"a": "b"}\n'
        assert (get_call.method, get_call.target, get_call.content_id) == (
            "GET",
            "/storage/v1/b/bk/o/y",
            None,
        )

    def test_object_https_own_batch(self) -> None:
        """The request ObjectHttp.delete_many sends: each call's head ends in its own blank
        line, and the CRLF before each delimiter is the delimiter's."""
        with BatchEndpoint.serving() as endpoint:
            ObjectHttp(endpoint.client(), "bk").delete_many(["a/b c.txt", "d"])
        ((content_type, body),) = endpoint.received
        calls = calls_of(content_type, body)
        assert [(c.method, c.target, c.body) for c in calls] == [
            ("DELETE", "/storage/v1/b/bk/o/a%2Fb%20c.txt", b""),
            ("DELETE", "/storage/v1/b/bk/o/d", b""),
        ]
        assert all(c.content_id for c in calls)

    def test_a_line_that_only_starts_like_a_delimiter_is_content(self) -> None:
        patch = (
            b"Content-Type: application/http\r\n\r\n"
            b"PATCH /storage/v1/b/bk/o/x HTTP/1.1\r\nContent-Length: 9\r\n\r\n\r\n--b1x\r\n"
        )
        (call_,) = calls_of(*raw_batch([patch]))
        assert call_.body == b"\r\n--b1x\r\n"

    @pytest.mark.parametrize(
        ("content_type", "body", "message"),
        [
            ("application/json", b"{}", "must be multipart/mixed"),
            (
                "multipart/mixed; boundary=b1",
                b"--b1\r\nContent-Type: application/http\r\n\r\nGET / HTTP/1.1\r\n\r\n",
                "no close delimiter",
            ),
            (
                "multipart/mixed; boundary=b1",
                b"--b1x\r\nContent-Type: application/http\r\n\r\nGET / HTTP/1.1\r\n\r\n"
                b"\r\n--b1x--\r\n",
                "no close delimiter",
            ),
            ("multipart/mixed; boundary=b1", b"--b1--\r\n", "holds no calls"),
        ],
    )
    def test_a_malformed_batch_is_refused_whole(
        self, content_type: str, body: bytes, message: str
    ) -> None:
        with pytest.raises(BatchFormatError, match=message):
            parse_batch_request(content_type, body)

    @pytest.mark.parametrize(
        ("part", "message"),
        [
            # DELETE ObjectHttp's first version sent: the call's head has no blank line of
            # its own (the CRLF raw_batch puts before the delimiter is the delimiter's).
            (
                b"Content-Type: application/http\r\n\r\nDELETE /storage/v1/b/bk/o/x HTTP/1.1\r\n",
                "headers are not ended by an empty line",
            ),
            (b"Content-Type: application/http\r\n", "part headers are not ended"),
            (
                b"Content-Type: text/plain\r\n\r\nGET /storage/v1/b/bk/o/x HTTP/1.1\r\n\r\n",
                "must be Content-Type: application/http",
            ),
            (
                b"Content-Type: multipart/mixed; boundary=b2\r\n\r\n--b2\r\n"
                b"Content-Type: application/http\r\n\r\nGET /storage/v1/b/bk/o/x HTTP/1.1\r\n"
                b"\r\n\r\n--b2--",
                "no nesting",
            ),
            (b"Content-Type: application/http\r\n\r\nGET\r\n\r\n", "request line"),
            (
                b"Content-Type: application/http\r\n\r\nGET /storage/v1/b/bk/o/x\r\n\r\n",
                "request line",
            ),
            (
                b"Content-Type: application/http\r\n\r\nGET /storage/v1/b/bk/o/x HTTP/1.1\r\n"
                b"no colon\r\n\r\n",
                "malformed header line",
            ),
            (
                b"Content-Type: application/http\r\n\r\nPATCH /storage/v1/b/bk/o/x HTTP/1.1\r\n"
                b"Content-Length: 50\r\n\r\n{}",
                "its body has 2 bytes, its Content-Length says b'50'",
            ),
            (
                b"Content-Type: application/http\r\n\r\nGET nopath HTTP/1.1\r\n\r\n",
                "not one of the JSON API's",
            ),
            (
                b"Content-Type: application/http\r\n\r\n"
                b"POST /upload/storage/v1/b/bk/o?uploadType=media&name=u HTTP/1.1\r\n"
                b"Content-Length: 2\r\n\r\nhi",
                "no uploads, downloads or batches",
            ),
            (
                b"Content-Type: application/http\r\n\r\n"
                b"GET /storage/v1/b/bk/o/x?alt=media HTTP/1.1\r\n\r\n",
                "no uploads, downloads or batches",
            ),
            (
                b"Content-Type: application/http\r\n\r\nPOST /batch/storage/v1 HTTP/1.1\r\n\r\n",
                "no uploads, downloads or batches",
            ),
        ],
    )
    def test_a_malformed_part_is_refused_alone(self, part: bytes, message: str) -> None:
        good = b"Content-Type: application/http\r\n\r\nDELETE /storage/v1/b/bk/o/y HTTP/1.1\r\n\r\n"
        first, refused, last = parse_batch_request(*raw_batch([good, part, good]))
        assert isinstance(first, InnerRequest) and isinstance(last, InnerRequest)
        assert isinstance(refused, RefusedPart)
        assert refused.reason.startswith("part 2 of the batch request: ")
        assert message in refused.reason

    def test_a_refused_part_keeps_its_content_id(self) -> None:
        part = b"Content-Type: text/plain\r\nContent-ID: <x+1>\r\n\r\nGET / HTTP/1.1\r\n\r\n"
        (refused,) = parse_batch_request(*raw_batch([part]))
        assert refused == RefusedPart(
            "part 1 of the batch request (Content-ID x+1): it is Content-Type 'text/plain': "
            "each part of a batch request must be Content-Type: application/http, one HTTP "
            "request (no nesting)",
            "x+1",
        )

    def test_at_most_100_calls(self) -> None:
        assert len(calls_of(*client_batch(["x"] * MAX_BATCH_CALLS))) == 100
        with pytest.raises(BatchFormatError, match="at most 100 calls, this one holds 101"):
            parse_batch_request(*client_batch(["x"] * (MAX_BATCH_CALLS + 1)))


class TestInnerHeaders:
    def test_outer_headers_apply_unless_the_call_has_its_own(self) -> None:
        outer = [
            (b"Authorization", b"Bearer outer"),
            (b"User-Agent", b"outer-agent"),
            (b"Content-Type", b"multipart/mixed; boundary=x"),
            (b"Content-Length", b"999"),
            (b"Host", b"storage.googleapis.com"),
        ]
        own = InnerRequest(
            "PATCH", "/o", ((b"user-agent", b"inner"), (b"content-length", b"2")), b"{}", None
        )
        assert sorted(inner_headers(outer, own)) == [
            (b"authorization", b"Bearer outer"),
            (b"content-length", b"2"),
            (b"user-agent", b"inner"),
        ]


class TestCompose:
    def test_the_client_reads_each_answer_in_order(self) -> None:
        answers = [
            (call("DELETE", "/a"), InnerResponse(204, (), b"")),
            (
                call("DELETE", "/b"),
                InnerResponse(404, ((b"content-type", b"application/json"),), b'{"error": {}}'),
            ),
            (call("GET", "/c"), InnerResponse(200, ((b"etag", b'"e1"'),), b'{"name": "c"}')),
        ]
        with BatchEndpoint.serving() as endpoint:
            endpoint.answers = answers
            client = endpoint.client()
            bucket = client.bucket("bk")
            with client.batch(raise_exception=False) as batch:
                bucket.blob("a").delete(retry=None)
                bucket.blob("b").delete(retry=None)
                bucket.blob("c").reload(retry=None)
        parsed = batch_responses(batch)
        assert [r.status_code for r in parsed] == [204, 404, 200]
        assert parsed[2].json() == {"name": "c"}
        assert parsed[2].headers["etag"] == '"e1"'
        assert parsed[0].content == b""

    def test_parts_have_googles_shape(self) -> None:
        answers = [
            (call("DELETE", "/a", "item1"), InnerResponse(204, (), b"")),
            (call("DELETE", "/b"), InnerResponse(599, (), b"x")),
        ]
        content_type, body = compose_batch_response(answers)
        boundary = content_type.split(b"boundary=")[1]
        assert content_type.startswith(b"multipart/mixed; boundary=batch_")
        first, second, end = body.split(b"--" + boundary)[1:]
        assert first == (
            b"\r\nContent-Type: application/http\r\nContent-ID: <response-item1>\r\n\r\n"
            b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n\r\n"
        )
        assert b"Content-ID" not in second  # the call had none
        assert b"HTTP/1.1 599 Unknown\r\n" in second
        assert end == b"--\r\n"
