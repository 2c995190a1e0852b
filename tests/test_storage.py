"""Tests of the bucket layout and of TaskStore against a real fake-gcs-server."""

from __future__ import annotations

import gc
import http.client
import http.server
import json
import os
import socket
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import anyio.from_thread
import pytest
import requests
from google.api_core import exceptions as api_exceptions
from google.cloud import storage
from google.cloud.storage.retry import DEFAULT_RETRY
from hypothesis import given
from hypothesis import strategies as st

from covalent_gcpbatch_array._core.clients import make_storage_client
from covalent_gcpbatch_array._core.contract import (
    JOB_ID_PATTERN,
    TaskRef,
)
from covalent_gcpbatch_array._core.object_http import ObjectHttp
from covalent_gcpbatch_array._core.storage import (
    JobLayout,
    ManifestEntry,
    TaskObject,
    TaskOutcome,
    TaskStore,
)
from covalent_gcpbatch_array.exceptions import StorageError
from covalent_gcpbatch_array.local.gcs.fake_gcs import GcsEmulator
from covalent_gcpbatch_array.local.gcs.proxy import serve


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def gcs_endpoint() -> Iterator[str]:
    """A fake-gcs-server of this module's own (memory backend)."""
    with GcsEmulator.start() as gcs:
        yield gcs.endpoint


@pytest.fixture(autouse=True)
def _no_background_bucket_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    # google-cloud-storage >= 3.x fetches bucket metadata in a background thread for tracing;
    # that extra GET would race the scripted failures below.
    monkeypatch.setenv("DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA", "true")


@pytest.fixture
def make_client() -> Iterator[Callable[..., storage.Client]]:
    """make_storage_client, with every client closed after the test."""
    made: list[storage.Client] = []

    def make(project_id: str | None, endpoint: str = "") -> storage.Client:
        made.append(make_storage_client(project_id, endpoint))
        return made[-1]

    yield make
    for client in made:
        client.close()


@pytest.fixture
def client(gcs_endpoint: str, make_client: Callable[..., storage.Client]) -> storage.Client:
    return make_client("test-project", gcs_endpoint)


@pytest.fixture
def bucket(client: storage.Client) -> str:
    name = f"cga-{uuid.uuid4().hex[:12]}"
    client.create_bucket(name)
    return name


@pytest.fixture
def store(client: storage.Client, bucket: str) -> TaskStore:
    return TaskStore(client, bucket, "runs/cga")


