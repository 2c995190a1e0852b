"""The bucket layout of a job and the object I/O over google-cloud-storage.

Every object a job uses lives under one folder::

    gs://{bucket}/{prefix}/{job_id}/manifest.json          which electron each task runs
    gs://{bucket}/{prefix}/{job_id}/lease                  renewed while the executor waits
    gs://{bucket}/{prefix}/{job_id}/tasks/{index}/input.pkl
                                                .../result.pkl, error.pkl, cancelled
                                                .../stdout.{attempt}, stderr.{attempt}

A task creates objects and never replaces one: its outcome and each attempt's output are
written with ``if_generation_match=0`` under names no other attempt uses, so the tasks' service
account needs only ``storage.objectCreator`` and ``storage.objectViewer`` on the bucket.

Object names are built only from ids the executor made (a validated job id, a non-negative task
index, a validated prefix, and the fixed names of :class:`TaskObject`): nothing a user function
returns can choose a path.

The I/O of :class:`TaskStore` is synchronous on purpose: the runner calls it directly; the
executor goes through :class:`AsyncTaskStore`, which runs each call in a worker thread. Every request is retried by the client's ``DEFAULT_RETRY``
(429, 5xx, dropped connections), and every failure that remains is translated to
:class:`~covalent_gcpbatch_array.exceptions.StorageError` in one place, :func:`_storage_errors`.
Deleting a folder is the exception to the retry: it sends batch requests of 100 deletes, not
retried as such, and sends again one by one what failed transiently
(:meth:`TaskStore._delete_batch`).
"""

from __future__ import annotations

import contextlib
import enum
import functools
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime

import anyio
import google.auth.exceptions
import google.cloud.exceptions
import google.cloud.storage as storage
import requests
import urllib3
from google.api_core import exceptions as api_exceptions
from google.api_core.retry import Retry, exponential_sleep_generator
from google.cloud.storage.retry import DEFAULT_RETRY

from covalent_gcpbatch_array._core.compat import retry_predicate, storage_credentials
from covalent_gcpbatch_array._core.contract import TaskRef, validate_job_id, validate_prefix
from covalent_gcpbatch_array._core.object_http import BatchUnsupported, BucketNotFound, ObjectHttp
from covalent_gcpbatch_array.exceptions import StorageError

__all__ = [
    "INPUT_SLOTS",
    "INPUT_THREADS",
    "OTHER_THREADS",
    "AsyncTaskStore",
    "JobLayout",
    "ManifestEntry",
    "TaskObject",
    "TaskOutcome",
    "TaskStore",
]

_MANIFEST_NAME = "manifest.json"
_MANIFEST_FORMAT = 1
_LEASE_NAME = "lease"
_BATCH_CALLS = 100  # calls per batch request: the most Cloud Storage takes in one


class TaskObject(str, enum.Enum):
    """The objects of one task's folder; the value is the object's file name."""

    INPUT = "input.pkl"  # the signed input envelope, written by the executor
    RESULT = "result.pkl"  # the signed result envelope, written once by the runner
    ERROR = "error.pkl"  # the signed error envelope, written once by the runner
    STDOUT = "stdout"  # the task's captured standard output, one per attempt (stdout.0, ...)
    STDERR = "stderr"  # the task's captured standard error, one per attempt (stderr.0, ...)
    CANCELLED = "cancelled"  # empty marker: the executor cancelled this task


#: The objects written once per attempt, named ``{value}.{attempt}``.
_OUTPUTS = (TaskObject.STDOUT, TaskObject.STDERR)


class TaskOutcome(enum.Enum):
    """What a task's folder says about it, in the order the runner checks them."""

    CANCELLED = "cancelled"  # the marker is there: the task must not run (again)
    SUCCEEDED = "succeeded"  # result.pkl is there
    FAILED = "failed"  # error.pkl is there: the user's function raised
    UNFINISHED = "unfinished"  # none of the above yet

    @classmethod
    def of(cls, objects: frozenset[TaskObject]) -> TaskOutcome:
        """The outcome that a task folder holding ``objects`` records."""
        if TaskObject.CANCELLED in objects:
            return cls.CANCELLED
        if TaskObject.RESULT in objects:
            return cls.SUCCEEDED
        if TaskObject.ERROR in objects:
            return cls.FAILED
        return cls.UNFINISHED


