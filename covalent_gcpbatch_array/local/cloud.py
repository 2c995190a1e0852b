"""LocalCloud: the Batch API emulator and fake-gcs-server, started and stopped together.

``LocalCloud`` is what tests, the demo, the benchmarks and users share::

    with LocalCloud(provisioning_delay=0.0) as cloud:      # or `async with`
        executor = GCPBatchArrayExecutor(**cloud.executor_config())
        batch = cloud.batch_client()                        # the real google-cloud-batch client
        cloud.fail_calls("CreateJob", status=503, count=2)  # fault injection
        print(cloud.stats())                                # API calls answered, by method

Cloud Storage is fake-gcs-server behind our proxy (:mod:`.gcs.proxy`), which answers batch
requests (``/batch/storage/v1``) as Google does (fake-gcs-server's own batch API answers a
delete ``200 null`` and a part without a ``Content-ID`` not at all) and enforces the request
preconditions fake-gcs-server ignores: the executor (through :meth:`executor_config`), any
client of :meth:`environment` and the Batch emulator's tasks reach storage through it (a task's
outcome over 8 MiB is a resumable upload, whose ``ifGenerationMatch=0`` only the proxy
honours). With ``LocalCloud(gcs_faults=True)`` it also fails chosen requests of both::

        cloud.fail_storage("PUT", status=503, count=2)      # or drop=True, path="result.pkl"
        print(cloud.storage_stats())                        # requests seen, faults injected

Both servers are child processes that die with the thread that started them (so a killed test
run leaves no orphans). Start and stop a LocalCloud from a long-lived thread: the main thread,
or the event loop's thread with ``async with``.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.from_thread
import anyio.to_thread

from covalent_gcpbatch_array._core.clients import make_batch_client, make_storage_client
from covalent_gcpbatch_array.exceptions import LocalCloudError
from covalent_gcpbatch_array.local.batch.faults import (
    DEFAULT_OPERATION_DELAY,
    DEFAULT_QUOTA_WINDOW_SECONDS,
)
from covalent_gcpbatch_array.local.gcs.fake_gcs import GcsEmulator
from covalent_gcpbatch_array.local.logging.resources import JOB_RESOURCE, RESOURCE_TYPES
from covalent_gcpbatch_array.local.process import (
    Lifecycle,
    OneShotService,
    Spawner,
    read_ready_line,
    read_tail,
    spawn_process,
    stop_process,
)

if TYPE_CHECKING:
    import google.cloud.storage as storage
    from google.cloud import batch_v1

__all__ = ["LocalCloud"]

DEFAULT_PROJECT_ID: Final = "local-project"
DEFAULT_REGION: Final = "us-east1"
DEFAULT_BUCKET_NAME: Final = "covalent-local"
DEFAULT_CONTAINER_IMAGE_URI: Final = "local/covalent-gcpbatch-array-runner:latest"
_BATCH_SERVER_MODULE: Final = "covalent_gcpbatch_array.local.batch.server"
_GCS_PROXY_MODULE: Final = "covalent_gcpbatch_array.local.gcs.proxy"
_ADMIN_TIMEOUT: Final = 30.0  # seconds for one admin HTTP call


class _Unset(enum.Enum):
    UNSET = enum.auto()  # "leave this setting as it is" (None already means "no limit")


_UNSET: Final = _Unset.UNSET


class LocalCloud(OneShotService):
    """Google Batch (our emulator) and Cloud Storage (fake-gcs-server) on local ports.

    :param provisioning_delay: seconds from a job's creation to its first task start
    :param max_running_tasks: cap on tasks running at once across all jobs (``None``: no cap)
    :param jobs_per_minute: job-creation quota; over it CreateJob answers 429 (``None``: none);
        the same as ``jobs_per_window`` with a 60 s window, as Google's quota
    :param project_id: the project name clients use
    :param region: the location clients use
    :param bucket_name: the bucket created at start
    :param container_image_uri: the image the executor config names (any image runs the
        project's runner with the current Python unless ``image_map`` says otherwise)
    :param image_map: image URI or fnmatch pattern -> argv replacing the image's entrypoint
    :param workdir: where task outputs and server logs go (default: a temporary folder,
        removed at stop)
    :param preload: modules the emulator's fork server imports once (``None``: its default,
        which includes covalent; ``()`` starts faster when tasks are plain scripts)
    :param host: the interface both servers bind
    :param batch_port: the Batch emulator's port (``0``: a free one)
    :param storage_port: fake-gcs-server's port (``None``: a free one)
    :param startup_timeout: seconds each server gets to become ready
    :param gcs_proxy: put our proxy in front of fake-gcs-server (the default): it answers
        Cloud Storage batch requests as Google does; ``False`` lets clients talk to
        fake-gcs-server directly (one hop less, its own batch API, whose answers differ from
        Google's, preconditions not all enforced)
    :param gcs_faults: let :meth:`fail_storage` fail chosen storage requests of the executor
        and the tasks (needs ``gcs_proxy``)
    :param jobs_per_window: job-creation quota per ``quota_window_seconds`` (``None``: none)
    :param quota_window_seconds: the quota's sliding window; shorter than Google's minute lets
        a test meet the quota and see it pass in seconds
    :param deletion_delay: seconds a deleted job stays DELETION_IN_PROGRESS (its operation
        not done) after its tasks are stopped
    :param cancellation_delay: seconds a cancelled job stays CANCELLATION_IN_PROGRESS
    :param tasks_hidden_until_provisioned: a new job lists and counts no tasks (GetTask: 404,
        GetJob without ``status.taskGroups``) until its provisioning delay is over, as
        Google's may
    :param log_resource_type: the monitored resource of the task log entries Cloud Logging
        answers: ``"batch.googleapis.com/Job"``, or the older ``"generic_task"``
    :raises ValueError: ``jobs_per_minute`` given with ``jobs_per_window`` or a window other
        than 60 s; ``gcs_faults`` without ``gcs_proxy``; an unknown ``log_resource_type``
    """

    def __init__(
        self,
        provisioning_delay: float = 0.0,
        max_running_tasks: int | None = None,
        jobs_per_minute: int | None = None,
        *,
        project_id: str = DEFAULT_PROJECT_ID,
        region: str = DEFAULT_REGION,
        bucket_name: str = DEFAULT_BUCKET_NAME,
        container_image_uri: str = DEFAULT_CONTAINER_IMAGE_URI,
        image_map: Mapping[str, Sequence[str]] | None = None,
        workdir: str | os.PathLike[str] | None = None,
        preload: Sequence[str] | None = None,
        host: str = "127.0.0.1",
        batch_port: int = 0,
        storage_port: int | None = None,
        startup_timeout: float = 120.0,
        gcs_faults: bool = False,
        jobs_per_window: int | None = None,
        quota_window_seconds: float = DEFAULT_QUOTA_WINDOW_SECONDS,
        gcs_proxy: bool = True,
        deletion_delay: float = DEFAULT_OPERATION_DELAY,
        cancellation_delay: float = DEFAULT_OPERATION_DELAY,
        tasks_hidden_until_provisioned: bool = False,
        log_resource_type: str = JOB_RESOURCE,
    ) -> None:
        if gcs_faults and not gcs_proxy:
            raise ValueError("gcs_faults needs the proxy: leave gcs_proxy=True")
        if log_resource_type not in RESOURCE_TYPES:
            raise ValueError(
                f"log_resource_type must be one of {RESOURCE_TYPES}, got {log_resource_type!r}"
            )
        if jobs_per_minute is not None and (
            jobs_per_window is not None or quota_window_seconds != DEFAULT_QUOTA_WINDOW_SECONDS
        ):
            raise ValueError(
                "jobs_per_minute is the quota over a 60 s window; give jobs_per_window with "
                "quota_window_seconds instead"
            )
        self.provisioning_delay = provisioning_delay  # as started; configure() may change it
        self.max_running_tasks = max_running_tasks  # as started
        self.jobs_per_minute = jobs_per_minute  # as started
        # the job-creation quota as started: creates allowed per window, and the window
        self.jobs_per_window = jobs_per_minute if jobs_per_minute is not None else jobs_per_window
        self.quota_window_seconds = quota_window_seconds
        self.deletion_delay = deletion_delay  # as started, like the delays below
        self.cancellation_delay = cancellation_delay
        self.tasks_hidden_until_provisioned = tasks_hidden_until_provisioned
        self.log_resource_type = log_resource_type
        self.project_id = project_id
        self.region = region
        self.bucket_name = bucket_name
        self.container_image_uri = container_image_uri
        self.image_map = dict(image_map) if image_map is not None else None
        self.preload = tuple(preload) if preload is not None else None
        self.host = host
        self.batch_port = batch_port
        self.storage_port = storage_port
        self.startup_timeout = startup_timeout
        self.gcs_faults = gcs_faults
        self.gcs_proxy = gcs_proxy
        self._given_workdir = Path(workdir) if workdir is not None else None
        self._workdir: Path | None = None  # the folder in use while running
        self._gcs: GcsEmulator | None = None
        self._batch_process: subprocess.Popen[bytes] | None = None
        self._batch_endpoint: str | None = None
        self._batch_grpc_endpoint: str | None = None
        self._proxy_process: subprocess.Popen[bytes] | None = None  # with gcs_proxy only
        self._proxy_endpoint: str | None = None
        self.state = Lifecycle.NEW

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> LocalCloud:
        """Start both servers and create the bucket; blocks until they answer.

        :raises LocalCloudError: a server did not start (the message carries its log tail)
        """
        self._start(spawn_process)
        return self

    def stop(self) -> None:
        """Stop the servers (Batch first, so its tasks stop writing to GCS). Idempotent."""
        try:
            if self._batch_process is not None:
                stop_process(self._batch_process, timeout=10.0)
            if self._proxy_process is not None:
                stop_process(self._proxy_process, timeout=5.0)
            if self._gcs is not None:
                self._gcs.stop()
        finally:
            self.state = Lifecycle.STOPPED
            if self._given_workdir is None and self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)

    async def __aenter__(self) -> LocalCloud:
        # Waiting happens in a worker thread; the processes are forked on the event loop's
        # thread, because the kernel kills them when the forking thread ends (see _process).
        def spawn_on_loop_thread(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
            return anyio.from_thread.run_sync(functools.partial(spawn_process, *args, **kwargs))

        try:
            await anyio.to_thread.run_sync(self._start, spawn_on_loop_thread)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.stop)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.stop)

    def _start(self, spawn: Spawner) -> None:
        self._start_once(functools.partial(self._start_servers, spawn))

    def _start_servers(self, spawn: Spawner) -> None:
        if self._given_workdir is not None:
            self._given_workdir.mkdir(parents=True, exist_ok=True)
            self._workdir = self._given_workdir
        else:
            self._workdir = Path(tempfile.mkdtemp(prefix="cga-local-cloud-"))
        self._gcs = GcsEmulator.start(
            host=self.host,
            port=self.storage_port,
            log_dir=self._workdir,
            startup_timeout=self.startup_timeout,
            spawn=spawn,
        )
        self._gcs.create_bucket(self.bucket_name, self.project_id)
        if self.gcs_proxy:
            self._start_gcs_proxy(spawn, self._gcs.endpoint, self._workdir)
        # Tasks too: their outcome writes need the preconditions the proxy enforces.
        self._start_batch_server(spawn, self._proxy_endpoint or self._gcs.endpoint, self._workdir)

    def _start_batch_server(self, spawn: Spawner, storage_endpoint: str, workdir: Path) -> None:
        argv = [
            sys.executable,
            *("-m", _BATCH_SERVER_MODULE),
            *("--host", self.host, "--port", str(self.batch_port)),
            *("--storage-endpoint", storage_endpoint),
            *("--provisioning-delay", repr(float(self.provisioning_delay))),
            *("--deletion-delay", repr(float(self.deletion_delay))),
            *("--cancellation-delay", repr(float(self.cancellation_delay))),
            *("--log-resource-type", self.log_resource_type),
            *("--workdir", str(workdir)),
        ]
        if self.tasks_hidden_until_provisioned:
            argv.append("--tasks-hidden-until-provisioned")
        if self.max_running_tasks is not None:
            argv += ["--max-running-tasks", str(self.max_running_tasks)]
        if self.jobs_per_window is not None:
            argv += ["--jobs-per-window", str(self.jobs_per_window)]
        argv += ["--quota-window-seconds", repr(float(self.quota_window_seconds))]
        if self.image_map is not None:
            argv += ["--image-map", json.dumps({k: list(v) for k, v in self.image_map.items()})]
        if self.preload is not None:
            argv += ["--preload", ",".join(self.preload)]
        self._batch_process, ready = self._start_server(
            spawn,
            argv,
            what="the Batch emulator",
            log_path=workdir / "batch-server.log",
            keys=("endpoint", "grpc_endpoint"),
        )
        self._batch_endpoint, self._batch_grpc_endpoint = ready["endpoint"], ready["grpc_endpoint"]

    def _start_gcs_proxy(self, spawn: Spawner, upstream: str, workdir: Path) -> None:
        argv = [
            sys.executable,
            *("-m", _GCS_PROXY_MODULE),
            *("--upstream", upstream, "--host", self.host, "--port", "0"),
        ]
        self._proxy_process, ready = self._start_server(
            spawn, argv, what="the GCS proxy", log_path=workdir / "gcs-proxy.log"
        )
        self._proxy_endpoint = ready["endpoint"]

    def _start_server(
        self,
        spawn: Spawner,
        argv: list[str],
        *,
        what: str,
        log_path: Path,
        keys: tuple[str, ...] = ("endpoint",),
    ) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
        """Start one of our server processes and read its ready line's ``keys``.

        The process prints exactly one line on stdout, ``{"endpoint": "http://HOST:PORT", ...}``,
        and logs to ``log_path``.
        """
        with log_path.open("wb") as log_file:
            process = spawn(argv, stdout=subprocess.PIPE, stderr=log_file)
        try:
            line = read_ready_line(process, self.startup_timeout, what=what, log_path=log_path)
            try:
                ready = {key: json.loads(line)[key] for key in keys}
                if not all(isinstance(value, str) for value in ready.values()):
                    raise ValueError(ready)
                if not ready["endpoint"].startswith("http://"):
                    raise ValueError(ready["endpoint"])
            except (ValueError, KeyError, TypeError) as exc:
                raise LocalCloudError(
                    f"{what} printed {line!r} instead of its ready line "
                    f'{{"endpoint": "http://HOST:PORT", ...}} with {", ".join(keys)}; its '
                    f"log:\n{read_tail(log_path)}"
                ) from exc
        except BaseException:
            stop_process(process, timeout=5.0)
            raise
        return process, ready

    # -- where things are -----------------------------------------------------------------

    @property
    def batch_endpoint(self) -> str:
        """The Batch emulator's base URL, for ``client_options={"api_endpoint": ...}``."""
        return self._running()[0]

    @property
    def batch_grpc_endpoint(self) -> str:
        """The Batch emulator's gRPC address, ``HOST:PORT`` (no TLS: an insecure channel).

        The same jobs as :attr:`batch_endpoint`; see :meth:`batch_grpc_client`.
        """
        self._running()
        assert self._batch_grpc_endpoint is not None
        return self._batch_grpc_endpoint

    @property
    def storage_endpoint(self) -> str:
        """Cloud Storage's base URL for clients, also the ``STORAGE_EMULATOR_HOST`` value.

        With ``gcs_proxy`` (the default) it is the proxy's; :attr:`gcs_endpoint` bypasses it.
        """
        gcs = self._running()[1]
        return self._proxy_endpoint or gcs.endpoint

    @property
    def gcs_endpoint(self) -> str:
        """fake-gcs-server's own base URL (no injected faults; its own batch API, not Google's)."""
        return self._running()[1].endpoint

    @property
    def workdir(self) -> Path:
        """The folder holding task outputs and both servers' logs."""
        self._running()
        assert self._workdir is not None
        return self._workdir

    @property
    def batch_pid(self) -> int:
        """The Batch emulator's process id."""
        self._running()
        assert self._batch_process is not None
        return self._batch_process.pid

    @property
    def storage_pid(self) -> int:
        """fake-gcs-server's process id."""
        return self._running()[1].pid

    @property
    def gcs_proxy_pid(self) -> int | None:
        """The GCS proxy's process id (``None`` with ``gcs_proxy=False``)."""
        self._running()
        return None if self._proxy_process is None else self._proxy_process.pid

    def is_running(self) -> bool:
        """Whether every server process (both servers, and the proxy if any) is alive."""
        return (
            self.state is Lifecycle.RUNNING
            and self._batch_process is not None
            and self._batch_process.poll() is None
            and self._gcs is not None
            and self._gcs.is_running()
            and (self._proxy_process is None or self._proxy_process.poll() is None)
        )

    def executor_config(self) -> dict[str, str]:
        """The executor settings that point at this cloud: ``GCPBatchArrayExecutor(**config)``."""
        return {
            "project_id": self.project_id,
            "region": self.region,
            "bucket_name": self.bucket_name,
            "container_image_uri": self.container_image_uri,
            "batch_api_endpoint": self.batch_endpoint,
            "storage_api_endpoint": self.storage_endpoint,
        }

    def environment(self) -> dict[str, str]:
        """Environment variables that point Google's storage clients at this cloud."""
        return {"STORAGE_EMULATOR_HOST": self.storage_endpoint}

    def batch_client(self) -> batch_v1.BatchServiceClient:
        """A real ``batch_v1.BatchServiceClient`` (REST, anonymous) talking to the emulator."""
        return make_batch_client(self.batch_endpoint)

    def batch_grpc_client(self) -> batch_v1.BatchServiceClient:
        """A real ``batch_v1.BatchServiceClient`` on Google's default transport, gRPC.

        Its channel is insecure (the emulator has no TLS); close it with ``with client:``.
        """
        import grpc
        from google.cloud import batch_v1
        from google.cloud.batch_v1.services.batch_service.transports import (
            BatchServiceGrpcTransport,
        )

        channel = grpc.insecure_channel(self.batch_grpc_endpoint)
        return batch_v1.BatchServiceClient(transport=BatchServiceGrpcTransport(channel=channel))

    def batch_grpc_async_client(self) -> batch_v1.BatchServiceAsyncClient:
        """A real ``batch_v1.BatchServiceAsyncClient`` (gRPC, insecure channel).

        Make it on the event loop that uses it (``grpc.aio`` channels belong to one loop), and
        close it there: ``async with client:``.
        """
        import grpc.aio
        from google.cloud import batch_v1
        from google.cloud.batch_v1.services.batch_service.transports import (
            BatchServiceGrpcAsyncIOTransport,
        )

        channel = grpc.aio.insecure_channel(self.batch_grpc_endpoint)
        return batch_v1.BatchServiceAsyncClient(
            transport=BatchServiceGrpcAsyncIOTransport(channel=channel)
        )

    def storage_client(self, *, direct: bool = False) -> storage.Client:
        """A real ``google.cloud.storage.Client`` (anonymous) talking to fake-gcs-server.

        :param direct: bypass the proxy, e.g. to inspect the bucket without meeting the faults
            planned for the executor
        """
        endpoint = self.gcs_endpoint if direct else self.storage_endpoint
        return make_storage_client(self.project_id, endpoint)

    # -- the emulator's admin API ---------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Calls answered by method, jobs created and task attempts run, since start.

        ``{"api_calls": {"CreateJob": n, "GetJob": n, ...}, "jobs_created": n,
        "task_attempts": n, "quota_refusals": n}``; failed calls count too, and
        ``quota_refusals`` counts the creates the job-creation quota refused.
        """
        result: dict[str, Any] = self._admin("GET", "stats")
        return result

    def fail_calls(self, method: str, status: int = 503, count: int = 1) -> None:
        """Make the next ``count`` calls of an RPC fail with Google's error for ``status``.

        :param method: the RPC name in CamelCase (``CreateJob``, ``GetJob``, ``ListTasks``, ...)
        :param status: the HTTP status (429, 500, 503, 403, ...)
        :param count: how many calls fail
        """
        self._admin("POST", "fail_calls", {"method": method, "status": status, "count": count})

    def fail_task(
        self,
        index: int,
        attempt: int = 0,
        exit_code: int = 50001,
        job_id: str | None = None,
        after_seconds: float = 0.0,
    ) -> None:
        """Make one attempt of one task die with ``exit_code`` (50001: spot preemption).

        :param index: the task's index in its job
        :param attempt: which attempt (0 is the first run, k the k-th retry)
        :param job_id: the job (``None``: the next job created)
        :param after_seconds: 0 fails the attempt as it starts; more lets it run that long
        """
        self._admin(
            "POST",
            "fail_task",
            {
                "index": index,
                "attempt": attempt,
                "exit_code": exit_code,
                "job_id": job_id,
                "after_seconds": after_seconds,
            },
        )

    def fail_storage(
        self,
        method: str = "*",
        status: int = 503,
        count: int = 1,
        *,
        drop: bool = False,
        path: str = "",
        lose_answer: bool = False,
        corrupt: bool = False,
    ) -> None:
        """Make the next ``count`` matching Cloud Storage requests fail (needs ``gcs_faults``).

        Requests of the executor and of the tasks alike; each planned failure is used once.

        :param method: the HTTP method (``GET`` downloads and reads, ``POST`` uploads, ``PUT``
            resumable upload chunks, ``DELETE``), or ``*`` for any
        :param status: the HTTP status answered instead (429, 500, 503, 403, ...)
        :param count: how many requests fail
        :param drop: close the connection without an answer instead
        :param path: only requests whose decoded path and query contain this, e.g.
            ``"result.pkl"`` (uploads name the object in the query)
        :param lose_answer: let the request reach storage first (a write takes effect), and
            only replace its answer (or, with ``drop``, cut it in half)
        :param corrupt: pass the answer on with one byte of its body flipped instead
        :raises LocalCloudError: the cloud runs without ``gcs_faults``, or a bad value
        """
        body = {
            "method": method,
            "status": status,
            "count": count,
            "drop": drop,
            "path": path,
            "lose_answer": lose_answer,
            "corrupt": corrupt,
        }
        self._proxy_admin("POST", "faults", body)

    def clear_storage_faults(self) -> int:
        """Forget the storage faults still planned; returns how many there were."""
        return int(self._proxy_admin("DELETE", "faults", faults=False)["cleared"])

    def storage_stats(self) -> dict[str, Any]:
        """What the proxy saw since start (needs ``gcs_proxy``, the default).

        ``{"requests": {"GET": n, "POST": n, ...}, "forwarded": n, "failed": n, "dropped": n,
        "answers_lost": n, "corrupted": n, "batches": n, "pending": n,
        "faulted": ["METHOD /path?query", ...]}``; each call inside a batch request counts as a
        request of its own too.
        """
        result: dict[str, Any] = self._proxy_admin("GET", "stats", faults=False)
        return result

    def configure(
        self,
        *,
        provisioning_delay: float | _Unset = _UNSET,
        max_running_tasks: int | _Unset | None = _UNSET,
        jobs_per_minute: int | _Unset | None = _UNSET,
        jobs_per_window: int | _Unset | None = _UNSET,
        quota_window_seconds: float | _Unset = _UNSET,
        deletion_delay: float | _Unset = _UNSET,
        cancellation_delay: float | _Unset = _UNSET,
        tasks_hidden_until_provisioned: bool | _Unset = _UNSET,
    ) -> dict[str, Any]:
        """Change the realism knobs while running; only the ones given change.

        The knobs are the constructor's of the same names. The job-creation quota is ``jobs_per_window`` creates in any ``quota_window_seconds``;
        ``jobs_per_minute`` sets both (the window to 60 s) and goes alone.

        :returns: the settings now in force
        :raises LocalCloudError: the emulator refused a value
        """
        changes = {
            key: value
            for key, value in (
                ("provisioning_delay", provisioning_delay),
                ("max_running_tasks", max_running_tasks),
                ("jobs_per_minute", jobs_per_minute),
                ("jobs_per_window", jobs_per_window),
                ("quota_window_seconds", quota_window_seconds),
                ("deletion_delay", deletion_delay),
                ("cancellation_delay", cancellation_delay),
                ("tasks_hidden_until_provisioned", tasks_hidden_until_provisioned),
            )
            if value is not _UNSET
        }
        result: dict[str, Any] = self._admin("POST", "settings", changes)
        return result

    def settings(self) -> dict[str, Any]:
        """The realism knobs in force."""
        result: dict[str, Any] = self._admin("GET", "settings")
        return result

    def task_output(self, job_id: str, index: int, attempt: int = 0, stream: str = "stdout") -> str:
        """What one attempt of a task printed on ``stream`` (``stdout`` or ``stderr``)."""
        return str(self._admin("GET", f"tasks/{job_id}/{index}/{attempt}/{stream}", text=True))

    # -- internals ------------------------------------------------------------------------

    def _running(self) -> tuple[str, GcsEmulator]:
        if self.state is not Lifecycle.RUNNING or self._batch_endpoint is None or not self._gcs:
            raise LocalCloudError(
                f"this LocalCloud is {self.state.value}, not running: use it inside "
                "`with LocalCloud(...) as cloud:` (or call start())"
            )
        return self._batch_endpoint, self._gcs

    def _proxy_admin(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        faults: bool = True,
    ) -> Any:
        self._running()
        if faults and not self.gcs_faults:
            raise LocalCloudError(
                "storage faults need the fault proxy: start the cloud with "
                "LocalCloud(gcs_faults=True)"
            )
        if self._proxy_endpoint is None:
            raise LocalCloudError(
                "this LocalCloud runs without its storage proxy: start it with "
                "LocalCloud(gcs_proxy=True), the default"
            )
        return self._admin(method, path, body, base=f"{self._proxy_endpoint}/_proxy")

    def _admin(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        text: bool = False,
        base: str | None = None,
    ) -> Any:
        base = base or f"{self._running()[0]}/_emulator"
        url = f"{base}/{path}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            url, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=_ADMIN_TIMEOUT) as response:
                payload = response.read().decode()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            with contextlib.suppress(ValueError, KeyError, TypeError):
                detail = json.loads(detail)["error"]["message"]
            server = "the Batch emulator" if base.endswith("/_emulator") else "the GCS proxy"
            where = url.split("/", 3)[3]
            raise LocalCloudError(
                f"{server} refused {method} /{where}: {exc.code} {detail}"
            ) from exc
        except OSError as exc:
            raise LocalCloudError(
                f"{url} did not answer ({exc}); is the local cloud still running? the Batch "
                f"emulator's log:\n{self._batch_log_tail()}"
            ) from exc
        return payload if text else json.loads(payload)

    def _batch_log_tail(self) -> str:
        return read_tail(self._workdir / "batch-server.log") if self._workdir else ""
