"""The fault-injecting GCS proxy: its fault plan, the proxy in front of a real fake-gcs-server
(driven by the real google-cloud-storage client), and its wiring into LocalCloud."""

from __future__ import annotations

import base64
import functools
import gc
import json
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import anyio
import google.cloud.storage as storage
import google_crc32c
import pytest
import requests
from google.api_core import exceptions as api_exceptions
from google.cloud import batch_v1
from google.cloud.storage.retry import DEFAULT_RETRY

from benchmarks.storage_log import StorageLog
from covalent_gcpbatch_array._core.clients import make_storage_client
from covalent_gcpbatch_array.exceptions import LocalCloudError
from covalent_gcpbatch_array.local import LocalCloud
from covalent_gcpbatch_array.local.gcs.fake_gcs import GcsEmulator
from covalent_gcpbatch_array.local.gcs.proxy import StorageFault, StorageFaults, serve
from tests.gcs_batch_client import batch_responses
from tests.polling import job_reached, wait_until

# google-cloud-storage does not close the streamed response of a failed download (see
# test_storage.py); the faults here fail many. Each test collects its own leaks (below).
pytestmark = pytest.mark.filterwarnings(
    "ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning"
)

_T = TypeVar("_T")
BUCKET = "proxy-tests"
#: Retries quickly, so that tests that meet several faults stay short.
QUICK_RETRY = DEFAULT_RETRY.with_delay(initial=0.05, maximum=0.2).with_timeout(20.0)


@pytest.fixture(autouse=True)
def _no_background_bucket_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    # google-cloud-storage 3.x reads bucket metadata from a background thread, for tracing:
    # a GET that would land in the proxy's counts at a random moment.
    monkeypatch.setenv("DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA", "true")


@pytest.fixture(autouse=True)
def collect_leaked_responses() -> Iterator[None]:
    yield
    gc.collect()  # while this module's warning filters apply, not in some later test


class TestStorageFaults:
    def test_faults_are_used_once_in_plan_order(self) -> None:
        faults = StorageFaults()
        faults.add(method="GET", status=503, count=2)
        faults.add(method="GET", status=500, count=1)
        statuses = [faults.take("GET", "/o/a") for _ in range(4)]
        assert [fault.status if fault else None for fault in statuses] == [503, 503, 500, None]
        assert faults.pending() == 0

    def test_method_and_path_must_both_match(self) -> None:
        faults = StorageFaults()
        faults.add(method="POST", path="result.pkl", count=1)
        assert faults.take("GET", "/o/x/result.pkl") is None
        assert faults.take("POST", "/upload?name=x/input.pkl") is None
        fault = faults.take("POST", "/upload?name=x/result.pkl")
        assert fault == StorageFault("POST", "result.pkl", 503, False, False)

    def test_a_later_fault_can_match_before_an_earlier_one(self) -> None:
        faults = StorageFaults()
        faults.add(method="PUT", count=1)
        faults.add(method="*", status=429, count=1)
        fault = faults.take("GET", "/o/a")
        assert fault is not None and fault.status == 429
        assert faults.pending() == 1  # the PUT fault waits for a PUT

    def test_clear_forgets_the_plan(self) -> None:
        faults = StorageFaults()
        faults.add(count=3)
        assert faults.clear() == 3
        assert faults.take("GET", "/") is None

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"method": "FETCH"}, "method 'FETCH' is not one of"),
            ({"status": 200}, "HTTP error status"),
            ({"status": True}, "HTTP error status"),
            ({"count": -1}, "count must be an integer >= 0"),
            ({"path": 3}, "path must be a string"),
        ],
    )
    def test_bad_plans_are_refused(self, kwargs: dict[str, Any], message: str) -> None:
        with pytest.raises(ValueError, match=message):
            StorageFaults().add(**kwargs)


@pytest.fixture(scope="module")
def gcs() -> Iterator[GcsEmulator]:
    with GcsEmulator.start() as emulator:
        emulator.create_bucket(BUCKET, "proxy-project")
        yield emulator


@pytest.fixture
async def proxy(gcs: GcsEmulator) -> AsyncIterator[str]:
    """A proxy served on this test's event loop; yields its endpoint."""
    async with anyio.create_task_group() as tg:
        yield await tg.start(serve, gcs.endpoint)
        tg.cancel_scope.cancel()


