"""The one rule for building clients: an http:// endpoint means anonymous credentials."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import google.auth.exceptions
import pytest
from google.auth.credentials import AnonymousCredentials

from covalent_gcpbatch_array._core.clients import (
    credentials_for,
    make_batch_client,
    make_logging_client,
    make_storage_client,
)
from covalent_gcpbatch_array.exceptions import CloudApiError, StorageError


class RecordingServer:
    """A real HTTP server that answers every request with ``{}`` and records what came."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Authorization
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                server.requests.append((self.command, self.path, self.headers.get("Authorization")))
                body = json.dumps({"name": "b"}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

        self._http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._http.server_address[1]}/"
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._thread.join()


@pytest.fixture
def server() -> Iterator[RecordingServer]:
    recording = RecordingServer()
    yield recording
    recording.close()


@pytest.fixture
def no_google_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Application Default Credentials cannot be found (as on a machine with no gcloud)."""
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)


class TestCredentials:
    def test_http_is_anonymous(self) -> None:
        assert isinstance(credentials_for("http://127.0.0.1:9"), AnonymousCredentials)

    @pytest.mark.parametrize("endpoint", ["", "https://batch.googleapis.com", "https://x.test"])
    def test_anything_else_uses_the_default_credentials(self, endpoint: str) -> None:
        assert credentials_for(endpoint) is None


@pytest.mark.usefixtures("no_google_credentials")
class TestEveryClientFollowsTheRule:
    """Each client, made with no Google credentials anywhere, reaches an http:// endpoint
    (trailing '/' and all) and sends it no Authorization header."""

    def test_batch(self, server: RecordingServer) -> None:
        client = make_batch_client(server.endpoint)
        client.get_job(name="projects/p/locations/r/jobs/j")
        [(method, path, authorization)] = server.requests
        assert (method, path.split("?")[0]) == ("GET", "/v1/projects/p/locations/r/jobs/j")
        assert authorization is None

    def test_storage(self, server: RecordingServer) -> None:
        client = make_storage_client("p", server.endpoint)
        try:
            assert client.bucket("b").exists()
        finally:
            client.close()
        [(method, path, authorization)] = server.requests
        assert (method, path.split("?")[0]) == ("GET", "/storage/v1/b/b")
        assert authorization is None

    def test_logging(self, server: RecordingServer) -> None:
        client = make_logging_client("p", server.endpoint)
        assert list(client.list_entries(filter_='logName="x"')) == []
        [(method, path, authorization)] = server.requests
        assert (method, path.split("?")[0]) == ("POST", "/v2/entries:list")
        assert authorization is None


@pytest.mark.usefixtures("no_google_credentials")
class TestHttpsNeedsCredentials:
    """An https:// endpoint is not an emulator: without credentials each client says so."""

    def test_batch(self) -> None:
        with pytest.raises(google.auth.exceptions.DefaultCredentialsError):
            make_batch_client("https://batch.example.test")

    def test_storage(self) -> None:
        with pytest.raises(StorageError, match="no Google credentials found for Cloud Storage"):
            make_storage_client("p", "https://storage.example.test")

    def test_logging(self) -> None:
        with pytest.raises(CloudApiError, match="no Google credentials found for Cloud Logging"):
            make_logging_client("p", "https://logging.example.test")
