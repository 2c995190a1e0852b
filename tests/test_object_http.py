"""ObjectHttp's batch deletes against answers written as Google documents them.

The local cloud's proxy and fake-gcs-server answer batch requests too (tests/test_storage.py);
here the answer is Google's own example (https://cloud.google.com/storage/docs/batch), whose
boundary holds '=' and whose parts carry headers and bodies that neither local server writes.
"""

from __future__ import annotations

import contextlib
import http.server
import re
import threading
from collections.abc import Iterator

import pytest
from google.api_core import exceptions as api_exceptions

from covalent_gcpbatch_array._core.clients import make_storage_client
from covalent_gcpbatch_array._core.object_http import ObjectHttp

# The shape of the answer in Google's guide: LF or CRLF line ends are both read.
GOOGLE_ANSWER = """--batch_pK7JBAk73-E=_AA5eFwv4m2Q=
Content-Type: application/http
Content-ID: <response-{tag}+0>

HTTP/1.1 204 No Content
Date: Mon, 22 Jan 2018 18:56:00 GMT
Content-Length: 0


--batch_pK7JBAk73-E=_AA5eFwv4m2Q=
Content-Type: application/http
Content-ID: <response-{tag}+2>

HTTP/1.1 403 Forbidden
Content-Type: application/json; charset=UTF-8
Content-Length: 84

{{"error": {{"code": 403, "message": "no storage.objects.delete on example-bucket"}}}}
--batch_pK7JBAk73-E=_AA5eFwv4m2Q=
Content-Type: application/http
Content-ID: <response-{tag}+1>

HTTP/1.1 404 Not Found
Content-Type: application/json; charset=UTF-8

{{"error": {{"code": 404, "message": "No such object: example-bucket/obj2"}}}}
--batch_pK7JBAk73-E=_AA5eFwv4m2Q=--
"""


class CannedBatchEndpoint:
    """A real HTTP server that answers each batch request with GOOGLE_ANSWER, its Content-IDs
    taken from the request (the 4th call gets no answer)."""

    def __init__(self, content_type: str, line_end: str) -> None:
        self.content_type = content_type
        self.line_end = line_end
        self.endpoint = ""

    @contextlib.contextmanager
    def serving(self) -> Iterator[str]:
        canned = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                tag = re.search(rb"Content-ID: <(\w+)\+0>", body)
                assert tag is not None
                answer = GOOGLE_ANSWER.format(tag=tag[1].decode()).replace("\n", canned.line_end)
                self.send_response(200)
                self.send_header("Content-Type", canned.content_type)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer.encode())

        with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler) as server:
            thread = threading.Thread(target=server.serve_forever)
            thread.start()
            try:
                yield f"http://127.0.0.1:{server.server_address[1]}"
            finally:
                server.shutdown()
                thread.join()


@pytest.mark.parametrize("line_end", ["\r\n", "\n"])
@pytest.mark.parametrize(
    "content_type",
    [
        "multipart/mixed; boundary=batch_pK7JBAk73-E=_AA5eFwv4m2Q=",
        'Multipart/Mixed; charset=UTF-8; boundary="batch_pK7JBAk73-E=_AA5eFwv4m2Q="',
    ],
)
def test_google_answers_are_matched_by_content_id(content_type: str, line_end: str) -> None:
    with CannedBatchEndpoint(content_type, line_end).serving() as endpoint:
        client = make_storage_client("p", endpoint)
        try:
            errors = ObjectHttp(client, "example-bucket").delete_many(["o1", "o2", "o3", "o4"])
        finally:
            client.close()
    assert errors[0] is None
    assert isinstance(errors[1], api_exceptions.NotFound)
    assert str(errors[1]) == "404 DELETE o2: No such object: example-bucket/obj2"
    assert isinstance(errors[2], api_exceptions.Forbidden)
    assert "no storage.objects.delete on example-bucket" in str(errors[2])
    # No answer to it: an error the store's retry policy retries, so it is deleted again alone.
    assert isinstance(errors[3], api_exceptions.InternalServerError)