class ScriptedProxy:
    """A real HTTP server in front of fake-gcs-server that fails chosen requests.

    The first ``fail_first`` requests get ``status`` (only requests whose "METHOD path"
    contains ``only``, when given); the rest are forwarded unchanged. With ``lose_answers`` the
    failed requests are forwarded too, and only their answer is replaced (the write happened,
    the client never learns it). Also used by test_runner.py.
    """

    def __init__(
        self,
        upstream: str,
        *,
        status: int,
        fail_first: int,
        lose_answers: bool = False,
        only: str = "",
    ) -> None:
        self.requests = 0
        self.paths: list[str] = []
        self.failed = 0
        upstream_port = int(upstream.rsplit(":", 1)[1])
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.requests += 1
                proxy.paths.append(f"{self.command} {self.path}")
                if proxy.failed < fail_first and only in proxy.paths[-1]:
                    proxy.failed += 1
                    if lose_answers:
                        self._forward(body)
                    reply = json.dumps({"error": {"code": status, "message": "scripted"}})
                    self._send(status, {"Content-Type": "application/json"}, reply.encode())
                    return
                self._send(*self._forward(body))

            def _forward(self, body: bytes) -> tuple[int, dict[str, str], bytes]:
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                conn.request(self.command, self.path, body=body, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                kept = {
                    k: v
                    for k, v in answer.getheaders()
                    if k.lower() not in ("content-length", "transfer-encoding", "connection")
                }
                conn.close()
                return answer.status, kept, data

            def _send(self, status: int, headers: dict[str, str], data: bytes) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # clients dropping keep-alive connections at the end of a test

        self._server = Server(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> ScriptedProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


FAST_RETRY = DEFAULT_RETRY.with_timeout(1.0).with_delay(initial=0.01, maximum=0.05)


class TestLayout:
    def test_object_names(self) -> None:
        layout = JobLayout("runs/cga", "job-1")
        assert layout.folder == "runs/cga/job-1"
        assert layout.manifest == "runs/cga/job-1/manifest.json"
        assert layout.object_name(4, TaskObject.RESULT) == "runs/cga/job-1/tasks/4/result.pkl"
        assert layout.object_name(0, TaskObject.CANCELLED) == "runs/cga/job-1/tasks/0/cancelled"
        assert JobLayout("", "job-1").object_name(2, TaskObject.INPUT) == "job-1/tasks/2/input.pkl"

    @pytest.mark.parametrize("folder", ["runs/cga/job-1", "job-1", "a/b/c/job-1"])
    def test_from_folder_round_trip(self, folder: str) -> None:
        assert JobLayout.from_folder(folder).folder == folder

    @pytest.mark.parametrize("folder", ["", "runs/Job", "../job", "runs/../job", "/job"])
    def test_from_bad_folder(self, folder: str) -> None:
        with pytest.raises(ValueError):
            JobLayout.from_folder(folder)

    @given(
        prefix=st.from_regex(r"[A-Za-z0-9_-]{1,8}(/[A-Za-z0-9_-]{1,8}){0,3}", fullmatch=True),
        job_id=st.from_regex(JOB_ID_PATTERN, fullmatch=True),
        index=st.integers(min_value=0, max_value=100_000),
        obj=st.sampled_from(TaskObject),
    )
    def test_names_stay_in_their_folder(
        self, prefix: str, job_id: str, index: int, obj: TaskObject
    ) -> None:
        name = JobLayout(prefix, job_id).object_name(index, obj)
        assert name == f"{prefix}/{job_id}/tasks/{index}/{obj.value}"
        assert ".." not in name.split("/")

    def test_outcome_precedence(self) -> None:
        everything = frozenset(TaskObject)
        assert TaskOutcome.of(everything) is TaskOutcome.CANCELLED
        assert TaskOutcome.of(everything - {TaskObject.CANCELLED}) is TaskOutcome.SUCCEEDED
        assert TaskOutcome.of(frozenset({TaskObject.ERROR})) is TaskOutcome.FAILED
        assert TaskOutcome.of(frozenset({TaskObject.INPUT})) is TaskOutcome.UNFINISHED


class TestClient:
    def test_endpoint_carries_uploads_and_downloads(
        self,
        make_client: Callable[..., storage.Client],
        gcs_endpoint: str,
        bucket: str,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
        client = make_client("test-project", gcs_endpoint + "/")
        assert client.api_endpoint == gcs_endpoint
        blob = client.bucket(bucket).blob("probe")
        blob.upload_from_string(b"x" * (9 * 1024 * 1024))  # resumable upload path too
        blob.upload_from_string(b"small")  # multipart upload path
        assert blob.download_as_bytes() == b"small"

    def test_emulator_host_with_empty_endpoint(
        self,
        make_client: Callable[..., storage.Client],
        gcs_endpoint: str,
        bucket: str,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_endpoint)
        monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)
        store = TaskStore(make_client(None), bucket)
        store.upload_input(TaskRef("job", 0), b"via-env")
        assert store.download(TaskRef("job", 0), TaskObject.INPUT) == b"via-env"

    def test_no_credentials(
        self,
        make_client: Callable[..., storage.Client],
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        for name in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_CONFIG"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HOME", str(tmp_path))
        with pytest.raises(StorageError, match="application-default login"):
            make_client("test-project")


class TestObjects:
    def test_input_round_trip_and_missing_objects(self, store: TaskStore) -> None:
        ref = TaskRef("job-a", 3)
        assert store.download(ref, TaskObject.INPUT) is None
        store.upload_input(ref, b"input bytes")
        assert store.download(ref, TaskObject.INPUT) == b"input bytes"
        assert store.download(ref, TaskObject.RESULT) is None
        assert store.download(TaskRef("job-a", 4), TaskObject.INPUT) is None

    def test_a_missing_object_in_a_bucket_named_bucket_is_no_result(
        self, client: storage.Client
    ) -> None:
        # Only Cloud Storage's own words say the bucket is missing, not the bucket's name.
        name = f"cga-bucket-{uuid.uuid4().hex[:8]}"
        client.create_bucket(name)
        store = TaskStore(client, name)
        assert store.download(TaskRef("job-a", 0), TaskObject.RESULT) is None
        store.upload_input(TaskRef("job-a", 0), b"i")
        assert store.download(TaskRef("job-a", 0), TaskObject.INPUT) == b"i"

    def test_inputs_and_outcomes_go_through_the_environments_proxy(
        self,
        make_client: Callable[..., storage.Client],
        gcs_endpoint: str,
        bucket: str,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        # The input upload and outcome download skip the client's requests session; they must
        # still use the proxy it would use.
        for variable in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy"):
            monkeypatch.delenv(variable, raising=False)
        with ScriptedProxy(gcs_endpoint, status=503, fail_first=0) as proxy:
            monkeypatch.setenv("HTTP_PROXY", proxy.endpoint)
            store = TaskStore(make_client("p", gcs_endpoint), bucket, "runs/cga")
            ref = TaskRef("job-p", 0)
            store.upload_input(ref, b"via the proxy")
            assert store.download(ref, TaskObject.INPUT) == b"via the proxy"
        object_url = f"{gcs_endpoint}/download/storage/v1/b/{bucket}/o/runs%2Fcga%2Fjob-p"
        assert any(path.startswith(f"POST {gcs_endpoint}/upload/") for path in proxy.paths)
        assert any(path.startswith(f"GET {object_url}") for path in proxy.paths)

    def test_objects_land_at_the_layout_names(
        self, store: TaskStore, client: storage.Client, bucket: str
    ) -> None:
        ref = TaskRef("job-a", 3)
        store.upload_input(ref, b"i")
        store.write_cancelled(ref)
        names = sorted(blob.name for blob in client.list_blobs(bucket))
        assert names == ["runs/cga/job-a/tasks/3/cancelled", "runs/cga/job-a/tasks/3/input.pkl"]

    def test_write_if_absent_never_overwrites(self, store: TaskStore) -> None:
        ref = TaskRef("job-a", 0)
        assert store.write_if_absent(ref, TaskObject.RESULT, b"first") is True
        assert store.write_if_absent(ref, TaskObject.RESULT, b"second") is False
        assert store.download(ref, TaskObject.RESULT) == b"first"

    def test_cancel_marker_twice(self, store: TaskStore) -> None:
        ref = TaskRef("job-a", 1)
        store.write_cancelled(ref)
        store.write_cancelled(ref)
        assert store.exists(ref, TaskObject.CANCELLED)
        assert not store.exists(TaskRef("job-a", 0), TaskObject.CANCELLED)

    def test_task_objects_of_one_task_and_of_a_job(self, store: TaskStore) -> None:
        for index in range(12):  # 1 and 10, 11 share a name prefix: they must not mix
            store.upload_input(TaskRef("job-a", index), b"i")
        store.write_if_absent(TaskRef("job-a", 1), TaskObject.RESULT, b"r")
        store.write_if_absent(TaskRef("job-a", 10), TaskObject.ERROR, b"e")
        store.upload(TaskRef("job-a", 10), TaskObject.STDOUT, b"out")
        store.upload_input(TaskRef("job-ab", 1), b"other job")

        assert store.task_objects(TaskRef("job-a", 1)) == {TaskObject.INPUT, TaskObject.RESULT}
        assert store.task_objects(TaskRef("job-a", 99)) == frozenset()
        everything = store.job_task_objects("job-a")
        assert sorted(everything) == list(range(12))
        assert everything[10] == {TaskObject.INPUT, TaskObject.ERROR, TaskObject.STDOUT}
        outcomes = {i: TaskOutcome.of(objects) for i, objects in everything.items()}
        assert outcomes[1] is TaskOutcome.SUCCEEDED
        assert outcomes[10] is TaskOutcome.FAILED
        assert outcomes[5] is TaskOutcome.UNFINISHED

    def test_delete_tasks_and_job(
        self, store: TaskStore, client: storage.Client, bucket: str
    ) -> None:
        entry = ManifestEntry("d", 1, datetime.now(timezone.utc))
        for job in ("job-a", "job-ab"):
            store.write_manifest(job, {0: entry, 1: entry})
            for index in (0, 1):
                store.upload_input(TaskRef(job, index), b"i")
                store.upload(TaskRef(job, index), TaskObject.STDOUT, b"o")

        assert store.delete_tasks("job-a") == 4
        assert store.job_task_objects("job-a") == {}
        assert store.read_manifest("job-a") == {0: entry, 1: entry}
        assert len(store.job_task_objects("job-ab")) == 2
        assert store.delete_job("job-a") == 1
        remaining = sorted(blob.name for blob in client.list_blobs(bucket))
        assert remaining and all(name.startswith("runs/cga/job-ab/") for name in remaining)
        assert store.delete_job("job-a") == 0

    def test_manifest_round_trip(self, store: TaskStore) -> None:
        when = datetime(2024, 5, 1, 12, 0, 30, tzinfo=timezone.utc)
        entries = {0: ManifestEntry("disp-1", 4, when), 7: ManifestEntry("disp-2", 0, when)}
        assert store.read_manifest("job-m") is None
        store.write_manifest("job-m", entries)
        assert store.read_manifest("job-m") == entries

    def test_manifest_rejects_bad_index(self, store: TaskStore) -> None:
        with pytest.raises(ValueError, match="invalid task index"):
            store.write_manifest("job-m", {-1: ManifestEntry("d", 0, datetime.now(timezone.utc))})

    @pytest.mark.parametrize(
        "text",
        ["not json", '{"format": 2, "job_id": "job-m", "tasks": {}}', '{"format": 1}'],
    )
    def test_foreign_manifest(
        self, store: TaskStore, client: storage.Client, bucket: str, text: str
    ) -> None:
        client.bucket(bucket).blob("runs/cga/job-m/manifest.json").upload_from_string(text)
        with pytest.raises(StorageError, match="not a manifest this package wrote"):
            store.read_manifest("job-m")

    def test_large_object(self, store: TaskStore) -> None:
        data = os.urandom(20 * 1024 * 1024)
        store.upload_input(TaskRef("job-big", 0), data)
        assert store.download(TaskRef("job-big", 0), TaskObject.INPUT) == data


class TestErrors:
    def test_missing_bucket(self, client: storage.Client) -> None:
        store = TaskStore(client, "no-such-bucket-cga")
        for call in (
            store.check_bucket,
            lambda: store.upload_input(TaskRef("job", 0), b"x"),
            lambda: store.task_objects(TaskRef("job", 0)),
        ):
            with pytest.raises(
                StorageError, match="gs://no-such-bucket-cga does not exist"
            ) as info:
                call()
            assert "gcloud storage buckets create gs://no-such-bucket-cga" in str(info.value)
            assert info.value.__cause__ is not None

    def test_check_bucket_passes(self, store: TaskStore) -> None:
        store.check_bucket()

    def test_forbidden(
        self, make_client: Callable[..., storage.Client], gcs_endpoint: str, bucket: str
    ) -> None:
        with ScriptedProxy(gcs_endpoint, status=403, fail_first=1_000) as proxy:
            store = TaskStore(make_client("p", proxy.endpoint), bucket)
            with pytest.raises(StorageError, match=r"roles/storage\.objectAdmin") as info:
                store.upload_input(TaskRef("job", 0), b"x")
        assert "403" in str(info.value)
        assert f"gs://{bucket}" in str(info.value)
        assert proxy.requests == 1, proxy.paths  # a 403 is final: not retried

    @pytest.mark.parametrize("status", [429, 500, 503])
    def test_transient_errors_are_retried(
        self,
        make_client: Callable[..., storage.Client],
        gcs_endpoint: str,
        bucket: str,
        status: int,
    ) -> None:
        ref = TaskRef("job", 0)
        with ScriptedProxy(gcs_endpoint, status=status, fail_first=2) as proxy:
            store = TaskStore(make_client("p", proxy.endpoint), bucket)
            assert store.write_if_absent(ref, TaskObject.RESULT, b"r") is True
            assert proxy.failed == 2
            assert store.download(ref, TaskObject.RESULT) == b"r"

    def test_lost_answer_of_a_conditional_write_reads_as_already_there(
        self, make_client: Callable[..., storage.Client], gcs_endpoint: str, bucket: str
    ) -> None:
        # The first write lands but its answer is lost: the retry meets a 412, and "already
        # there" is the truth (the runner then reads which outcome is recorded).
        ref = TaskRef("job", 0)
        with ScriptedProxy(gcs_endpoint, status=503, fail_first=1, lose_answers=True) as proxy:
            store = TaskStore(make_client("p", proxy.endpoint), bucket)
            assert store.write_if_absent(ref, TaskObject.RESULT, b"mine") is False
            assert proxy.requests == 2, proxy.paths
            assert store.download(ref, TaskObject.RESULT) == b"mine"

    # google-cloud-storage does not close the streamed response of a failed download: the
    # socket is closed by the garbage collector, with a ResourceWarning. Not ours to fix.
    @pytest.mark.filterwarnings("ignore::ResourceWarning")
    def test_persistent_errors_give_up(
        self, make_client: Callable[..., storage.Client], gcs_endpoint: str, bucket: str
    ) -> None:
        with ScriptedProxy(gcs_endpoint, status=503, fail_first=1_000) as proxy:
            store = TaskStore(make_client("p", proxy.endpoint), bucket, retry=FAST_RETRY)
            with pytest.raises(StorageError, match="gave up after retrying"):
                store.download(TaskRef("job", 0), TaskObject.RESULT)
            gc.collect()
        assert proxy.requests > 2

    def test_unreachable_endpoint(
        self, make_client: Callable[..., storage.Client], bucket: str
    ) -> None:
        store = TaskStore(
            make_client("p", f"http://127.0.0.1:{_free_port()}"), bucket, retry=FAST_RETRY
        )
        with pytest.raises(StorageError, match="gave up after retrying") as info:
            store.upload_input(TaskRef("job", 0), b"x")
        assert "ConnectionError" in str(info.value)


@pytest.fixture(scope="module")
def batch_endpoint(gcs_endpoint: str) -> Iterator[str]:
    """Our GCS proxy in front of the module's fake-gcs-server: it has the batch API."""
    with anyio.from_thread.start_blocking_portal() as portal:
        served, endpoint = portal.start_task(serve, gcs_endpoint)
        yield endpoint
        served.cancel()


@pytest.fixture
def proxy_admin(batch_endpoint: str) -> Iterator[Callable[..., dict[str, Any]]]:
    """Calls the proxy's admin API; forgets the faults a test planned but did not use."""

    def admin(method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        answer = requests.request(method, f"{batch_endpoint}/_proxy/{path}", json=body, timeout=10)
        answer.raise_for_status()
        result: dict[str, Any] = answer.json()
        return result

    yield admin
    admin("DELETE", "faults")


@pytest.fixture
def batch_store(
    make_client: Callable[..., storage.Client], batch_endpoint: str, bucket: str
) -> TaskStore:
    return TaskStore(make_client("p", batch_endpoint), bucket, "runs/cga", retry=FAST_RETRY)


def write_tasks(client: storage.Client, bucket: str, job_id: str, count: int) -> list[str]:
    """Put an input and a result in each of ``count`` task folders, straight into the bucket."""
    layout = JobLayout("runs/cga", job_id)
    names = [
        layout.object_name(index, obj)
        for index in range(count)
        for obj in (TaskObject.INPUT, TaskObject.RESULT)
    ]
    for name in names:
        client.bucket(bucket).blob(name).upload_from_string(b"x")
    return names


def requests_seen(admin: Callable[..., dict[str, Any]]) -> Counter[str]:
    seen = admin("GET", "stats")
    counts = Counter(seen["requests"])
    counts["batches"] = seen["batches"]
    return counts


class TestBatchDeletes:
    def test_more_than_100_objects_go_in_several_batches(
        self,
        batch_store: TaskStore,
        client: storage.Client,
        bucket: str,
        proxy_admin: Callable[..., dict[str, Any]],
    ) -> None:
        names = write_tasks(client, bucket, "job-many", 130)
        batch_store.write_manifest("job-many", {})
        before = requests_seen(proxy_admin)
        assert batch_store.delete_tasks("job-many") == 260
        seen = requests_seen(proxy_admin) - before
        assert (seen["batches"], seen["DELETE"]) == (3, 260)  # 100 + 100 + 60 calls
        assert seen["GET"] == 1  # one list
        assert not any(client.bucket(bucket).blob(name).exists() for name in names[::13])
        assert batch_store.job_task_objects("job-many") == {}
        assert batch_store.read_manifest("job-many") == {}
        assert batch_store.delete_job("job-many") == 1

    def test_objects_deleted_meanwhile_are_fine_and_not_counted(
        self,
        batch_store: TaskStore,
        client: storage.Client,
        bucket: str,
        proxy_admin: Callable[..., dict[str, Any]],
    ) -> None:
        write_tasks(client, bucket, "job-gone", 3)
        # Deleted (by the call itself) before the store hears of it: a 404 to the store.
        proxy_admin(
            "POST",
            "faults",
            {
                "method": "DELETE",
                "status": 404,
                "lose_answer": True,
                "path": "job-gone/tasks/1/",
                "count": 2,
            },
        )
        assert batch_store.delete_tasks("job-gone") == 4
        assert batch_store.job_task_objects("job-gone") == {}

    def test_transient_failures_are_deleted_again_one_by_one(
        self,
        batch_store: TaskStore,
        client: storage.Client,
        bucket: str,
        proxy_admin: Callable[..., dict[str, Any]],
    ) -> None:
        write_tasks(client, bucket, "job-flaky", 3)
        proxy_admin("POST", "faults", {"method": "DELETE", "status": 503, "count": 1})
        proxy_admin("POST", "faults", {"method": "DELETE", "status": 429, "count": 1})
        before = requests_seen(proxy_admin)
        assert batch_store.delete_tasks("job-flaky") == 6
        seen = requests_seen(proxy_admin) - before
        assert (seen["batches"], seen["DELETE"]) == (1, 6 + 2)
        assert batch_store.job_task_objects("job-flaky") == {}

    @pytest.mark.parametrize("fault", [{"status": 503}, {"drop": True}])
    def test_a_failed_batch_request_is_done_one_by_one(
        self,
        batch_store: TaskStore,
        client: storage.Client,
        bucket: str,
        proxy_admin: Callable[..., dict[str, Any]],
        fault: dict[str, Any],
    ) -> None:
        write_tasks(client, bucket, "job-nobatch", 2)
        proxy_admin("POST", "faults", {"method": "POST", "path": "/batch/", **fault})
        before = requests_seen(proxy_admin)
        assert batch_store.delete_tasks("job-nobatch") == 4
        seen = requests_seen(proxy_admin) - before
        assert (seen["batches"], seen["DELETE"]) == (0, 4)
        assert batch_store.job_task_objects("job-nobatch") == {}

    def test_refused_deletes_raise_a_storage_error_naming_the_folder(
        self,
        batch_store: TaskStore,
        client: storage.Client,
        bucket: str,
        proxy_admin: Callable[..., dict[str, Any]],
    ) -> None:
        write_tasks(client, bucket, "job-refused", 2)
        proxy_admin("POST", "faults", {"method": "DELETE", "status": 403, "path": "tasks/1/"})
        with pytest.raises(
            StorageError, match="refused to delete runs/cga/job-refused/tasks/"
        ) as info:
            batch_store.delete_tasks("job-refused")
        assert f"gs://{bucket}" in str(info.value)
        remaining = batch_store.job_task_objects("job-refused")
        assert remaining == {1: {TaskObject.INPUT}}  # only the refused one, not retried

    @pytest.mark.parametrize("direct", [False, True], ids=["proxy", "fake-gcs-server"])
    def test_names_that_need_quoting(
        self,
        make_client: Callable[..., storage.Client],
        batch_endpoint: str,
        gcs_endpoint: str,
        bucket: str,
        direct: bool,
    ) -> None:
        # Through our proxy, and to fake-gcs-server's own batch API (Go's multipart reader).
        client = make_client("p", gcs_endpoint if direct else batch_endpoint)
        names = ["a b/c d", "ünï/cödé ✓", "x/y/z%2F?#&+=", "plain", "gone"]
        for name in names[:-1]:
            client.bucket(bucket).blob(name).upload_from_string(b"x")
        errors = ObjectHttp(client, bucket).delete_many(names)
        assert errors[:-1] == [None] * 4
        assert isinstance(errors[-1], api_exceptions.NotFound), errors[-1]
        assert "DELETE gone" in str(errors[-1])
        assert [blob.name for blob in client.list_blobs(bucket)] == []

    # 404 and 405: no such endpoint or method; 200: an answer that is not multipart/mixed.
    @pytest.mark.parametrize("status", [404, 405, 200])
    def test_an_endpoint_without_the_batch_api_gets_one_delete_per_object(
        self,
        make_client: Callable[..., storage.Client],
        gcs_endpoint: str,
        bucket: str,
        status: int,
    ) -> None:
        client = make_client("p", gcs_endpoint)
        write_tasks(client, bucket, "job-a", 2)
        write_tasks(client, bucket, "job-b", 2)
        with ScriptedProxy(gcs_endpoint, status=status, fail_first=100, only="/batch/") as proxy:
            store = TaskStore(make_client("p", proxy.endpoint), bucket, "runs/cga")
            assert store.delete_tasks("job-a") == 4
            assert store.delete_tasks("job-b") == 4
        batch_requests = [path for path in proxy.paths if "/batch/" in path]
        assert batch_requests == ["POST /batch/storage/v1"]  # tried once, then remembered
        assert sum(path.startswith("DELETE") for path in proxy.paths) == 8
