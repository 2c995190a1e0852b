"""The Logging v2 and Storage v1 calls the CLI and the executor make, checked against Google's spec.

Google's discovery documents ship offline in google-api-python-client
(``googleapiclient/discovery_cache/documents/{logging.v2,storage.v1}.json``); they are read at
test time, never copied. The real clients (google-cloud-logging, google-cloud-storage through
the executor's TaskStore) talk to the local cloud while every HTTP exchange is recorded; each
request must be a method of the document with its parameters and body fields, and each answer
must use only the schema's fields and carry every field the clients read.
"""

from __future__ import annotations

import json
import re
import urllib.parse
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cache
from importlib import resources
from typing import Any

import pytest
import requests
from google.auth.transport.urllib3 import AuthorizedHttp
from google.cloud import batch_v1

from covalent_gcpbatch_array._core.clients import make_logging_client, make_storage_client
from covalent_gcpbatch_array._core.contract import TaskRef
from covalent_gcpbatch_array._core.storage import TaskObject, TaskStore
from covalent_gcpbatch_array.local import LocalCloud
from covalent_gcpbatch_array.local.gcs.batch_requests import InnerRequest, parse_batch_request
from covalent_gcpbatch_array.local.gcs.checksums import multipart_parts
from covalent_gcpbatch_array.local.logging.api import REQUEST_FIELDS
from tests.polling import job_reached

#: Fields of an answer the clients read (google-cloud-logging's entry parser, and what
#: google-cloud-storage's Blob and the executor use), by schema.
READ_FIELDS: Mapping[str, frozenset[str]] = {
    "LogEntry": frozenset(
        {"logName", "resource", "labels", "severity", "textPayload", "timestamp", "insertId"}
    ),
    "MonitoredResource": frozenset({"type", "labels"}),
    "Object": frozenset({"name", "bucket", "generation", "metageneration", "size", "crc32c"}),
    "Bucket": frozenset({"name"}),
}


@cache
def discovery(name: str) -> dict[str, Any]:
    """A discovery document of google-api-python-client (a dev dependency), e.g. "storage.v1"."""
    documents = resources.files("googleapiclient") / "discovery_cache" / "documents"
    loaded: dict[str, Any] = json.loads((documents / f"{name}.json").read_text())
    return loaded


@dataclass(frozen=True)
class Exchange:
    """One recorded HTTP request and its answer."""

    method: str
    url: str
    headers: Mapping[str, str]
    body: bytes
    status: int
    answer: bytes


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Exchange]]:
    """Every exchange the real clients make through ``requests``, and the executor through
    google-auth's urllib3 transport, while the test runs."""
    exchanges: list[Exchange] = []
    send = requests.adapters.HTTPAdapter.send

    def recording_send(
        adapter: requests.adapters.HTTPAdapter, request: requests.PreparedRequest, **kwargs: Any
    ) -> requests.Response:
        response = send(adapter, request, **kwargs)
        body = request.body if isinstance(request.body, bytes) else str(request.body or "")
        exchanges.append(
            Exchange(
                method=str(request.method),
                url=str(request.url),
                headers={key: str(value) for key, value in request.headers.items()},
                body=body.encode() if isinstance(body, str) else body,
                status=response.status_code,
                answer=response.content,
            )
        )
        return response

    urlopen = AuthorizedHttp.urlopen

    def recording_urlopen(
        http: AuthorizedHttp,
        method: str,
        url: str,
        body: Any = None,
        headers: Any = None,
        **kw: Any,
    ) -> Any:
        # The executor's hot path (ObjectHttp: media uploads and downloads, batch deletes).
        response = urlopen(http, method, url, body=body, headers=headers, **kw)
        exchanges.append(
            Exchange(
                method=method,
                url=url,
                headers={key: str(value) for key, value in (headers or {}).items()},
                body=body.encode() if isinstance(body, str) else body or b"",
                status=response.status,
                answer=response.data,
            )
        )
        return response

    monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", recording_send)
    monkeypatch.setattr(AuthorizedHttp, "urlopen", recording_urlopen)
    yield exchanges


