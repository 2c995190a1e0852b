"""The executor's home in a process: one coalescer and its job monitors per event loop.

Covalent makes a fresh executor per electron and runs every electron's ``run()`` on the
server's one event loop. The batches they share, and the monitors of their jobs, must outlive
any one ``run()``: they live in a :class:`ExecutorRuntime`, started on the loop by the first
electron as a task of its own (a root task, not a child of that electron), and stopped when no
electron and no job is left. The API clients of a loop (and the limiters of their worker
threads) are cached in its :class:`LoopClients`, which outlives the runtimes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import threading
from datetime import datetime, timezone
from typing import Any

import anyio
import anyio.abc
from anyio.lowlevel import RunVar

from covalent_gcpbatch_array._core.clients import make_batch_client, make_storage_client
from covalent_gcpbatch_array._core.coalescer import (
    Batch,
    BatchPolicy,
    Coalescer,
    Member,
    MemberState,
)
from covalent_gcpbatch_array._core.contract import TaskRef
from covalent_gcpbatch_array._core.envelopes import ElectronOrigin, new_job_key
from covalent_gcpbatch_array._core.job_monitor import ArrayJobContext, BatchPayload, run_array_job
from covalent_gcpbatch_array._core.jobs import JobsApi, new_job_id
from covalent_gcpbatch_array._core.outcome import ElectronOutcome
from covalent_gcpbatch_array._core.storage import (
    INPUT_SLOTS,
    INPUT_THREADS,
    OTHER_THREADS,
    AsyncTaskStore,
    TaskObject,
    TaskStore,
)
from covalent_gcpbatch_array._core.waves import WaveTracker, node_keys, server_reader
from covalent_gcpbatch_array.config import MAX_TASKS_PER_JOB, ExecutorConfig, JobShape
from covalent_gcpbatch_array.exceptions import GCPBatchArrayError

__all__ = ["ExecutorRuntime", "LoopClients"]

logger = logging.getLogger(__name__)

#: The running event loop's runtime (anyio keeps one value per loop).
_CURRENT: RunVar[ExecutorRuntime | None] = RunVar("gcpbatch_array_runtime", default=None)

#: Threads (and so HTTP connections) per event loop for the Batch API; Cloud Storage's are
#: storage.INPUT_THREADS for inputs and storage.OTHER_THREADS for the rest.
BATCH_API_THREADS = 8
#: How long deleting the input of an electron that gave up before launch may take.
DISCARD_SECONDS = 10.0
#: Member states of an electron that gave up (before launch, for discard_unlaunched).
_GAVE_UP = (MemberState.WITHDRAWN, MemberState.CANCELLED)


def _sigterm_is_ours() -> bool:
    """Whether SIGTERM is left to its default (it kills the process without a clean-up).

    A host that handles it already (the Covalent server, through uvicorn) stops the loop
    itself, which cancels the runtime: its job monitors clean up then.
    """
    return (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    )


def batch_policy(config: ExecutorConfig) -> BatchPolicy:
    """The coalescing policy of a config."""
    return BatchPolicy(
        window=config.batch_window,
        idle_gap=config.batch_idle_gap,
        max_size=min(config.max_tasks_per_job, MAX_TASKS_PER_JOB),
        # upload_timeout: how long a flushed batch waits for an input upload that is not done
        # (then that electron leaves it with a StorageError); 0: as long as the upload takes.
        settle_timeout=config.upload_timeout or math.inf,
    )


class LoopClients:
    """The API facades of one event loop, cached, and the limiters of their worker threads."""

    _current: RunVar[LoopClients | None] = RunVar("gcpbatch_array_clients", default=None)

    def __init__(self) -> None:
        self._jobs_limiter = anyio.CapacityLimiter(BATCH_API_THREADS)
        self._store_limiter = anyio.CapacityLimiter(OTHER_THREADS)
        self._input_limiter = anyio.CapacityLimiter(INPUT_THREADS)
        self._input_slots = anyio.CapacityLimiter(INPUT_SLOTS)
        self._jobs: dict[tuple[str, str, str], JobsApi] = {}
        self._stores: dict[tuple[str, str, str, str], AsyncTaskStore] = {}

    @classmethod
    def current(cls) -> LoopClients:
        """The running loop's clients."""
        clients = cls._current.get()
        if clients is None:
            clients = cls()
            cls._current.set(clients)
        return clients

    def store(self, config: ExecutorConfig) -> AsyncTaskStore:
        """The store of a config's bucket and prefix."""
        key = (
            config.storage_api_endpoint,
            config.project_id,
            config.bucket_name,
            config.bucket_prefix,
        )
        if key not in self._stores:
            client = make_storage_client(config.project_id, config.storage_api_endpoint)
            self._stores[key] = AsyncTaskStore(
                TaskStore(client, config.bucket_name, config.bucket_prefix),
                self._store_limiter,
                self._input_limiter,
                self._input_slots,
            )
        return self._stores[key]

    def jobs(self, config: ExecutorConfig | JobShape) -> JobsApi:
        """The Batch API facade of a config's endpoint, project and region."""
        key = (config.batch_api_endpoint, config.project_id, config.region)
        if key not in self._jobs:
            client = make_batch_client(config.batch_api_endpoint)
            self._jobs[key] = JobsApi(client, config.project_id, config.region, self._jobs_limiter)
        return self._jobs[key]