async def call(func: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
    """Run a blocking storage call in a thread, so the proxy keeps serving meanwhile."""
    return await anyio.to_thread.run_sync(functools.partial(func, *args, **kwargs))


def bucket_via(endpoint: str) -> storage.Bucket:
    return make_storage_client("proxy-project", endpoint).bucket(BUCKET)


async def admin(endpoint: str, method: str, path: str, body: Any = None) -> requests.Response:
    return await http(method, f"{endpoint}/_proxy/{path}", json=body)


async def http(method: str, url: str, **kwargs: Any) -> requests.Response:
    """A plain HTTP request (in a thread), for what the storage client never sends."""
    return await call(requests.request, method, url, timeout=10, **kwargs)


async def plan(endpoint: str, **fault: Any) -> None:
    answer = await admin(endpoint, "POST", "faults", fault)
    assert answer.status_code == 200, answer.text


async def stats(endpoint: str) -> dict[str, Any]:
    answer = await admin(endpoint, "GET", "stats")
    result: dict[str, Any] = answer.json()
    return result


class TestForwarding:
    @pytest.mark.anyio
    async def test_requests_pass_through_unchanged_and_are_counted(self, proxy: str) -> None:
        blob = bucket_via(proxy).blob("plain/object")
        await call(blob.upload_from_string, b"hello", retry=None)
        # The same Blob object now downloads from the mediaLink of the upload's answer,
        # which the proxy rewrote to point at itself.
        assert blob.media_link.startswith(proxy)
        assert await call(blob.download_as_bytes, retry=None) == b"hello"
        seen = await stats(proxy)
        assert seen["requests"]["POST"] == 1
        assert seen["faulted"] == []
        assert (seen["failed"], seen["dropped"], seen["pending"]) == (0, 0, 0)

    @pytest.mark.anyio
    async def test_resumable_uploads_stay_on_the_proxy(self, proxy: str, gcs: GcsEmulator) -> None:
        # Over 8 MB the client uploads in chunks to the URL fake-gcs-server returns in its
        # Location header; the proxy rewrites it so the chunks meet the faults too.
        data = os.urandom(12 * 1024 * 1024)
        blob = bucket_via(proxy).blob("big/object")
        await call(blob.upload_from_string, data, retry=None)
        assert await call(bucket_via(gcs.endpoint).blob("big/object").download_as_bytes) == data
        assert (await stats(proxy))["requests"].get("PUT", 0) >= 1


class TestFaults:
    @pytest.mark.anyio
    async def test_an_error_status_reaches_the_client_as_googles_error(self, proxy: str) -> None:
        await plan(proxy, method="POST", status=503, count=1)
        blob = bucket_via(proxy).blob("status/object")
        with pytest.raises(api_exceptions.ServiceUnavailable, match="Injected fault"):
            await call(blob.upload_from_string, b"x", retry=None)
        assert (await stats(proxy))["failed"] == 1

    @pytest.mark.anyio
    async def test_transient_errors_are_retried_by_the_client(
        self, proxy: str, gcs: GcsEmulator
    ) -> None:
        await plan(proxy, method="POST", status=503, count=2, path="retried/object")
        await plan(proxy, method="GET", status=429, count=2, path="retried/object")
        blob = bucket_via(proxy).blob("retried/object")
        await call(blob.upload_from_string, b"data", retry=QUICK_RETRY)
        assert await call(blob.download_as_bytes, retry=QUICK_RETRY) == b"data"
        seen = await stats(proxy)
        assert seen["failed"] == 4
        assert seen["requests"]["POST"] == 3

    @pytest.mark.anyio
    async def test_a_dropped_connection_never_reaches_storage(
        self, proxy: str, gcs: GcsEmulator
    ) -> None:
        await plan(proxy, method="POST", drop=True, count=1, path="dropped/object")
        with pytest.raises(requests.ConnectionError):
            await call(
                bucket_via(proxy).blob("dropped/object").upload_from_string, b"x", retry=None
            )
        assert not await call(bucket_via(gcs.endpoint).blob("dropped/object").exists)
        assert (await stats(proxy))["dropped"] == 1

    @pytest.mark.anyio
    async def test_a_lost_answer_means_the_write_happened(
        self, proxy: str, gcs: GcsEmulator
    ) -> None:
        # The client retries a create-if-absent whose first try landed: the retry meets 412.
        await plan(proxy, method="POST", status=503, count=1, lose_answer=True, path="lost/")
        blob = bucket_via(proxy).blob("lost/object")
        with pytest.raises(api_exceptions.PreconditionFailed):
            await call(blob.upload_from_string, b"once", if_generation_match=0, retry=QUICK_RETRY)
        assert await call(bucket_via(gcs.endpoint).blob("lost/object").download_as_bytes) == b"once"
        assert (await stats(proxy))["answers_lost"] == 1

    @pytest.mark.anyio
    async def test_a_download_cut_in_half_is_retried_whole(self, proxy: str) -> None:
        data = os.urandom(256 * 1024)
        blob = bucket_via(proxy).blob("cut/object")
        await call(blob.upload_from_string, data)
        await plan(proxy, method="GET", drop=True, lose_answer=True, path="cut/object?alt=media")
        with pytest.raises((requests.ConnectionError, requests.exceptions.ChunkedEncodingError)):
            await call(blob.download_as_bytes, retry=None)
        await plan(proxy, method="GET", drop=True, lose_answer=True, path="cut/object?alt=media")
        assert await call(blob.download_as_bytes, retry=QUICK_RETRY) == data

    @pytest.mark.anyio
    async def test_a_corrupted_download_fails_the_clients_checksum(self, proxy: str) -> None:
        data = os.urandom(64 * 1024)
        blob = bucket_via(proxy).blob("rot/object")
        await call(blob.upload_from_string, data)
        await plan(proxy, method="GET", corrupt=True, path="rot/object?alt=media")
        with pytest.raises(Exception, match=r"[Cc]hecksum|hash") as info:
            await call(bucket_via(proxy).blob("rot/object").download_as_bytes, retry=None)
        assert "DataCorruption" in type(info.value).__name__
        assert (await stats(proxy))["corrupted"] == 1

    @pytest.mark.anyio
    async def test_path_names_the_object_of_a_multipart_upload(self, proxy: str) -> None:
        # Small uploads name their object in the body, not the URL: the proxy looks there.
        await plan(proxy, method="POST", status=503, path="tasks/1/result.pkl")
        bucket = bucket_via(proxy)
        await call(bucket.blob("job/tasks/0/result.pkl").upload_from_string, b"0", retry=None)
        with pytest.raises(api_exceptions.ServiceUnavailable):
            await call(bucket.blob("job/tasks/1/result.pkl").upload_from_string, b"1", retry=None)
        assert (await stats(proxy))["faulted"] == [
            "POST /upload/storage/v1/b/proxy-tests/o?uploadType=multipart"
            "&name=job/tasks/1/result.pkl"
        ]

    @pytest.mark.anyio
    async def test_an_unreachable_upstream_is_a_502(self) -> None:
        async with anyio.create_task_group() as tg:
            dead = await tg.start(serve, "http://127.0.0.1:9")  # discard port: nobody listens
            with pytest.raises(api_exceptions.BadGateway, match="could not reach"):
                await call(bucket_via(dead).blob("x").download_as_bytes, retry=None)
            tg.cancel_scope.cancel()


def delete_in_a_batch(endpoint: str, names: list[str], **conditions: int) -> list[int]:
    """Delete ``names`` in one batch request of the real client; the status of each call."""
    client = make_storage_client("proxy-project", endpoint)
    with client.batch(raise_exception=False) as batch:
        for name in names:
            client.bucket(BUCKET).blob(name).delete(retry=None, **conditions)
    return [response.status_code for response in batch_responses(batch)]


async def upload_each(endpoint: str, names: list[str]) -> None:
    bucket = bucket_via(endpoint)
    for name in names:
        await call(bucket.blob(name).upload_from_string, name.encode())


async def exists_directly(gcs: GcsEmulator, names: list[str]) -> list[bool]:
    bucket = bucket_via(gcs.endpoint)
    return [await call(bucket.blob(name).exists) for name in names]


class TestAnswersAsGoogle:
    @pytest.mark.anyio
    @pytest.mark.parametrize(("field", "label"), [("crc32c", "CRC32C"), ("md5_hash", "MD5 hash")])
    async def test_an_upload_whose_declared_checksum_does_not_match_is_400(
        self, proxy: str, gcs: GcsEmulator, field: str, label: str
    ) -> None:
        blob = bucket_via(proxy).blob(f"checksum/{field}")
        setattr(blob, field, "AAAAAQ==" if field == "crc32c" else "AAAAAAAAAAAAAAAAAAAAAA==")
        # checksum=None: the client sends the blob's own (wrong) value instead of computing one
        with pytest.raises(api_exceptions.BadRequest, match=f"Provided {label}"):
            await call(blob.upload_from_string, b"hello", checksum=None, retry=None)
        assert await exists_directly(gcs, [f"checksum/{field}"]) == [False]
        assert (await stats(proxy))["refused"] == 1

    @pytest.mark.anyio
    async def test_a_media_upload_with_a_wrong_x_goog_hash_is_400(self, proxy: str) -> None:
        upload = f"{proxy}/upload/storage/v1/b/{BUCKET}/o?uploadType=media&name=hashed"
        answer = await http(
            "POST", upload, data=b"hello", headers={"X-Goog-Hash": "crc32c=AAAAAQ=="}
        )
        assert answer.status_code == 400
        assert answer.json()["error"]["errors"][0]["reason"] == "invalid"
        both = "crc32c=mnG7TA==,md5=XUFAKrxLKna5cZ2REBfFkg=="
        right = await http("POST", upload, data=b"hello", headers={"X-Goog-Hash": both})
        assert right.status_code == 200, right.text

    @pytest.mark.anyio
    @pytest.mark.parametrize("good", [True, False])
    async def test_a_resumable_upload_in_chunks_is_checked_once_complete(
        self, proxy: str, gcs: GcsEmulator, good: bool
    ) -> None:
        # Its last chunk's X-Goog-Hash declares the whole object's CRC32C (as the client sends
        # it over 100 MiB), which only fake-gcs-server sees whole.
        name, first, last = f"chunked/{good}", os.urandom(256 * 1024), b"tail"
        started = await http(
            "POST",
            f"{proxy}/upload/storage/v1/b/{BUCKET}/o?uploadType=resumable",
            json={"name": name},
        )
        session = started.headers["Location"]
        partial = await http(
            "PUT", session, data=first, headers={"Content-Range": f"bytes 0-{len(first) - 1}/*"}
        )
        assert partial.status_code == 308, partial.text
        crc = base64.b64encode(google_crc32c.Checksum(first + last).digest()).decode()
        end = len(first) + len(last)
        headers = {
            "Content-Range": f"bytes {len(first)}-{end - 1}/{end}",
            "X-Goog-Hash": f"crc32c={crc if good else 'AAAAAQ=='}",
        }
        done = await http("PUT", session, data=last, headers=headers)
        assert done.status_code == (200 if good else 400), done.text
        assert await exists_directly(gcs, [name]) == [good]

    @pytest.mark.anyio
    async def test_the_clients_own_checksums_pass(self, proxy: str) -> None:
        blob = bucket_via(proxy).blob("checksum/computed")
        for checksum in ("crc32c", "md5"):
            await call(blob.upload_from_string, b"x" * 1000, checksum=checksum)
        assert (await stats(proxy))["refused"] == 0

    @pytest.mark.anyio
    async def test_a_plain_delete_answers_204_without_a_body(
        self, proxy: str, gcs: GcsEmulator
    ) -> None:
        await upload_each(gcs.endpoint, ["deleted"])
        answer = await http("DELETE", f"{proxy}/storage/v1/b/{BUCKET}/o/deleted")
        assert (answer.status_code, answer.content) == (204, b"")
        missing = await http("DELETE", f"{proxy}/storage/v1/b/{BUCKET}/o/deleted")
        assert missing.status_code == 404


GOOGLE_412 = {
    "code": 412,
    "message": "At least one of the pre-conditions you specified did not hold.",
    "errors": [
        {
            "message": "At least one of the pre-conditions you specified did not hold.",
            "domain": "global",
            "reason": "conditionNotMet",
            "locationType": "header",
            "location": "If-Match",
        }
    ],
}


async def media_upload(
    endpoint: str, name: str, data: bytes, **conditions: int
) -> requests.Response:
    """A simple (uploadType=media) upload, as the executor's ObjectHttp sends it."""
    params = {"uploadType": "media", "name": name, **conditions}
    url = f"{endpoint}/upload/storage/v1/b/{BUCKET}/o"
    return await http("POST", url, params=params, data=data)


async def read_directly(gcs: GcsEmulator, name: str) -> bytes:
    return await call(bucket_via(gcs.endpoint).blob(name).download_as_bytes)


class TestPreconditions:
    """fake-gcs-server ignores most request preconditions; the proxy answers as Google does."""

    @pytest.mark.anyio
    async def test_a_second_media_create_is_412_with_googles_error(
        self, proxy: str, gcs: GcsEmulator
    ) -> None:
        assert (await media_upload(proxy, "media/once", b"first", ifGenerationMatch=0)).ok
        again = await media_upload(proxy, "media/once", b"second", ifGenerationMatch=0)
        assert again.status_code == 412
        assert again.json() == {"error": GOOGLE_412}
        assert await read_directly(gcs, "media/once") == b"first"
        assert (await stats(proxy))["conditions_not_met"] == 1

    @pytest.mark.anyio
    @pytest.mark.parametrize(
        ("condition", "offset", "status"),
        [
            ("ifGenerationMatch", 1, 412),
            ("ifGenerationMatch", 0, 200),
            ("ifGenerationNotMatch", 0, 412),
            ("ifGenerationNotMatch", 1, 200),
            ("ifMetagenerationMatch", 1, 412),
            ("ifMetagenerationNotMatch", 0, 412),
        ],
    )
    async def test_each_condition_of_a_media_upload_is_checked(
        self, proxy: str, gcs: GcsEmulator, condition: str, offset: int, status: int
    ) -> None:
        name = f"media/{condition}-{offset}"
        await upload_each(gcs.endpoint, [name])
        live = await call(bucket_via(gcs.endpoint).get_blob, name)
        current = live.generation if "Generation" in condition else live.metageneration
        answer = await media_upload(proxy, name, b"new", **{condition: current + offset})
        assert answer.status_code == status, answer.text
        assert await read_directly(gcs, name) == (b"new" if status == 200 else name.encode())

    @pytest.mark.anyio
    async def test_a_second_resumable_create_is_412(self, proxy: str, gcs: GcsEmulator) -> None:
        # Over 8 MiB the client uploads resumably (as the runner does a large result): the
        # session URL carries the condition, checked when the upload completes.
        first, second = os.urandom(9 * 1024 * 1024), os.urandom(9 * 1024 * 1024)
        blob = bucket_via(proxy).blob("resumable/once")
        await call(blob.upload_from_string, first, if_generation_match=0, retry=None)
        with pytest.raises(api_exceptions.PreconditionFailed, match="pre-conditions"):
            await call(blob.upload_from_string, second, if_generation_match=0, retry=None)
        assert await read_directly(gcs, "resumable/once") == first

    @pytest.mark.anyio
    async def test_a_multipart_upload_checks_the_metageneration(
        self, proxy: str, gcs: GcsEmulator
    ) -> None:
        await upload_each(gcs.endpoint, ["multipart/meta"])
        blob = bucket_via(proxy).blob("multipart/meta")
        with pytest.raises(api_exceptions.PreconditionFailed):
            await call(blob.upload_from_string, b"new", if_metageneration_match=5, retry=None)
        assert await read_directly(gcs, "multipart/meta") == b"multipart/meta"

    @pytest.mark.anyio
    async def test_reads_answer_412_or_304(self, proxy: str, gcs: GcsEmulator) -> None:
        await upload_each(gcs.endpoint, ["read/me"])
        bucket = bucket_via(proxy)
        generation = (await call(bucket.get_blob, "read/me")).generation
        blob = bucket.blob("read/me")
        with pytest.raises(api_exceptions.PreconditionFailed):
            await call(blob.download_as_bytes, if_generation_match=generation + 1, retry=None)
        with pytest.raises(api_exceptions.NotModified):  # Google: a read's "NotMatch" is a 304
            await call(blob.download_as_bytes, if_generation_not_match=generation, retry=None)
        with pytest.raises(api_exceptions.PreconditionFailed):
            await call(bucket.get_blob, "read/me", if_metageneration_match=7, retry=None)
        held = await call(blob.download_as_bytes, if_generation_match=generation, retry=None)
        assert held == b"read/me"

    @pytest.mark.anyio
    async def test_a_delete_whose_condition_fails_keeps_the_object(
        self, proxy: str, gcs: GcsEmulator
    ) -> None:
        await upload_each(gcs.endpoint, ["delete/kept"])
        blob = bucket_via(proxy).blob("delete/kept")
        with pytest.raises(api_exceptions.PreconditionFailed):
            await call(blob.delete, if_generation_match=0, retry=None)
        assert await exists_directly(gcs, ["delete/kept"]) == [True]
        statuses = await call(delete_in_a_batch, proxy, ["delete/kept"], if_generation_match=1)
        assert statuses == [412]
        assert await exists_directly(gcs, ["delete/kept"]) == [True]

    @pytest.mark.anyio
    async def test_of_concurrent_creates_exactly_one_wins(
        self, proxy: str, gcs: GcsEmulator
    ) -> None:
        statuses: list[int] = []

        async def create(data: bytes) -> None:
            answer = await media_upload(proxy, "race/once", data, ifGenerationMatch=0)
            statuses.append(answer.status_code)

        async with anyio.create_task_group() as tg:
            for writer in range(8):
                tg.start_soon(create, b"writer %d" % writer)
        assert sorted(statuses) == [200] + [412] * 7
        assert (await read_directly(gcs, "race/once")).startswith(b"writer ")

    @pytest.mark.anyio
    async def test_a_condition_that_is_not_a_number_is_400(self, proxy: str) -> None:
        answer = await media_upload(proxy, "media/bad", b"x", ifGenerationMatch="zero")  # type: ignore[arg-type]
        assert answer.status_code == 400
        assert "ifGenerationMatch" in answer.json()["error"]["message"]


class TestBatch:
    @pytest.mark.anyio
    async def test_the_clients_batch_deletes_reach_fake_gcs_server(
        self, proxy: str, gcs: GcsEmulator
    ) -> None:
        names = [f"batch/{i}" for i in range(3)]
        await upload_each(gcs.endpoint, names)
        statuses = await call(delete_in_a_batch, proxy, [*names, "batch/missing"])
        assert statuses == [204, 204, 204, 404]  # as Google answers a delete, in a batch too
        assert await exists_directly(gcs, names) == [False, False, False]
        seen = await stats(proxy)
        assert seen["batches"] == 1
        assert seen["requests"] == {"POST": 1, "DELETE": 4}  # the batch, and each call in it
        assert seen["forwarded"] == 4

    @pytest.mark.anyio
    async def test_a_patch_in_a_batch_carries_its_body(self, proxy: str, gcs: GcsEmulator) -> None:
        await upload_each(gcs.endpoint, ["patched"])
        client = make_storage_client("proxy-project", proxy)

        def patch() -> None:
            with client.batch():
                blob = client.bucket(BUCKET).blob("patched")
                blob.metadata = {"colour": "blue"}
                blob.patch(retry=None)

        await call(patch)
        reread = await call(bucket_via(gcs.endpoint).get_blob, "patched")
        assert reread is not None and reread.metadata == {"colour": "blue"}

    @pytest.mark.anyio
    async def test_more_than_100_calls_are_refused(self, proxy: str) -> None:
        with pytest.raises(api_exceptions.BadRequest, match="at most 100 calls"):
            await call(delete_in_a_batch, proxy, [f"many/{i}" for i in range(101)])

    @pytest.mark.anyio
    async def test_a_malformed_batch_is_a_400(self, proxy: str) -> None:
        answer = await http(
            "POST",
            f"{proxy}/batch/storage/v1",
            data=b"{}",
            headers={"Content-Type": "application/json"},
        )
        assert answer.status_code == 400
        assert "multipart/mixed" in answer.json()["error"]["message"]

    @pytest.mark.anyio
    async def test_a_malformed_part_is_refused_alone(self, proxy: str, gcs: GcsEmulator) -> None:
        # The first call as ObjectHttp.delete_many writes it; the second as its first version
        # did, its head ended by no blank line of its own (the CRLF before "--b1" is the
        # delimiter's, RFC 2046), which fake-gcs-server's own batch API refuses too.
        await upload_each(gcs.endpoint, ["raw/kept", "raw/deleted"])
        good = b"DELETE /storage/v1/b/%s/o/raw%%2Fdeleted HTTP/1.1\r\n\r\n" % BUCKET.encode()
        bad = b"DELETE /storage/v1/b/%s/o/raw%%2Fkept HTTP/1.1\r\n" % BUCKET.encode()
        body = b"".join(
            b"--b1\r\nContent-Type: application/http\r\nContent-ID: <c+%d>\r\n\r\n%s\r\n"
            % (index, call_)
            for index, call_ in enumerate([good, bad])
        )
        answer = await http(
            "POST",
            f"{proxy}/batch/storage/v1",
            data=body + b"--b1--\r\n",
            headers={"Content-Type": "multipart/mixed; boundary=b1"},
        )
        assert answer.status_code == 200
        boundary = answer.headers["Content-Type"].split("boundary=")[1].encode()
        first, second = answer.content.split(b"--" + boundary)[1:-1]
        assert b"Content-ID: <response-c+0>\r\n\r\nHTTP/1.1 204 No Content\r\n" in first
        assert b"Content-ID: <response-c+1>\r\n\r\nHTTP/1.1 400 Bad Request\r\n" in second
        error = json.loads(second.split(b"\r\n\r\n", 2)[2])["error"]
        assert error["errors"][0]["reason"] == "invalid"
        assert "part 2 of the batch request (Content-ID c+1)" in error["message"]
        assert "not ended by an empty line" in error["message"]
        assert await exists_directly(gcs, ["raw/kept", "raw/deleted"]) == [True, False]
        seen = await stats(proxy)
        assert (seen["requests"], seen["refused"]) == ({"POST": 1, "DELETE": 1}, 1)


class TestBatchFaults:
    @pytest.mark.anyio
    async def test_a_fault_hits_one_call_of_a_batch(self, proxy: str, gcs: GcsEmulator) -> None:
        names = [f"one-fault/{i}" for i in range(3)]
        await upload_each(gcs.endpoint, names)
        await plan(proxy, method="DELETE", status=503, path="one-fault/1")
        assert await call(delete_in_a_batch, proxy, names) == [204, 503, 204]
        assert await exists_directly(gcs, names) == [False, True, False]
        seen = await stats(proxy)
        assert seen["faulted"] == [f"DELETE /storage/v1/b/{BUCKET}/o/one-fault/1?prettyPrint=false"]
        assert (seen["failed"], seen["forwarded"]) == (1, 2)

    @pytest.mark.anyio
    async def test_a_lost_answer_in_a_batch_means_the_call_happened(
        self, proxy: str, gcs: GcsEmulator
    ) -> None:
        names = ["lost-in-batch/0", "lost-in-batch/1"]
        await upload_each(gcs.endpoint, names)
        await plan(proxy, method="DELETE", status=500, lose_answer=True, path="lost-in-batch/0")
        assert await call(delete_in_a_batch, proxy, names) == [500, 204]
        assert await exists_directly(gcs, names) == [False, False]
        assert (await stats(proxy))["answers_lost"] == 1

    @pytest.mark.anyio
    async def test_a_drop_in_a_batch_loses_the_whole_answer(
        self, proxy: str, gcs: GcsEmulator
    ) -> None:
        names = [f"dropped-batch/{i}" for i in range(3)]
        await upload_each(gcs.endpoint, names)
        await plan(proxy, method="DELETE", drop=True, path="dropped-batch/1")
        with pytest.raises(requests.ConnectionError):
            await call(delete_in_a_batch, proxy, names)
        # Calls run in order: the one before the drop happened, the rest never did.
        assert await exists_directly(gcs, names) == [False, True, True]
        assert (await stats(proxy))["dropped"] == 1

    @pytest.mark.anyio
    async def test_a_fault_can_hit_the_batch_request_itself(
        self, proxy: str, gcs: GcsEmulator
    ) -> None:
        await upload_each(gcs.endpoint, ["whole-batch"])
        await plan(proxy, method="POST", status=503, path="/batch/")
        with pytest.raises(api_exceptions.ServiceUnavailable, match="Injected fault"):
            await call(delete_in_a_batch, proxy, ["whole-batch"])
        assert await exists_directly(gcs, ["whole-batch"]) == [True]
        assert (await stats(proxy))["batches"] == 0


class TestBatchCounting:
    @pytest.mark.anyio
    async def test_the_benchmarks_storage_log_counts_each_call_once(self, tmp_path: Path) -> None:
        # benchmarks/storage_log.py counts fake-gcs-server's log lines: the batch request never
        # reaches it, each of its calls does, as an ordinary request.
        with GcsEmulator.start(log_dir=tmp_path, log_level="info") as gcs:
            gcs.create_bucket(BUCKET, "proxy-project")
            names = [f"counted/{i}" for i in range(3)]
            await upload_each(gcs.endpoint, names)
            log = StorageLog.of(tmp_path)
            async with anyio.create_task_group() as tg:
                endpoint = await tg.start(serve, gcs.endpoint)
                await call(delete_in_a_batch, endpoint, [*names, "counted/missing"])
                tg.cancel_scope.cancel()
            # The server logs a request once it has answered it: wait for the last line.
            assert await call(wait_until, lambda: sum(log.operations().values()) >= 4)
            assert log.operations() == {"delete": 4}


class TestAdmin:
    @pytest.mark.anyio
    async def test_bad_plans_answer_400_with_the_reason(self, proxy: str) -> None:
        answer = await admin(proxy, "POST", "faults", {"method": "GET", "colour": "red"})
        assert answer.status_code == 400
        assert "unknown fields ['colour']" in answer.json()["error"]["message"]
        answer = await admin(proxy, "POST", "faults", {"status": 302})
        assert answer.status_code == 400

    @pytest.mark.anyio
    async def test_delete_forgets_the_plan(self, proxy: str) -> None:
        await plan(proxy, count=5)
        answer = await admin(proxy, "DELETE", "faults")
        assert answer.json() == {"cleared": 5}
        assert (await stats(proxy))["pending"] == 0

    @pytest.mark.anyio
    async def test_unknown_admin_paths_are_404(self, proxy: str) -> None:
        assert (await admin(proxy, "GET", "nothing")).status_code == 404


def task_storage_host(cloud: LocalCloud, job_id: str = "storage-host") -> str:
    """The STORAGE_EMULATOR_HOST a task of the cloud's Batch emulator sees."""
    client = cloud.batch_client()
    runnable = batch_v1.Runnable(
        script=batch_v1.Runnable.Script(text="echo $STORAGE_EMULATOR_HOST")
    )
    group = batch_v1.TaskGroup(task_spec=batch_v1.TaskSpec(runnables=[runnable]), task_count=1)
    job = client.create_job(
        parent=f"projects/{cloud.project_id}/locations/{cloud.region}",
        job_id=job_id,
        job=batch_v1.Job(task_groups=[group]),
    )
    assert job_reached(client, job.name).status.state.name == "SUCCEEDED"
    return cloud.task_output(job_id, 0).strip()


class TestLocalCloudWiring:
    def test_clients_and_tasks_reach_storage_through_the_proxy(
        self, wait_process_gone: Callable[[int], bool]
    ) -> None:
        with LocalCloud(gcs_faults=True, preload=()) as cloud:
            assert cloud.storage_endpoint != cloud.gcs_endpoint
            assert cloud.executor_config()["storage_api_endpoint"] == cloud.storage_endpoint
            assert cloud.environment() == {"STORAGE_EMULATOR_HOST": cloud.storage_endpoint}
            cloud.fail_storage("GET", status=503, count=1, path="wired?alt=media")
            blob = cloud.storage_client().bucket(cloud.bucket_name).blob("wired")
            blob.upload_from_string(b"x")
            with pytest.raises(api_exceptions.ServiceUnavailable):
                blob.download_as_bytes(retry=None)
            direct = cloud.storage_client(direct=True).bucket(cloud.bucket_name).blob("wired")
            assert direct.download_as_bytes() == b"x"
            seen = cloud.storage_stats()
            assert seen["failed"] == 1 and seen["requests"]["POST"] == 1
            with pytest.raises(LocalCloudError, match="GCS proxy refused POST"):
                cloud.fail_storage("BREW")
            assert cloud.clear_storage_faults() == 0
            assert task_storage_host(cloud) == cloud.storage_endpoint
            proxy_pid = cloud.gcs_proxy_pid
            assert proxy_pid is not None and cloud.is_running()
        assert wait_process_gone(proxy_pid)

    def test_the_proxy_runs_by_default_without_faults(self, local_cloud: LocalCloud) -> None:
        assert local_cloud.storage_endpoint != local_cloud.gcs_endpoint
        assert local_cloud.gcs_proxy_pid is not None
        assert "batches" in local_cloud.storage_stats()
        # Tasks too: a large outcome is a resumable upload, whose condition only the proxy checks.
        host = task_storage_host(local_cloud, f"storage-host-{uuid.uuid4().hex[:8]}")
        assert host == local_cloud.storage_endpoint
        with pytest.raises(LocalCloudError, match=r"LocalCloud\(gcs_faults=True\)"):
            local_cloud.fail_storage("GET")

    def test_without_the_proxy_clients_reach_fake_gcs_server_directly(self) -> None:
        with LocalCloud(gcs_proxy=False, preload=()) as cloud:
            assert cloud.storage_endpoint == cloud.gcs_endpoint
            assert cloud.gcs_proxy_pid is None
            with pytest.raises(LocalCloudError, match=r"without its storage proxy"):
                cloud.storage_stats()

    def test_faults_need_the_proxy(self) -> None:
        with pytest.raises(ValueError, match="gcs_faults needs the proxy"):
            LocalCloud(gcs_faults=True, gcs_proxy=False)


def test_local_clouds_storage_endpoint_refuses_a_wrong_checksum(local_cloud: LocalCloud) -> None:
    """The executor's path (LocalCloud's storage endpoint is the proxy by default) checks them."""
    bucket = local_cloud.storage_client().bucket(local_cloud.bucket_name)
    blob = bucket.blob(f"checksum-{uuid.uuid4().hex}")
    blob.crc32c = "AAAAAQ=="
    with pytest.raises(api_exceptions.BadRequest, match="Provided CRC32C"):
        blob.upload_from_string(b"hello", checksum=None, retry=None)
    assert not local_cloud.storage_client(direct=True).bucket(bucket.name).blob(blob.name).exists()


def test_local_clouds_storage_endpoint_refuses_a_second_media_create(
    local_cloud: LocalCloud,
) -> None:
    """The executor's simple uploads (``_core/object_http.py``) meet Google's preconditions."""
    name = f"media-create-{uuid.uuid4().hex}"
    url = f"{local_cloud.storage_endpoint}/upload/storage/v1/b/{local_cloud.bucket_name}/o"
    params = {"uploadType": "media", "name": name, "ifGenerationMatch": "0"}
    assert requests.post(url, params=params, data=b"first", timeout=10).status_code == 200
    again = requests.post(url, params=params, data=b"second", timeout=10)
    assert (again.status_code, again.json()) == (412, {"error": GOOGLE_412})