def _methods(document: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every method of a discovery document, in all its (nested) resources."""
    for resource in document.get("resources", {}).values():
        yield from resource.get("methods", {}).values()
        yield from _methods(resource)


def _template_pattern(path: str) -> re.Pattern[str]:
    """A discovery path template as a regex over the percent-encoded request path."""
    pattern = re.escape(path)
    pattern = re.sub(r"\\\{(?:\\\+)?(\w+)\\\}", r"(?P<\1>[^/]+)", pattern)
    return re.compile(pattern + "$")


def find_method(document: Mapping[str, Any], http_method: str, path: str) -> dict[str, Any]:
    """The method that ``http_method path`` calls, by the document's path templates.

    :param path: relative to the service's root, e.g. ``storage/v1/b/x/o`` or ``upload/...``
    """
    service = document["servicePath"]
    for method in _methods(document):
        if method["httpMethod"] != http_method:
            continue
        candidates = [service + method["path"]]
        for protocol in method.get("mediaUpload", {}).get("protocols", {}).values():
            candidates.append(protocol["path"].lstrip("/"))
            candidates.append(protocol["path"].lstrip("/").removeprefix("resumable/"))
        if method.get("supportsMediaDownload"):
            candidates.append("download/" + service + method["path"])
        if any(_template_pattern(candidate).match(path) for candidate in candidates):
            return method
    raise AssertionError(f"{http_method} /{path} is no method of {document['id']}")


def check_fields(document: Mapping[str, Any], schema: str, value: Any, where: str) -> None:
    """Every key of ``value`` is a property of ``schema``, recursively into $ref'd schemas."""
    properties = document["schemas"][schema]["properties"]
    assert isinstance(value, dict), f"{where}: expected a {schema} object, got {value!r}"
    unknown = sorted(set(value) - set(properties))
    assert not unknown, f"{where}: {schema} has no field(s) {unknown}"
    for key, item in value.items():
        spec = properties[key]
        if "$ref" in spec:
            check_fields(document, spec["$ref"], item, f"{where}.{key}")
        elif spec.get("type") == "array" and "$ref" in spec.get("items", {}):
            for number, element in enumerate(item):
                check_fields(document, spec["items"]["$ref"], element, f"{where}.{key}[{number}]")


def check_read_fields(schema: str, value: Mapping[str, Any], where: str) -> None:
    missing = sorted(READ_FIELDS.get(schema, frozenset()) - set(value))
    assert not missing, f"{where}: the clients read {missing} of a {schema}, absent here"


def check_request(document: Mapping[str, Any], exchange: Exchange, base: str) -> dict[str, Any]:
    """Check one request against the document; the method it calls."""
    split = urllib.parse.urlsplit(exchange.url)
    path = split.path.removeprefix(urllib.parse.urlsplit(base).path).lstrip("/")
    method = find_method(document, exchange.method, path)
    allowed = set(method.get("parameters", {})) | set(document["parameters"])
    query = urllib.parse.parse_qs(split.query, keep_blank_values=True)
    unknown = sorted(set(query) - allowed)
    assert not unknown, f"{exchange.method} {split.path}: {method['id']} has no parameter {unknown}"
    request_schema = method.get("request", {}).get("$ref")
    content_type = exchange.headers.get("Content-Type", "")
    if request_schema and content_type.startswith("application/json") and exchange.body:
        check_fields(document, request_schema, json.loads(exchange.body), method["id"])
    elif request_schema and content_type.startswith("multipart/related"):
        parts = multipart_parts(content_type.encode(), exchange.body)
        assert parts is not None, f"{method['id']}: a multipart upload that does not parse"
        check_fields(document, request_schema, parts[0], f"{method['id']} metadata")
    return method


def check_answer(
    document: Mapping[str, Any], method: Mapping[str, Any], exchange: Exchange
) -> None:
    """A 2xx JSON answer uses only the response schema's fields and has those the clients read."""
    response_schema = method.get("response", {}).get("$ref")
    if exchange.status == 204 or not response_schema or not 200 <= exchange.status < 300:
        return
    if exchange.answer[:1] != b"{":
        return  # a media download
    answer = json.loads(exchange.answer)
    check_fields(document, response_schema, answer, method["id"])
    check_read_fields(response_schema, answer, method["id"])


class TestStorage:
    def test_the_executors_calls_are_storage_v1_methods_and_answered_in_its_schema(
        self, local_cloud: LocalCloud, recorded: list[Exchange]
    ) -> None:
        document = discovery("storage.v1")
        client = make_storage_client(local_cloud.project_id, local_cloud.storage_endpoint)
        store = TaskStore(client, local_cloud.bucket_name, prefix=f"contract-{uuid.uuid4().hex}")
        job_id = f"contract-{uuid.uuid4().hex[:12]}"
        ref = TaskRef(job_id, 0)
        store.check_bucket()
        store.upload_input(ref, b"input")
        assert store.write_if_absent(ref, TaskObject.RESULT, b"result")
        assert not store.write_if_absent(ref, TaskObject.RESULT, b"again")
        assert store.download(ref, TaskObject.RESULT) == b"result"
        assert store.download(ref, TaskObject.ERROR) is None
        store.renew_lease(job_id)
        assert store.lease_age(job_id, datetime.now(timezone.utc)) is not None
        assert store.delete_job(job_id) == 3  # in a batch request

        called = []
        for exchange in recorded:
            split = urllib.parse.urlsplit(exchange.url)
            if split.path == "/" + document["batchPath"]:
                content_type = exchange.headers["Content-Type"]
                for call in parse_batch_request(content_type, exchange.body):
                    assert isinstance(call, InnerRequest), f"a batch part refused: {call}"
                    inner = Exchange(call.method, call.target, {}, call.body, 204, b"")
                    called.append(check_request(document, inner, "")["id"])
                continue
            method = check_request(document, exchange, local_cloud.storage_endpoint)
            check_answer(document, method, exchange)
            called.append(method["id"])
        expected = {"objects.list", "objects.insert", "objects.get", "objects.delete"}
        assert {f"storage.{name}" for name in expected} <= set(called), called


def _run_logged_job(cloud: LocalCloud) -> batch_v1.Job:
    client = cloud.batch_client()
    job = batch_v1.Job(
        task_groups=[
            batch_v1.TaskGroup(
                task_count=1,
                task_spec=batch_v1.TaskSpec(
                    runnables=[batch_v1.Runnable(script=batch_v1.Runnable.Script(text="echo hi"))]
                ),
            )
        ],
        logs_policy=batch_v1.LogsPolicy(destination=batch_v1.LogsPolicy.Destination.CLOUD_LOGGING),
    )
    made = client.create_job(
        parent=f"projects/{cloud.project_id}/locations/{cloud.region}",
        job=job,
        job_id=f"contract-{uuid.uuid4().hex[:12]}",
    )
    job_reached(client, made.name, {"SUCCEEDED", "FAILED"})
    return made


class TestLogging:
    def test_the_cli_query_is_logging_v2_entries_list_answered_in_its_schema(
        self, local_cloud: LocalCloud, recorded: list[Exchange]
    ) -> None:
        document = discovery("logging.v2")
        job = _run_logged_job(local_cloud)
        recorded.clear()
        client = make_logging_client(local_cloud.project_id, local_cloud.batch_endpoint)
        # The shape of cli/ops.py's query: the task's log, by job uid and task id, since creation
        since = job.create_time.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        query = (
            f'logName="projects/{local_cloud.project_id}/logs/batch_task_logs" '
            f'AND labels.job_uid="{job.uid}" AND labels.task_id="{job.uid}-group0-0" '
            f'AND timestamp>="{since}"'
        )
        assert [entry.payload for entry in client.list_entries(filter_=query, page_size=1000)] == [
            "hi"
        ]
        assert len(recorded) == 1
        exchange = recorded[0]
        method = check_request(document, exchange, local_cloud.batch_endpoint)
        assert method["id"] == "logging.entries.list"
        answer = json.loads(exchange.answer)
        check_fields(document, "ListLogEntriesResponse", answer, "entries.list")
        for entry in answer["entries"]:
            check_read_fields("LogEntry", entry, "entries.list entry")
            check_read_fields("MonitoredResource", entry["resource"], "entry resource")

    def test_the_emulator_reads_exactly_the_request_fields_google_defines(self) -> None:
        schema = discovery("logging.v2")["schemas"]["ListLogEntriesRequest"]
        assert set(schema["properties"]) == REQUEST_FIELDS

    def test_an_unknown_request_field_is_400(self, local_cloud: LocalCloud) -> None:
        answer = requests.post(
            f"{local_cloud.batch_endpoint}/v2/entries:list",
            json={"resourceNames": [f"projects/{local_cloud.project_id}"], "fliter": "x"},
            timeout=30,
        )
        assert answer.status_code == 400
        assert "fliter" in answer.json()["error"]["message"]