class ExecutorRuntime:
    """The coalescer, job monitors and clients of one event loop."""

    def __init__(self) -> None:
        self._coalescer: Coalescer[JobShape, ElectronOutcome] | None = None
        self._waves: WaveTracker  # tells open batches which electrons are still coming
        self._started = anyio.Event()  # set once the coalescer runs
        self._changed = anyio.Event()  # set when an electron or a job finished
        self._closing = False  # set when idle: new electrons go to a new service
        self._active = 0  # electrons joined and not finished
        self._launches = 0  # launch callbacks running
        self.clients = LoopClients.current()  # the loop's API facades
        self._root_task: Any = None  # keeps the asyncio root task referenced
        self._stopped = anyio.Event()  # set when the service has nothing left to do
        self._terminated = False  # SIGTERM arrived: the process ends once cleaned up

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
    async def cancel_task(cls, config: ExecutorConfig, ref: TaskRef) -> None:
        """Cancel the electron waiting on task ``ref`` in this loop, or mark the task cancelled.

        The electron's ``run()`` wakes with
        :class:`~covalent_gcpbatch_array.exceptions.ElectronCancelledError`, and its job's
        monitor (or its batch's launch) writes the task's ``cancelled`` marker, which makes a
        pending task skip and a running one stop. With no such electron here (another process
        runs it, or it is over), the marker is written only while the task still has its
        input: after the clean-up there is nothing left to stop, nor to leave behind.
        """
        service = _CURRENT.get()
        coalescer = None if service is None else service._coalescer
        member = None if coalescer is None else coalescer.member(ref.job_id, ref.index)
        if member is not None and member.cancel():
            return
        store = LoopClients.current().store(config)
        if await store.exists(ref, TaskObject.INPUT):
            await store.write_cancelled(ref)

    async def discard_unlaunched(self, config: ExecutorConfig, member: Member[Any]) -> None:
        """Delete the input of an electron that gave up before its batch launched.

        A batch none of whose electrons is left never launches, and so never cleans up; a
        batch that launches gives the slot a ``cancelled`` marker, checked before the input.
        Shielded and bounded: it runs while the electron's ``run()`` is being cancelled.
        """
        if member.state not in _GAVE_UP or member in member.batch.launched_members():
            return
        ref = TaskRef(member.batch_id, member.index)
        with anyio.CancelScope(shield=True, deadline=anyio.current_time() + DISCARD_SECONDS):
            try:
                await self.clients.store(config).delete(ref, TaskObject.INPUT)
            except GCPBatchArrayError as exc:
                logger.warning("could not delete the input of %s (carrying on): %s", member, exc)

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
        async with anyio.create_task_group() as tg:
            if _sigterm_is_ours():
                await tg.start(self._stop_on_sigterm, tg.cancel_scope)
            async with (
                WaveTracker(server_reader(), node_keys(batch_policy)) as self._waves,
                Coalescer(self._launch, new_batch_id=lambda _key: new_job_id()) as coalescer,
            ):
                self._coalescer = coalescer
                self._started.set()
                # The electron that started the service joins right after `_started`; from
                # then on every electron that leaves and every launch that ends wakes this.
                while True:
                    await self._changed.wait()
                    self._changed = anyio.Event()
                    if not self._active and not self._launches:
                        self._closing = True
                        break
            tg.cancel_scope.cancel()  # idle: stop watching for SIGTERM
        self._stopped.set()
        logger.debug("batch service idle: stopped")
        if self._terminated:
            # Cleaned up: now end the process as SIGTERM would have.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    async def _stop_on_sigterm(
        self, scope: anyio.CancelScope, *, task_status: anyio.abc.TaskStatus[None]
    ) -> None:
        """On SIGTERM, cancel ``scope``: every job monitor deletes its job and cleans up."""
        with anyio.open_signal_receiver(signal.SIGTERM) as signals:
            task_status.started()
            async for _ in signals:
                logger.warning("SIGTERM: deleting the Batch jobs this process owns, then exiting")
                self._terminated = True
                self._closing = True
                scope.cancel()
                return

    def _notify(self) -> None:
        self._changed.set()

    # -- electrons --

    def join(self, config: ExecutorConfig, origin: ElectronOrigin) -> Member[ElectronOutcome]:
        """Give an electron its slot ``(job_id, index)`` in a batch of its shape."""
        assert self._coalescer is not None
        member = self._coalescer.join(config.shape, batch_policy(config))
        if config.graph_aware:
            self._waves.joined(member.batch, origin.dispatch_id, origin.node_id)
        batch = member.batch
        if batch.payload is None:
            batch.payload = BatchPayload(key=new_job_key(), config=config)
        batch.payload.origins[member.index] = origin
        batch.payload.submitted_at[member.index] = datetime.now(timezone.utc)
        self._active += 1
        return member

    def leave(self, member: Member[ElectronOutcome]) -> None:
        """Forget an electron once its ``run()`` is over."""
        self._active -= 1
        self._notify()

    def job_key(self, member: Member[ElectronOutcome]) -> bytes:
        """The signing key of the member's batch."""
        payload: BatchPayload = member.batch.payload
        return payload.key

    # -- the launch callback --

    async def _launch(self, batch: Batch[JobShape, ElectronOutcome]) -> None:
        self._launches += 1
        config: ExecutorConfig = batch.payload.config
        try:
            ctx = ArrayJobContext(jobs=self.clients.jobs(config), store=self.clients.store(config))
            await run_array_job(batch, ctx)
        finally:
            self._launches -= 1
            self._notify()
