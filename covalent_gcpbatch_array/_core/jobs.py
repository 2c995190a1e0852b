"""Google Batch: building the array job, and a small async facade over ``BatchServiceClient``.

The facade calls the real synchronous REST client through ``anyio.to_thread`` (the async REST
client of google-cloud-batch 0.22 blocks), retries with ``google.api_core.retry``, and maps API
errors to :class:`~covalent_gcpbatch_array.exceptions.BatchApiError` in one place.
"""

from __future__ import annotations

import contextlib
import decimal
import functools
import secrets
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import anyio
import google.auth.exceptions
import requests
from google.api_core import exceptions as api_exceptions
from google.api_core import retry as api_retry
from google.cloud import batch_v1
from google.protobuf import duration_pb2

from covalent_gcpbatch_array import __version__
from covalent_gcpbatch_array._core.contract import (
    ENV_BUCKET,
    ENV_CANCEL_POLL,
    ENV_HMAC_KEY,
    ENV_JOB_PREFIX,
    ENV_ORPHAN_TIMEOUT,
    NEVER_RETRIED_EXIT_CODES,
    RUNNER_MODULE,
)
from covalent_gcpbatch_array._core.task_states import (
    FIELD_MASK_HEADER,
    TaskStateReader,
    TaskStates,
)
from covalent_gcpbatch_array.config import JobShape
from covalent_gcpbatch_array.exceptions import BatchApiError

__all__ = ["TASK_STATE_FIELDS", "JobsApi", "build_job", "new_job_id"]

#: Label every job carries, so `gcpbatch-array jobs` and `gc` find ours and only ours.
CREATED_BY_LABEL = ("created-by", "covalent-gcpbatch-array")
#: The label that says why the coalescer stopped filling the job ("idle-gap", "full", ...).
FLUSH_REASON_LABEL = "cga-flush-reason"
#: Largest ListTasks page; a job of up to this many tasks costs one call per poll.
TASK_PAGE_SIZE = 1000
#: The ListTasks fields a poller needs: each task's name (its index) and state, and the paging
#: token. Without status events and their timestamps the answer is a fraction of the size and
#: parses several times faster (:meth:`JobsApi.task_states` asks for these).
TASK_STATE_FIELDS = ("tasks.name", "tasks.status.state", "nextPageToken", "unreachable")
#: Worker threads for creates when the caller gives no ``create_limiter``: a create may retry a
#: quota for minutes, and must not hold the threads that reads need.
CREATE_THREADS = 2

_T = TypeVar("_T")

#: A reset connection or an answer cut short (the REST transport is ``requests``): the request
#: may or may not have reached Batch, so only requests safe to repeat are retried on it, and
#: every request here is (reads, deletes, and creates that carry a ``request_id``).
_CONNECTION_ERRORS = (
    requests.exceptions.ConnectionError,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.Timeout,
    google.auth.exceptions.TransportError,
)
_TRANSIENT = api_retry.if_exception_type(
    api_exceptions.TooManyRequests,
    api_exceptions.InternalServerError,
    api_exceptions.BadGateway,
    api_exceptions.ServiceUnavailable,
    api_exceptions.GatewayTimeout,
    *_CONNECTION_ERRORS,
)
#: Creating a job is retried for a long time: a job-creation quota can stay exceeded for
#: minutes, and ``request_id`` makes every retry safe.
CREATE_RETRY = api_retry.Retry(
    predicate=_TRANSIENT, initial=0.5, maximum=30.0, multiplier=2.0, timeout=1800.0
)
#: Reads and deletes: the monitor polls again anyway, so give up sooner.
READ_RETRY = api_retry.Retry(
    predicate=_TRANSIENT, initial=0.5, maximum=10.0, multiplier=2.0, timeout=60.0
)


