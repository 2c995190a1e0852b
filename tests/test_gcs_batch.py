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
from covalent_gcpbatch_array.local.gcs.batch_requests import (
    MAX_BATCH_CALLS,
    BatchFormatError,
    InnerRequest,
    InnerResponse,
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


class TestParse:
    def test_the_clients_own_batch(self) -> None:
        calls = parse_batch_request(*client_batch(["a/b c.txt", "d"]))
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
        get = b"Content-Type: application/http\r\n\r\nGET /storage/v1/b/bk/o/y\r\n\r\n"
        patch_call, get_call = parse_batch_request(*raw_batch([patch, get]))
        assert (patch_call.method, patch_call.content_id) == ("PATCH", "item1")
        assert patch_call.body == b'{"a": "b"}\n'
        assert (get_call.method, get_call.target, get_call.content_id) == (
            "GET",
            "/storage/v1/b/bk/o/y",
            None,
        )

    @pytest.mark.parametrize(
        ("content_type", "body", "message"),
        [
            ("application/json", b"{}", "must be multipart/mixed"),
            (
                "multipart/mixed; boundary=b1",
                b"--b1\r\nContent-Type: application/http\r\n\r\nGET / HTTP/1.1\r\n\r\n",
                "no closing boundary",
            ),
            ("multipart/mixed; boundary=b1", b"--b1--\r\n", "holds no calls"),
            (
                "multipart/mixed; boundary=b1",
                b"--b1\r\nContent-Type: text/plain\r\n\r\nGET / HTTP/1.1\r\n\r\n\r\n--b1--",
                "Content-Type: application/http",
            ),
            (
                "multipart/mixed; boundary=b1",
                b"--b1\r\nContent-Type: application/http\r\n\r\nGET\r\n\r\n\r\n--b1--",
                "malformed request line",
            ),
            (
                "multipart/mixed; boundary=b1",
                b"--b1\r\nContent-Type: application/http\r\n\r\nGET nopath HTTP/1.1\r\n\r\n\r\n--b1--",
                "names no path",
            ),
        ],
    )
    def test_malformed_batches_are_refused(
        self, content_type: str, body: bytes, message: str
    ) -> None:
        with pytest.raises(BatchFormatError, match=message):
            parse_batch_request(content_type, body)

    def test_at_most_100_calls(self) -> None:
        assert len(parse_batch_request(*client_batch(["x"] * MAX_BATCH_CALLS))) == 100
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
