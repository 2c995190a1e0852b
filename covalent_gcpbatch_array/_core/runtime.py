"""The executor's home in a process: one coalescer and its job monitors per event loop.

Covalent makes a fresh executor per electron and runs every electron's ``run()`` on the
server's one event loop. The batches they share, and the monitors of their jobs, must outlive
any one ``run()``: they live in a :class:`ExecutorRuntime`, started on the loop by the first
electron as a task of its own (a root task, not a child of that electron), and stopped when no
electron and no job is left. The service also caches the API clients and tracks which member
is which ``(job_id, index)`` so that ``cancel()`` finds it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, TypeVar

import anyio
from anyio.lowlevel import RunVar

from covalent_gcpbatch_array._core.clients import make_batch_client, make_storage_client
from covalent_gcpbatch_array._core.coalescer import (
    Batch,
    BatchPhase,
    BatchPolicy,
    Coalescer,
    Member,
)
from covalent_gcpbatch_array._core.contract import TaskRef
from covalent_gcpbatch_array._core.envelopes import ElectronOrigin, new_job_key
from covalent_gcpbatch_array._core.job_monitor import ArrayJobContext, BatchExtras, run_array_job
from covalent_gcpbatch_array._core.jobs import JobsApi, new_job_id
from covalent_gcpbatch_array._core.outcome import ElectronOutcome
from covalent_gcpbatch_array._core.storage import TaskStore
from covalent_gcpbatch_array._core.waves import WaveTracker, node_keys, server_reader
from covalent_gcpbatch_array.config import MAX_TASKS_PER_JOB, ExecutorConfig, JobShape

__all__ = ["ExecutorRuntime"]

logger = logging.getLogger(__name__)

#: The running event loop's runtime (anyio keeps one value per loop).
_CURRENT: RunVar[ExecutorRuntime | None] = RunVar("gcpbatch_array_runtime", default=None)

_T = TypeVar("_T")

#: Threads (and so HTTP connections) per service for Cloud Storage and for the Batch API. Of the
#: storage threads, INPUT_THREADS upload inputs and the rest read results, write markers and clean
#: up, so that the results of a running job never queue behind the inputs of the next batches.
STORAGE_THREADS = 32
INPUT_THREADS = 16
BATCH_API_THREADS = 8


def batch_policy(config: ExecutorConfig) -> BatchPolicy:
    """The coalescing policy of a config."""
    return BatchPolicy(
        window=config.batch_window,
        idle_gap=config.batch_idle_gap,
        max_size=min(config.max_tasks_per_job, MAX_TASKS_PER_JOB),
    )


class ExecutorRuntime:
    """The coalescer, job monitors and clients of one event loop."""

    def __init__(self) -> None:
        self._coalescer: Coalescer[JobShape, ElectronOutcome] | None = None
        self._waves: WaveTracker  # tells open batches which electrons are still coming
        self._started = anyio.Event()  # set once the coalescer runs
        self._changed = anyio.Event()  # set when an electron or a job finished
        self._closing = False  # set when idle: new electrons go to a new service
        self._extras: dict[str, BatchExtras] = {}  # batch id -> key, config, electrons
        self._members: dict[tuple[str, int], Member[ElectronOutcome]] = {}  # for cancel()
        self._active = 0  # electrons joined and not finished
        self._launches = 0  # launch callbacks running
        self._input_limiter = anyio.CapacityLimiter(INPUT_THREADS)
        self._storage_limiter = anyio.CapacityLimiter(STORAGE_THREADS - INPUT_THREADS)
        self._batch_limiter = anyio.CapacityLimiter(BATCH_API_THREADS)
        self._batch_apis: dict[tuple[str, str, str], JobsApi] = {}
        self._stores: dict[tuple[str, str, str, str], TaskStore] = {}
        self._root_task: Any = None  # keeps the asyncio root task referenced
        self._stopped = anyio.Event()  # set when the service has nothing left to do

    # -- finding the service of the running loop --

    @classmethod
    async def current(cls) -> ExecutorRuntime:
        """The running loop's service, started if needed."""
        service = _CURRENT.get()
        if service is None or service._closing:
            service = cls()
            _CURRENT.set(service)
            service._spawn()
        await service._started.wait()
        return service

    @classmethod
    async def wait_idle(cls) -> None:
        """Wait until the running loop's service has stopped, if one runs.

        It stops once no electron waits and every job monitor has ended: jobs nobody waits for
        deleted, task objects cleaned up. A server (or a test) that stops the clouds or the
        loop should wait for this first.
        """
        service = _CURRENT.get()
        if service is not None:
            await service._stopped.wait()

    @classmethod
    def find_member(cls, job_id: str, index: int) -> Member[ElectronOutcome] | None:
        """The member waiting on task ``index`` of ``job_id`` in the running loop, if any."""
        service = _CURRENT.get()
        return None if service is None else service._members.get((job_id, index))

    def _spawn(self) -> None:
        # A root task of the loop, not a child of the electron that happened to start it.
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no asyncio loop: anyio runs on its other backend, trio
            import trio

            trio.lowlevel.spawn_system_task(self._serve)
        else:
            self._root_task = loop.create_task(self._serve())

    async def _serve(self) -> None:
        async with (
            WaveTracker(server_reader(), node_keys(batch_policy)) as self._waves,
            Coalescer(self._launch, new_batch_id=lambda _key: new_job_id()) as coalescer,
        ):
            self._coalescer = coalescer
            self._started.set()
            # The electron that started the service joins right after `_started`; from then
            # on every electron that leaves and every launch that ends wakes this check.
            while True:
                await self._changed.wait()
                self._changed = anyio.Event()
                if not self._active and not self._launches:
                    self._closing = True
                    break
        self._stopped.set()
        logger.debug("batch service idle: stopped")

    def _notify(self) -> None:
        self._changed.set()

    # -- electrons --

    def join(self, config: ExecutorConfig, origin: ElectronOrigin) -> Member[ElectronOutcome]:
        """Give an electron its slot ``(job_id, index)`` in a batch of its shape."""
        assert self._coalescer is not None
        member = self._coalescer.join(config.shape, batch_policy(config))
        if config.graph_aware:
            self._waves.joined(member.batch, origin.dispatch_id, origin.node_id)
        extras = self._extras.get(member.batch_id)
        if extras is None:
            extras = self._extras[member.batch_id] = BatchExtras(key=new_job_key(), config=config)
        extras.origins[member.index] = origin
        extras.submitted_at[member.index] = datetime.now(timezone.utc)
        self._members[(member.batch_id, member.index)] = member
        self._active += 1
        return member

    def leave(self, member: Member[ElectronOutcome]) -> None:
        """Forget an electron once its ``run()`` is over."""
        self._members.pop((member.batch_id, member.index), None)
        if member.batch.phase is BatchPhase.DONE:  # never launched: every member gave up
            self._extras.pop(member.batch_id, None)
        self._active -= 1
        self._notify()

    def job_key(self, member: Member[ElectronOutcome]) -> bytes:
        """The signing key of the member's batch."""
        return self._extras[member.batch_id].key

    # -- clients --

    def store(self, config: ExecutorConfig) -> TaskStore:
        """The (cached) store of a config's bucket and prefix."""
        key = (
            config.storage_api_endpoint,
            config.project_id,
            config.bucket_name,
            config.bucket_prefix,
        )
        if key not in self._stores:
            client = make_storage_client(config.project_id, config.storage_api_endpoint)
            self._stores[key] = TaskStore(client, config.bucket_name, config.bucket_prefix)
        return self._stores[key]

    def batch_api(self, config: ExecutorConfig | JobShape) -> JobsApi:
        """The (cached) Batch API facade of a config's endpoint, project and region."""
        key = (config.batch_api_endpoint, config.project_id, config.region)
        if key not in self._batch_apis:
            client = make_batch_client(config.batch_api_endpoint)
            self._batch_apis[key] = JobsApi(
                client, config.project_id, config.region, self._batch_limiter
            )
        return self._batch_apis[key]

    async def run_blocking(self, func: Callable[..., _T], /, *args: Any) -> _T:
        """Run a blocking Cloud Storage call in a worker thread."""
        return await anyio.to_thread.run_sync(
            functools.partial(func, *args), limiter=self._storage_limiter
        )

    async def upload_input(self, config: ExecutorConfig, ref: TaskRef, data: bytes) -> None:
        """Upload an electron's input envelope, on the threads kept for inputs."""
        await anyio.to_thread.run_sync(
            self.store(config).upload_input, ref, data, limiter=self._input_limiter
        )

    # -- the launch callback --

    async def _launch(self, batch: Batch[JobShape, ElectronOutcome]) -> None:
        self._launches += 1
        extras = self._extras.pop(batch.batch_id)
        try:
            ctx = ArrayJobContext(
                jobs=self.batch_api(extras.config),
                store=self.store(extras.config),
                run_blocking=self.run_blocking,
            )
            await run_array_job(batch, extras, ctx)
        finally:
            self._launches -= 1
            self._notify()