@dataclass(frozen=True)
class JobLayout:
    """The object names of one job's folder."""

    prefix: str  # the executor's bucket prefix (see contract.validate_prefix)
    job_id: str  # the Batch job id

    def __post_init__(self) -> None:
        validate_job_id(self.job_id)
        validate_prefix(self.prefix)

    @classmethod
    def from_folder(cls, folder: str) -> JobLayout:
        """Split a job folder ``{prefix}/{job_id}`` (the runner's ``CGA_JOB_PREFIX``)."""
        prefix, _, job_id = validate_prefix(folder).rpartition("/")
        return cls(prefix, job_id)

    @property
    def folder(self) -> str:
        """The job's folder, ``{prefix}/{job_id}`` (no trailing '/')."""
        return f"{self.prefix}/{self.job_id}" if self.prefix else self.job_id

    @property
    def manifest(self) -> str:
        """The name of the job's manifest object."""
        return f"{self.folder}/{_MANIFEST_NAME}"

    @property
    def lease(self) -> str:
        """The name of the job's lease: rewritten by the executor while it waits on the job."""
        return f"{self.folder}/{_LEASE_NAME}"

    @property
    def tasks_folder(self) -> str:
        """The folder that holds every task's folder (with a trailing '/')."""
        return f"{self.folder}/tasks/"

    def task_folder(self, index: int) -> str:
        """The folder of task ``index`` (with a trailing '/')."""
        TaskRef(self.job_id, index)
        return f"{self.tasks_folder}{index}/"

    def object_name(self, index: int, obj: TaskObject) -> str:
        """The full object name of ``obj`` for task ``index``."""
        return self.task_folder(index) + TaskObject(obj).value

    def output_name(self, index: int, obj: TaskObject, attempt: int) -> str:
        """The name of attempt ``attempt``'s ``obj`` (STDOUT or STDERR) for task ``index``."""
        if obj not in _OUTPUTS or isinstance(attempt, bool) or attempt < 0:
            raise ValueError(f"no output object {obj!r} of attempt {attempt!r}")
        return f"{self.object_name(index, obj)}.{attempt}"


def _task_object(file_name: str) -> TaskObject:
    """The object a file name in a task folder is (``stdout.2`` is STDOUT); ValueError if none."""
    name, _, attempt = file_name.rpartition(".")
    if attempt.isdigit() and name in _OUTPUTS:
        return TaskObject(name)
    return TaskObject(file_name)


@dataclass(frozen=True)
class ManifestEntry:
    """What the manifest records about the electron behind one task."""

    dispatch_id: str  # the Covalent dispatch the electron belongs to
    node_id: int  # the electron's node id in that dispatch
    submitted_at: datetime  # when the executor accepted the electron (timezone-aware)
    name: str = ""  # the electron's function name ("" if unknown, or an older manifest)


def _account_of(client: storage.Client) -> str:
    email = getattr(storage_credentials(client), "service_account_email", None)
    if isinstance(email, str) and "@" in email:
        return f"service account {email}"
    return "the account of the credentials in use"