def new_job_id(now: float | None = None) -> str:
    """Make a fresh Batch job id: ``cga-<utc time>-<random>``, valid and unique."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if now is None else now))
    return f"cga-{stamp}-{secrets.token_hex(5)}"


#: How often a running task looks for its cancel marker: every 2 s, slower in big jobs so that the
#: tasks of one job check at most ~50 times a second in all (a metadata read each), up to 60 s.
CANCEL_CHECKS_PER_SECOND = 50
CANCEL_POLL_RANGE = (2.0, 60.0)


def cancel_poll_seconds(task_count: int, parallelism: int = 0) -> float:
    """Seconds between a task's cancel checks, for a job with ``task_count`` tasks.

    :param parallelism: the most tasks running at once (0: all of them)
    """
    running = min(task_count, parallelism) if parallelism else task_count
    shortest, longest = CANCEL_POLL_RANGE
    return min(longest, max(shortest, running / CANCEL_CHECKS_PER_SECOND))


def exact_duration(seconds: float) -> duration_pb2.Duration:
    """``seconds`` as a protobuf Duration, to the nanosecond, never rounded down to zero.

    Built from the number's shortest decimal form, so 0.1 stays 100 ms and 14 days stays
    1,209,600 s (a ``:g`` string gave "1.2096e+06s", which the Duration parser refuses).
    """
    nanos = decimal.Decimal(repr(float(seconds))).scaleb(9)
    whole, part = divmod(int(nanos.to_integral_value(decimal.ROUND_CEILING)), 10**9)
    return duration_pb2.Duration(seconds=whole, nanos=part)


def build_job(shape: JobShape, *, task_count: int, job_prefix: str, hmac_key: str) -> batch_v1.Job:
    """The array job for one batch: ``task_count`` tasks sharing one task spec.

    :param shape: the batch's job shape
    :param task_count: number of tasks (one per electron slot)
    :param job_prefix: the job's folder in the bucket, ``{bucket_prefix}/{job_id}``
    :param hmac_key: hex key that signs this job's inputs and results
    """
    runnable = batch_v1.Runnable(
        container=batch_v1.Runnable.Container(
            image_uri=shape.container_image_uri,
            entrypoint="python",
            commands=["-m", RUNNER_MODULE],
        )
    )
    task_spec = batch_v1.TaskSpec(
        runnables=[runnable],
        compute_resource=batch_v1.ComputeResource(
            cpu_milli=round(shape.vcpus * 1000), memory_mib=shape.memory
        ),
        max_retry_count=shape.retries,
        max_run_duration=exact_duration(shape.time_limit),
        lifecycle_policies=[
            batch_v1.LifecyclePolicy(
                action=batch_v1.LifecyclePolicy.Action.FAIL_TASK,
                action_condition=batch_v1.LifecyclePolicy.ActionCondition(
                    exit_codes=list(NEVER_RETRIED_EXIT_CODES)
                ),
            )
        ],
        environment=batch_v1.Environment(
            variables={
                ENV_BUCKET: shape.bucket_name,
                ENV_JOB_PREFIX: job_prefix,
                ENV_HMAC_KEY: hmac_key,
                ENV_CANCEL_POLL: f"{cancel_poll_seconds(task_count, shape.parallelism):g}",
                ENV_ORPHAN_TIMEOUT: repr(float(shape.orphan_timeout)),
            }
        ),
    )
    task_group = batch_v1.TaskGroup(
        task_spec=task_spec,
        task_count=task_count,
        parallelism=shape.parallelism or None,
        task_count_per_node=shape.task_count_per_node or None,
    )
    return batch_v1.Job(
        task_groups=[task_group],
        allocation_policy=_allocation_policy(shape),
        labels={
            **dict(shape.labels),
            CREATED_BY_LABEL[0]: CREATED_BY_LABEL[1],
            "cga-version": __version__.replace(".", "-"),
        },
        logs_policy=batch_v1.LogsPolicy(destination=batch_v1.LogsPolicy.Destination.CLOUD_LOGGING),
    )


def _allocation_policy(shape: JobShape) -> batch_v1.AllocationPolicy:
    instance = batch_v1.AllocationPolicy.InstancePolicy(
        machine_type=shape.machine_type,
        provisioning_model=getattr(
            batch_v1.AllocationPolicy.ProvisioningModel, shape.provisioning_model
        ),
    )
    if shape.accelerator_type:
        instance.accelerators = [
            batch_v1.AllocationPolicy.Accelerator(
                type_=shape.accelerator_type, count=shape.accelerator_count
            )
        ]
    if shape.boot_disk_size_gb:
        instance.boot_disk = batch_v1.AllocationPolicy.Disk(size_gb=shape.boot_disk_size_gb)
    policy = batch_v1.AllocationPolicy(
        location=batch_v1.AllocationPolicy.LocationPolicy(
            allowed_locations=[f"regions/{shape.region}"]
        ),
        instances=[
            batch_v1.AllocationPolicy.InstancePolicyOrTemplate(
                policy=instance, install_gpu_drivers=bool(shape.accelerator_type)
            )
        ],
    )
    if shape.service_account_email:
        policy.service_account = batch_v1.ServiceAccount(email=shape.service_account_email)
    if shape.network or shape.subnetwork:
        policy.network = batch_v1.AllocationPolicy.NetworkPolicy(
            network_interfaces=[
                batch_v1.AllocationPolicy.NetworkInterface(
                    network=shape.network, subnetwork=shape.subnetwork
                )
            ]
        )
    return policy


@contextlib.contextmanager
def _mapped_errors(action: str) -> Iterator[None]:
    """Turn Google API errors into BatchApiError with a message that says what to do."""
    try:
        yield
    except api_exceptions.GoogleAPICallError as exc:
        raise BatchApiError(f"Google Batch: {action} failed: {exc}{_advice(exc, action)}") from exc
    except api_exceptions.RetryError as exc:
        raise BatchApiError(
            f"Google Batch: {action} still failing after retries: {exc.cause}. The API or the "
            "quota is unavailable; the work was not lost, dispatch again when it recovers"
        ) from exc
    except (requests.RequestException, google.auth.exceptions.TransportError) as exc:
        raise BatchApiError(
            f"Google Batch: {action} failed: could not reach the API ({type(exc).__name__}: "
            f"{exc}); check the network and batch_api_endpoint"
        ) from exc


def _advice(exc: api_exceptions.GoogleAPICallError, action: str) -> str:
    if isinstance(
        exc,
        api_exceptions.PermissionDenied
        | api_exceptions.Forbidden
        | api_exceptions.Unauthenticated
        | api_exceptions.Unauthorized,
    ):
        return (
            ". The credentials running the Covalent server need roles/batch.jobsEditor on the "
            "project and roles/iam.serviceAccountUser on the job's service_account_email"
        )
    if isinstance(exc, api_exceptions.InvalidArgument | api_exceptions.BadRequest):
        if not action.startswith("creating"):
            return ""  # a read's request is ours to get right, not the user's
        return ". Batch rejected the job definition; check the executor's job-shape keys"
    if isinstance(exc, api_exceptions.NotFound):
        return ". Check project_id and region, and that the Batch API is enabled"
    return ""


class JobsApi:
    """Async access to the jobs of one project and region.

    :param client: a synchronous REST ``BatchServiceClient``
    :param project_id: the Google Cloud project
    :param region: the Batch location
    :param limiter: bounds the worker threads (and so the HTTP connections) used for reads
        and deletes
    :param create_limiter: bounds the worker threads of creates, kept apart from ``limiter``
        because a create retries an exceeded job-creation quota for up to 30 minutes: reads
        must not queue behind it (default: a limiter of :data:`CREATE_THREADS` of its own)
    """

    def __init__(
        self,
        client: batch_v1.BatchServiceClient,
        project_id: str,
        region: str,
        limiter: anyio.CapacityLimiter | None = None,
        create_limiter: anyio.CapacityLimiter | None = None,
    ) -> None:
        self._client = client
        self._task_states = TaskStateReader.of(client)
        self.parent = f"projects/{project_id}/locations/{region}"
        self._limiter = limiter or anyio.CapacityLimiter(8)
        self._create_limiter = create_limiter or anyio.CapacityLimiter(CREATE_THREADS)

    def job_name(self, job_id: str) -> str:
        """The full resource name of a job."""
        return f"{self.parent}/jobs/{job_id}"

    async def _call(
        self,
        method: Callable[..., _T],
        /,
        *,
        limiter: anyio.CapacityLimiter | None = None,
        **kwargs: Any,
    ) -> _T:
        return await anyio.to_thread.run_sync(
            functools.partial(method, **kwargs), limiter=limiter or self._limiter
        )

    async def create(self, job_id: str, job: batch_v1.Job) -> batch_v1.Job:
        """Create a job, retried on 429 and 5xx; a retry never makes a second job.

        The request carries one ``request_id`` across its retries, so Batch answers a repeat
        with the job it already made; if a server answers ALREADY_EXISTS instead, the job
        is fetched and accepted when its folder is ours.

        :raises BatchApiError: when Batch refuses the job or keeps failing
        """
        request = batch_v1.CreateJobRequest(
            parent=self.parent, job_id=job_id, job=job, request_id=str(uuid.uuid4())
        )
        with _mapped_errors(f"creating job {job_id}"):
            try:
                return await self._call(
                    self._client.create_job,
                    limiter=self._create_limiter,
                    request=request,
                    retry=CREATE_RETRY,
                )
            except api_exceptions.Conflict:  # ALREADY_EXISTS arrives over REST as 409
                existing = await self.get(job_id)
                if _job_prefix(existing) != _job_prefix(job):
                    raise
                return existing

    async def get(self, job_id: str) -> batch_v1.Job:
        """Fetch a job.

        :raises BatchApiError: ``NotFound`` is chained when the job does not exist
        """
        with _mapped_errors(f"reading job {job_id}"):
            return await self._call(
                self._client.get_job, name=self.job_name(job_id), retry=READ_RETRY
            )

    async def get_task(self, job_id: str, index: int) -> batch_v1.Task:
        """Fetch one task whole, status events included (its exit codes and attempts).

        :raises BatchApiError: ``NotFound`` is chained when the job or the task does not exist
        """
        name = f"{self._task_group(job_id)}/tasks/{index}"
        with _mapped_errors(f"reading task {index} of job {job_id}"):
            return await self._call(self._client.get_task, name=name, retry=READ_RETRY)

    async def list_tasks(
        self, job_id: str, states: tuple[str, ...] = (), *, fields: Sequence[str] = ()
    ) -> list[batch_v1.Task]:
        """All tasks of a job, optionally only those in ``states`` (e.g. ``("SUCCEEDED",)``).

        :param fields: the response field mask's paths: Batch sends only these fields (e.g.
            :data:`TASK_STATE_FIELDS`, tasks with a name and a state but no status events);
            empty for whole tasks. ``nextPageToken`` is added if missing: paging needs it.
        """
        request = batch_v1.ListTasksRequest(
            parent=self._task_group(job_id), filter=_state_filter(states), page_size=TASK_PAGE_SIZE
        )
        if fields and "nextPageToken" not in fields:
            fields = (*fields, "nextPageToken")
        metadata = [(FIELD_MASK_HEADER, ",".join(fields))] if fields else []

        def list_all() -> list[batch_v1.Task]:
            pages = self._client.list_tasks(request=request, retry=READ_RETRY, metadata=metadata)
            return list(pages)

        with _mapped_errors(f"listing tasks of job {job_id}"):
            return await anyio.to_thread.run_sync(list_all, limiter=self._limiter)

    async def task_states(self, job_id: str, states: tuple[str, ...] = ()) -> TaskStates:
        """Each task's state by task index, optionally only tasks in ``states``: a poll's listing.

        The tasks of :meth:`list_tasks` with :data:`TASK_STATE_FIELDS`, read as plain JSON
        (:mod:`~covalent_gcpbatch_array._core.task_states`): the client's protobuf conversion
        of each task costs more CPU than the rest of a poll. Retried and mapped as every call.
        """

        def read() -> TaskStates:
            return self._task_states.read(
                self._task_group(job_id),
                filter_text=_state_filter(states),
                page_size=TASK_PAGE_SIZE,
                fields=TASK_STATE_FIELDS,
                retry=READ_RETRY,
            )

        with _mapped_errors(f"listing tasks of job {job_id}"):
            return await anyio.to_thread.run_sync(read, limiter=self._limiter)

    def _task_group(self, job_id: str) -> str:
        return f"{self.job_name(job_id)}/taskGroups/group0"

    async def list_jobs(self) -> list[batch_v1.Job]:
        """Every job this executor created in the project and region."""
        request = batch_v1.ListJobsRequest(parent=self.parent, page_size=100)

        def list_all() -> list[batch_v1.Job]:
            jobs = self._client.list_jobs(request=request, retry=READ_RETRY)
            return [
                job for job in jobs if job.labels.get(CREATED_BY_LABEL[0]) == CREATED_BY_LABEL[1]
            ]

        with _mapped_errors("listing jobs"):
            return await anyio.to_thread.run_sync(list_all, limiter=self._limiter)

    async def delete(self, job_id: str) -> None:
        """Delete a job, killing its running tasks; a job already gone is not an error."""
        with _mapped_errors(f"deleting job {job_id}"):
            try:
                operation = await self._call(
                    self._client.delete_job, name=self.job_name(job_id), retry=READ_RETRY
                )
            except api_exceptions.NotFound:
                return
            await anyio.to_thread.run_sync(operation.result, limiter=self._limiter)


def _state_filter(states: tuple[str, ...]) -> str:
    """The ListTasks filter that selects tasks in any of ``states`` (all tasks if empty)."""
    return " OR ".join(f"State={state}" for state in states)


def _job_prefix(job: batch_v1.Job) -> str:
    return job.task_groups[0].task_spec.environment.variables.get(ENV_JOB_PREFIX, "")