@contextlib.contextmanager
def _storage_errors(client: storage.Client, bucket: str, action: str) -> Iterator[None]:
    """Translate what google-cloud-storage raises after its retries into StorageError."""
    where = f"gs://{bucket}"
    try:
        yield
    except StorageError:
        raise
    except api_exceptions.NotFound as exc:
        raise StorageError(
            f"Cloud Storage could not {action}: bucket {where} does not exist or is not visible "
            f"to {_account_of(client)}; create it (`gcloud storage buckets create {where}`) or "
            f"set bucket_name to an existing bucket"
        ) from exc
    except (api_exceptions.Forbidden, api_exceptions.Unauthorized) as exc:
        raise StorageError(
            f"Cloud Storage refused to {action} ({exc.code} {exc.reason or exc.message}): "
            f"{_account_of(client)} needs storage.objects.create/get/list/delete on {where}, "
            f"e.g. the role roles/storage.objectAdmin on the bucket"
        ) from exc
    except api_exceptions.RetryError as exc:
        raise StorageError(
            f"Cloud Storage could not {action} in {where}: gave up after retrying transient "
            f"errors ({exc.cause!r}); check the network and https://status.cloud.google.com"
        ) from exc
    except api_exceptions.GoogleAPICallError as exc:
        raise StorageError(
            f"Cloud Storage could not {action} in {where}: {exc.code} {exc.message}"
        ) from exc
    except (
        google.auth.exceptions.GoogleAuthError,
        requests.RequestException,
        urllib3.exceptions.HTTPError,
        ConnectionError,
    ) as exc:
        raise StorageError(
            f"could not reach Cloud Storage at {client.api_endpoint} to {action} in {where}: {exc}"
        ) from exc


class TaskStore:
    """Reads and writes the objects of jobs under ``gs://{bucket_name}/{prefix}/``.

    :param client: a client from :func:`.clients.make_storage_client` (or ``storage.Client()``)
    :param bucket_name: the bucket every job folder lives in
    :param prefix: the folder of all job folders in the bucket ("" for the top)
    :param retry: the retry policy of every request (429, 5xx and dropped connections are
        retried with exponential backoff for up to 120 s by default)
    :raises ValueError: the prefix is not a safe folder path
    """

    def __init__(
        self,
        client: storage.Client,
        bucket_name: str,
        prefix: str = "",
        *,
        retry: Retry = DEFAULT_RETRY,
    ) -> None:
        self._client = client
        self._bucket = client.bucket(bucket_name)
        self._prefix = validate_prefix(prefix)
        self._retry = retry
        self._batch_deletes = True  # False once the endpoint turned out to have no batch API
        # The executor's two requests per electron (input, outcome), cheaper than the client's.
        self._objects = ObjectHttp(client, bucket_name)

    @property
    def bucket_name(self) -> str:
        """The name of the bucket."""
        return str(self._bucket.name)

    def layout(self, job_id: str) -> JobLayout:
        """The object names of job ``job_id``."""
        return JobLayout(self._prefix, job_id)

    def _errors(self, action: str) -> contextlib.AbstractContextManager[None]:
        return _storage_errors(self._client, self.bucket_name, action)

    def _blob(self, ref: TaskRef, obj: TaskObject) -> storage.Blob:
        return self._bucket.blob(self.layout(ref.job_id).object_name(ref.index, obj))

    def check_bucket(self) -> None:
        """Check that the bucket exists and these credentials may list it.

        :raises StorageError: it does not, with how to fix it
        """
        with self._errors("list the bucket"):
            # Listing needs only storage.objects.list, which the runner's role has anyway.
            next(
                iter(self._client.list_blobs(self._bucket, max_results=1, retry=self._retry)),
                None,
            )

    def upload(self, ref: TaskRef, obj: TaskObject, data: bytes, *, retried: bool = True) -> None:
        """Write ``obj`` of task ``ref``, replacing what is there (input, stdout, stderr).

        :param retried: retry it with the store's policy (False: one attempt, for a caller that
            retries it itself)
        """
        name = self.layout(ref.job_id).object_name(ref.index, obj)
        put = self._retry(self._objects.put) if retried else self._objects.put
        with self._errors(f"write {obj.value} of task {ref.index} of job {ref.job_id}"):
            put(name, data, "application/octet-stream")

    def upload_input(self, ref: TaskRef, data: bytes, *, retried: bool = True) -> None:
        """Write the input envelope of task ``ref`` (``retried``: as :meth:`upload`)."""
        self.upload(ref, TaskObject.INPUT, data, retried=retried)

    def write_if_absent(self, ref: TaskRef, obj: TaskObject, data: bytes) -> bool:
        """Write ``obj`` of task ``ref`` only if it does not exist yet.

        The write carries ``if_generation_match=0``, so of two attempts racing to record a
        task's outcome only one wins. Retrying it is safe: if our first try landed but its
        answer was lost, the retry meets a 412 and we report "already there", which is true.

        :returns: ``True`` if this call wrote it, ``False`` if the object already existed
        """
        what = f"write {obj.value} of task {ref.index} of job {ref.job_id}"
        return self._create(self._blob(ref, obj), data, what)

    def write_output(self, ref: TaskRef, obj: TaskObject, attempt: int, data: bytes) -> bool:
        """Write attempt ``attempt``'s STDOUT or STDERR of task ``ref``, never replacing one.

        :returns: ``True`` if this call wrote it, ``False`` if it already existed
        """
        name = self.layout(ref.job_id).output_name(ref.index, obj, attempt)
        what = f"write {obj.value} of attempt {attempt} of task {ref.index} of job {ref.job_id}"
        return self._create(self._bucket.blob(name), data, what)

    def read_output(self, ref: TaskRef, obj: TaskObject) -> bytes | None:
        """The last attempt's STDOUT or STDERR of task ``ref``, or ``None`` if none wrote it."""
        stem = self.layout(ref.job_id).object_name(ref.index, obj) + "."
        with self._errors(f"list the {obj.value} objects of task {ref.index} of {ref.job_id}"):
            names = [
                blob.name
                for blob in self._client.list_blobs(self._bucket, prefix=stem, retry=self._retry)
                if blob.name[len(stem) :].isdigit()
            ]
        if not names:
            return None
        last = max(names, key=lambda name: int(name[len(stem) :]))
        with self._errors(f"read {last}"):
            try:
                data: bytes = self._bucket.blob(last).download_as_bytes(retry=self._retry)
            except api_exceptions.NotFound:
                return None  # deleted meanwhile (the job's clean-up)
        return data

    def _create(self, blob: storage.Blob, data: bytes, what: str) -> bool:
        """Create ``blob`` with ``data`` unless it exists (``if_generation_match=0``)."""
        with self._errors(what):
            try:
                blob.upload_from_string(
                    data,
                    content_type="application/octet-stream",
                    if_generation_match=0,
                    retry=self._retry,
                )
            except api_exceptions.PreconditionFailed:
                return False
        return True

    def write_cancelled(self, ref: TaskRef) -> None:
        """Mark task ``ref`` cancelled (an empty marker; writing it twice is harmless)."""
        self.write_if_absent(ref, TaskObject.CANCELLED, b"")

    def delete(self, ref: TaskRef, obj: TaskObject) -> None:
        """Delete ``obj`` of task ``ref``; one already gone is not an error."""
        with self._errors(f"delete {obj.value} of task {ref.index} of job {ref.job_id}"):
            self._delete_each([self._blob(ref, obj).name])

    def delete_lease(self, job_id: str) -> None:
        """Delete job ``job_id``'s lease (no electron waits on the job any more)."""
        with self._errors(f"delete the lease of job {job_id}"):
            self._delete_each([self.layout(job_id).lease])

    def renew_lease(self, job_id: str) -> None:
        """Rewrite job ``job_id``'s lease (an empty object): its update time says "still owned"."""
        with self._errors(f"renew the lease of job {job_id}"):
            self._bucket.blob(self.layout(job_id).lease).upload_from_string(
                b"", content_type="application/octet-stream", retry=self._retry
            )

    def lease_age(self, job_id: str, now: datetime) -> float | None:
        """Seconds since job ``job_id``'s lease was last renewed, or ``None`` without a lease."""
        with self._errors(f"read the lease of job {job_id}"):
            blob = self._bucket.get_blob(self.layout(job_id).lease, retry=self._retry)
        if blob is None or blob.updated is None:
            return None
        return (now - blob.updated).total_seconds()

    def download(self, ref: TaskRef, obj: TaskObject) -> bytes | None:
        """Read ``obj`` of task ``ref``, or ``None`` if it does not exist."""
        name = self.layout(ref.job_id).object_name(ref.index, obj)
        with self._errors(f"read {obj.value} of task {ref.index} of job {ref.job_id}"):
            try:
                data: bytes = self._retry(self._objects.get)(name)
                return data
            except BucketNotFound:
                raise  # a missing bucket must not look like "no result"
            except api_exceptions.NotFound:
                return None

    def exists(self, ref: TaskRef, obj: TaskObject) -> bool:
        """Whether ``obj`` of task ``ref`` exists (one metadata read, cheaper than a list)."""
        with self._errors(f"check {obj.value} of task {ref.index} of job {ref.job_id}"):
            return bool(self._blob(ref, obj).exists(retry=self._retry))

    def task_objects(self, ref: TaskRef) -> frozenset[TaskObject]:
        """Which objects task ``ref`` has, in one list request."""
        layout = self.layout(ref.job_id)
        found = self._list_task_objects(layout, layout.task_folder(ref.index))
        return frozenset(found.get(ref.index, ()))

    def job_task_objects(self, job_id: str) -> dict[int, frozenset[TaskObject]]:
        """Which objects every task of job ``job_id`` has, in one paged list request.

        Tasks with no object at all are absent from the answer.
        """
        layout = self.layout(job_id)
        found = self._list_task_objects(layout, layout.tasks_folder)
        return {index: frozenset(objects) for index, objects in found.items()}

    def _list_task_objects(self, layout: JobLayout, folder: str) -> dict[int, set[TaskObject]]:
        tasks_folder = layout.tasks_folder
        found: dict[int, set[TaskObject]] = {}
        with self._errors(f"list {folder}"):
            for blob in self._client.list_blobs(self._bucket, prefix=folder, retry=self._retry):
                index_text, _, file_name = blob.name[len(tasks_folder) :].partition("/")
                with contextlib.suppress(ValueError):
                    found.setdefault(int(index_text), set()).add(_task_object(file_name))
        return found

    def write_manifest(self, job_id: str, entries: Mapping[int, ManifestEntry]) -> None:
        """Write the manifest of job ``job_id``: which electron each task index runs."""
        for index in entries:
            TaskRef(job_id, index)
        document = {
            "format": _MANIFEST_FORMAT,
            "job_id": job_id,
            "tasks": {
                str(index): {
                    "dispatch_id": entry.dispatch_id,
                    "node_id": entry.node_id,
                    "submitted_at": entry.submitted_at.isoformat(),
                    "name": entry.name,
                }
                for index, entry in sorted(entries.items())
            },
        }
        blob = self._bucket.blob(self.layout(job_id).manifest)
        with self._errors(f"write the manifest of job {job_id}"):
            blob.upload_from_string(
                json.dumps(document, indent=1), content_type="application/json", retry=self._retry
            )

    def read_manifest(self, job_id: str) -> dict[int, ManifestEntry] | None:
        """Read the manifest of job ``job_id``, or ``None`` if there is none.

        :raises StorageError: the manifest exists but is not one this package wrote
        """
        name = self.layout(job_id).manifest
        with self._errors(f"read the manifest of job {job_id}"):
            try:
                text = self._bucket.blob(name).download_as_bytes(retry=self._retry)
            except api_exceptions.NotFound as exc:
                if "bucket" in str(exc.message).lower():
                    raise
                return None
        try:
            document = json.loads(text)
            if document["format"] != _MANIFEST_FORMAT or document["job_id"] != job_id:
                raise ValueError("unknown format or another job's manifest")
            return {
                int(index): ManifestEntry(
                    dispatch_id=str(entry["dispatch_id"]),
                    node_id=int(entry["node_id"]),
                    submitted_at=datetime.fromisoformat(entry["submitted_at"]),
                    name=str(entry.get("name", "")),
                )
                for index, entry in document["tasks"].items()
            }
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StorageError(
                f"gs://{self.bucket_name}/{name} is not a manifest this package wrote ({exc}); "
                f"delete the job folder gs://{self.bucket_name}/{self.layout(job_id).folder}/"
            ) from exc

    def delete_tasks(self, job_id: str) -> int:
        """Delete the objects of every task of job ``job_id``, not its manifest; returns the count.

        The manifest (a few bytes per task) stays, so that `gcpbatch-array tasks` can still name
        the electron behind each task; the bucket's lifecycle rule or `gcpbatch-array gc` removes
        it later.
        """
        return self._delete_folder(self.layout(job_id).tasks_folder)

    def delete_job(self, job_id: str) -> int:
        """Delete job ``job_id``'s folder (manifest and every task); returns the count."""
        return self._delete_folder(self.layout(job_id).folder + "/")

    def _delete_folder(self, folder: str) -> int:
        with self._errors(f"delete {folder}"):
            # Listed once, outside any batch: inside one every call is deferred.
            names = [
                blob.name
                for blob in self._client.list_blobs(self._bucket, prefix=folder, retry=self._retry)
            ]
            return sum(
                self._delete_batch(names[start : start + _BATCH_CALLS])
                for start in range(0, len(names), _BATCH_CALLS)
            )

    def _delete_batch(self, names: list[str]) -> int:
        """Delete up to 100 objects in one batch request; returns how many this call deleted.

        Neither the batch request (:meth:`ObjectHttp.delete_many`) nor its calls are retried as
        such: calls that failed as the store's retry policy retries (429, 5xx, ...), or all of
        them when the batch request itself failed that way, are deleted again one by one with
        that policy (a delete is idempotent: a second try that meets 404 is a success). A 404
        means someone else (another cleanup) deleted it first; any other failure raises,
        translated by :func:`_storage_errors`. An endpoint without the batch API (an emulator
        without one) gets one delete per object from then on.
        """
        if not self._batch_deletes:
            return self._delete_each(names)
        try:
            errors = self._objects.delete_many(names)
        except BatchUnsupported:
            self._batch_deletes = False
            return self._delete_each(names)
        except Exception as exc:
            if not self._retried(exc):
                raise
            return self._delete_each(names)
        again = []
        for name, error in zip(names, errors, strict=True):
            if error is None or isinstance(error, api_exceptions.NotFound):
                continue
            if not self._retried(error):
                raise error
            again.append(name)
        return errors.count(None) + self._delete_each(again)

    def _retried(self, exc: Exception) -> bool:
        """Whether the store's retry policy sends a request that failed with ``exc`` again.

        The policy's own predicate (``DEFAULT_RETRY``'s: 408, 429, 5xx, dropped connections),
        so that a batch's calls are judged as the client judges a request of their own.
        """
        return bool(retry_predicate(self._retry)(exc))

    def _delete_each(self, names: list[str]) -> int:
        deleted = 0
        for name in names:
            with contextlib.suppress(api_exceptions.NotFound):
                self._bucket.blob(name).delete(retry=self._retry)
                deleted += 1
        return deleted


#: Worker threads (and so HTTP connections) of an :class:`AsyncTaskStore` for inputs, and for
#: everything else (results, markers, the manifest, clean-up): the results of a running job
#: never queue behind the inputs of the next batches.
INPUT_THREADS = 16
OTHER_THREADS = 16
#: Electrons encoding or uploading their input at once: twice the threads, so that the next
#: inputs are ready when a thread frees.
INPUT_SLOTS = 2 * INPUT_THREADS
#: The backoff between the attempts of an input upload (seconds), google-cloud-storage's own.
_FIRST_DELAY = 1.0
_MAX_DELAY = 60.0


class AsyncTaskStore:
    """Async access to a :class:`TaskStore`: each call runs in a worker thread.

    :param store: the synchronous store
    :param limiter: bounds the threads of every call but input uploads (default: a limiter of
        :data:`OTHER_THREADS` of its own)
    :param input_limiter: bounds the threads of input uploads, kept apart so that reading a
        running job's results never waits behind the inputs of the next batches (default: a
        limiter of :data:`INPUT_THREADS` of its own)
    :param input_slots: bounds the electrons that hold an encoded input on its way to the
        bucket (:attr:`input_slots`; default: a limiter of :data:`INPUT_SLOTS` of its own)
    """

    def __init__(
        self,
        store: TaskStore,
        limiter: anyio.CapacityLimiter | None = None,
        input_limiter: anyio.CapacityLimiter | None = None,
        input_slots: anyio.CapacityLimiter | None = None,
    ) -> None:
        self.sync = store
        self._limiter = limiter or anyio.CapacityLimiter(OTHER_THREADS)
        self._input_limiter = input_limiter or anyio.CapacityLimiter(INPUT_THREADS)
        #: Held by an electron from encoding its input until the upload ends, so that a burst
        #: keeps the upload threads busy without every electron's input in memory at once.
        self.input_slots = input_slots or anyio.CapacityLimiter(INPUT_SLOTS)

    def layout(self, job_id: str) -> JobLayout:
        """The object names of job ``job_id``."""
        return self.sync.layout(job_id)

    async def upload_input(self, ref: TaskRef, data: bytes) -> None:
        """Write the input envelope of task ``ref``, on the threads kept for inputs.

        Retried as the store retries any request (its policy's predicate and timeout), but only
        each attempt runs in a worker thread; the waits between attempts run here. Cancelled
        (its electron gave up on it: see ``BatchPolicy.settle_timeout``; or the process is
        stopping), it stops at once, or once the attempt in flight has ended: no upload goes on
        after its caller, who then knows whether the input may be in the bucket.

        :raises StorageError: it failed, or still failed transiently when the timeout was up
        """
        timeout = self.sync._retry.timeout or math.inf
        deadline = anyio.current_time() + timeout
        for delay in exponential_sleep_generator(_FIRST_DELAY, _MAX_DELAY):
            try:
                await anyio.to_thread.run_sync(
                    functools.partial(self.sync.upload_input, ref, data, retried=False),
                    limiter=self._input_limiter,
                )
                return
            except StorageError as exc:
                cause = exc.__cause__
                if not (isinstance(cause, Exception) and self.sync._retried(cause)):
                    raise
                if anyio.current_time() + delay > deadline:
                    raise StorageError(
                        f"{exc} (gave up after retrying for {timeout:g} s; check the network "
                        "and https://status.cloud.google.com)"
                    ) from cause
            await anyio.sleep(delay)  # backing off between attempts, not synchronisation

    async def download(self, ref: TaskRef, obj: TaskObject) -> bytes | None:
        """Read ``obj`` of task ``ref``, or ``None`` if it does not exist."""
        return await anyio.to_thread.run_sync(self.sync.download, ref, obj, limiter=self._limiter)

    async def exists(self, ref: TaskRef, obj: TaskObject) -> bool:
        """Whether ``obj`` of task ``ref`` exists."""
        return await anyio.to_thread.run_sync(self.sync.exists, ref, obj, limiter=self._limiter)

    async def write_cancelled(self, ref: TaskRef) -> None:
        """Mark task ``ref`` cancelled."""
        await anyio.to_thread.run_sync(self.sync.write_cancelled, ref, limiter=self._limiter)

    async def delete(self, ref: TaskRef, obj: TaskObject) -> None:
        """Delete ``obj`` of task ``ref``."""
        await anyio.to_thread.run_sync(self.sync.delete, ref, obj, limiter=self._limiter)

    async def write_manifest(self, job_id: str, entries: Mapping[int, ManifestEntry]) -> None:
        """Write the manifest of job ``job_id``."""
        await anyio.to_thread.run_sync(
            self.sync.write_manifest, job_id, entries, limiter=self._limiter
        )

    async def renew_lease(self, job_id: str) -> None:
        """Rewrite job ``job_id``'s lease."""
        await anyio.to_thread.run_sync(self.sync.renew_lease, job_id, limiter=self._limiter)

    async def delete_lease(self, job_id: str) -> None:
        """Delete job ``job_id``'s lease."""
        await anyio.to_thread.run_sync(self.sync.delete_lease, job_id, limiter=self._limiter)

    async def delete_tasks(self, job_id: str) -> int:
        """Delete the objects of every task of job ``job_id``; returns the count."""
        return await anyio.to_thread.run_sync(self.sync.delete_tasks, job_id, limiter=self._limiter)
