"""Running one flushed batch as one Batch array job, and tracking each of its tasks.

:func:`run_array_job` is the coalescer's launch callback. It writes the manifest (and a
``cancelled`` marker for every slot whose electron gave up before launch), creates the job,
then polls it once every ``poll_freq`` (one ``GetJob``, plus one ``ListTasks`` when tasks
finished) and resolves each electron the moment its own task ends. Cancelled electrons get
their marker; once no electron is waiting on the job, the job is deleted if still running, and
the objects of its tasks are deleted (the manifest stays for `gcpbatch-array tasks`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import anyio
from google.api_core import exceptions as api_exceptions
from google.cloud import batch_v1

from covalent_gcpbatch_array._core.coalescer import Batch, Member
from covalent_gcpbatch_array._core.contract import TaskRef
from covalent_gcpbatch_array._core.envelopes import ElectronOrigin, decode_error, decode_result
from covalent_gcpbatch_array._core.jobs import FLUSH_REASON_LABEL, JobsApi, build_job
from covalent_gcpbatch_array._core.outcome import ElectronOutcome, infrastructure_error
from covalent_gcpbatch_array._core.storage import AsyncTaskStore, ManifestEntry, TaskObject
from covalent_gcpbatch_array.config import ExecutorConfig, JobShape
from covalent_gcpbatch_array.exceptions import (
    BatchApiError,
    ElectronCancelledError,
    GCPBatchArrayError,
    ResultIntegrityError,
    StorageError,
    TaskInfrastructureError,
)

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

try:
    from google.cloud.storage.exceptions import DataCorruption
except ImportError:  # pragma: no cover  (google-cloud-storage 2.x)
    from google.resumable_media.common import DataCorruption

__all__ = ["STOP_SECONDS", "ArrayJobContext", "BatchPayload", "run_array_job"]

logger = logging.getLogger(__name__)

_TERMINAL_JOB_STATES = (batch_v1.JobStatus.State.SUCCEEDED, batch_v1.JobStatus.State.FAILED)
_FINISHED_TASK_STATES = ("SUCCEEDED", "FAILED")
#: Job states before any VM ran a task; a job stays in them while Batch waits for capacity.
_WAITING_JOB_STATES = (
    batch_v1.JobStatus.State.STATE_UNSPECIFIED,
    batch_v1.JobStatus.State.QUEUED,
    batch_v1.JobStatus.State.SCHEDULED,
)
_STARTED_TASK_STATES = ("RUNNING", "SUCCEEDED", "FAILED")
#: How long a stopping executor spends on one job: delete it, fail its electrons, clean up.
STOP_SECONDS = 30.0


@dataclass
class BatchPayload:
    """What the executor keeps in a coalescer batch (``Batch.payload``): its key and electrons."""

    key: bytes  # the job's HMAC key: reaches the tasks through the job definition only
    config: ExecutorConfig  # the config of the electron that opened the batch (poll_freq, ...)
    origins: dict[int, ElectronOrigin] = field(default_factory=dict)  # index -> electron
    submitted_at: dict[int, datetime] = field(default_factory=dict)  # index -> join time


@dataclass
class ArrayJobContext:
    """The clients one batch's job runs with."""

    jobs: JobsApi  # the Batch API of the batch's project and region
    store: AsyncTaskStore  # the batch's bucket and prefix

    async def housekeeping(
        self, what: str, func: Callable[..., Awaitable[Any]], *args: Any
    ) -> None:
        """A store call no electron's outcome depends on: its failure is logged, not raised.

        The manifest, the cancel markers and the cleanup help the executor and its users, but
        an electron whose result is known must still get it, and its job-mates too.
        """
        try:
            await func(*args)
        except GCPBatchArrayError as exc:
            logger.warning("could not %s (carrying on): %s", what, exc)


async def run_array_job(batch: Batch[JobShape, ElectronOutcome], ctx: ArrayJobContext) -> None:
    """Create the batch's job and resolve each launched electron as its task ends.

    ``batch.payload`` is the batch's :class:`BatchPayload`.

    Cancelled (the executor's loop is stopping: SIGINT, SIGTERM, the Covalent server shutting
    down), it deletes the job, fails the electrons still waiting and cleans up, shielded and
    within :data:`STOP_SECONDS`, before the cancellation goes on.
    """
    job_id = batch.batch_id
    payload: BatchPayload = batch.payload
    launched = {member.index: member for member in batch.launched_members()}
    monitor = _JobMonitor(batch, ctx, launched)
    try:
        await _write_manifest_and_markers(batch, payload, ctx, launched)
        if payload.config.orphan_timeout:
            # Written before the job exists, so that its tasks always find one.
            await ctx.store.renew_lease(job_id)
        job = build_job(
            payload.config.shape,
            task_count=len(batch.members),
            job_prefix=ctx.store.layout(job_id).folder,
            hmac_key=payload.key.hex(),
        )
        if batch.flush_reason is not None:  # for `gcpbatch-array jobs -o wide` and the demo
            job.labels[FLUSH_REASON_LABEL] = batch.flush_reason.value.replace(" ", "-")
        try:
            await ctx.jobs.create(job_id, job)
        except BatchApiError as exc:
            batch.fail_live(exc)
            return
        logger.info("created Batch job %s with %d tasks", job_id, len(batch.members))
        monitor.created_at = anyio.current_time()
        async with anyio.create_task_group() as tg:
            tg.start_soon(monitor.mark_cancellations)
            tg.start_soon(monitor.renew_lease)
            await monitor.poll_until_resolved(tg)
            tg.cancel_scope.cancel()
    except anyio.get_cancelled_exc_class():
        with anyio.CancelScope(shield=True) as scope:
            scope.deadline = anyio.current_time() + STOP_SECONDS
            await monitor.stop()
        raise
    await monitor.finish()


async def _write_manifest_and_markers(
    batch: Batch[JobShape, ElectronOutcome],
    payload: BatchPayload,
    ctx: ArrayJobContext,
    launched: dict[int, Member[ElectronOutcome]],
) -> None:
    entries = {
        index: ManifestEntry(
            payload.origins[index].dispatch_id,
            payload.origins[index].node_id,
            payload.submitted_at[index],
            payload.origins[index].name,
        )
        for index in launched
    }
    job_id = batch.batch_id
    async with anyio.create_task_group() as tg:
        manifest = f"write the manifest of job {job_id}"
        tg.start_soon(ctx.housekeeping, manifest, ctx.store.write_manifest, job_id, entries)
        for member in batch.members:
            if member.index not in launched:
                # Without it the slot's task finds no input and fails: wasted, but harmless.
                ref = TaskRef(job_id, member.index)
                marker = f"mark task {member.index} of job {job_id} cancelled"
                tg.start_soon(ctx.housekeeping, marker, ctx.store.write_cancelled, ref)


#: Reads of a task's objects before its electron gets the error. Bytes damaged on the way are
#: caught by the client's checksum (DataCorruption) or by the HMAC (a forged object fails every
#: read, and is never unpickled); the client retries everything else itself.
_OUTCOME_READS = 3
_READ_AGAIN_ON = (DataCorruption, ResultIntegrityError)


def _first_error(raised: BaseException) -> BaseException:
    """The error inside the exception groups that task groups wrap errors in."""
    while isinstance(raised, BaseExceptionGroup) and raised.exceptions:
        raised = raised.exceptions[0]
    return raised


def _electron_error(error: BaseException, ref: TaskRef) -> BaseException:
    if isinstance(error, GCPBatchArrayError):
        return error
    wrapped = StorageError(
        f"could not read the outcome of task {ref.index} of job {ref.job_id}: "
        f"{type(error).__name__}: {error}"
    )
    wrapped.__cause__ = error
    return wrapped


class _JobMonitor:
    """Polls one job and turns each finished task into its electron's outcome."""

    def __init__(
        self,
        batch: Batch[JobShape, ElectronOutcome],
        ctx: ArrayJobContext,
        launched: dict[int, Member[ElectronOutcome]],
    ) -> None:
        self.batch = batch  # the coalescer's batch: its members are the electrons
        self.payload: BatchPayload = batch.payload  # key and config of the batch
        self.ctx = ctx  # clients
        self.launched = launched  # index -> member, for the tasks that run an electron
        self.handled: set[int] = set()  # indices whose finished task was already collected
        self.finished: set[int] = set()  # indices of every task seen finished (any slot)
        self.job: batch_v1.Job | None = None  # the last job record read
        self.finished_seen = -1  # SUCCEEDED + FAILED count at the last ListTasks
        self.created_at = anyio.current_time()  # when the job was created, for queue_timeout

    @property
    def job_id(self) -> str:
        return self.batch.batch_id

    @property
    def config(self) -> ExecutorConfig:
        return self.payload.config

    async def poll_until_resolved(self, tg: anyio.abc.TaskGroup) -> None:
        """Poll every ``poll_freq`` until no launched electron is waiting for its task."""
        while self.batch.live_members():
            if not await self._poll(tg):
                return
            with anyio.move_on_after(self.config.poll_freq):
                await self.batch.wait_resolved()

    async def _poll(self, tg: anyio.abc.TaskGroup) -> bool:
        """One poll; False when the job is gone and its electrons were failed."""
        try:
            self.job = await self.ctx.jobs.get(self.job_id)
        except BatchApiError as exc:
            if isinstance(exc.__cause__, api_exceptions.NotFound):
                self.batch.fail_live(
                    TaskInfrastructureError(
                        f"Batch job {self.job_id} was deleted outside this executor before "
                        "its task finished"
                    )
                )
                return False
            logger.warning("polling job %s failed, will poll again: %s", self.job_id, exc)
            return True
        counts = self.job.status.task_groups["group0"].counts if self.job.status.task_groups else {}
        if self._stuck_in_queue(counts):
            return False
        finished = sum(int(counts.get(state, 0)) for state in _FINISHED_TASK_STATES)
        terminal = self.job.status.state in _TERMINAL_JOB_STATES
        if finished != self.finished_seen or terminal:
            states = () if terminal else _FINISHED_TASK_STATES
            try:
                task_states = await self.ctx.jobs.task_states(self.job_id, states)
            except BatchApiError as exc:
                logger.warning("listing tasks of %s failed, will retry: %s", self.job_id, exc)
                return True
            self.finished_seen = finished
            for index, state in task_states.items():
                self._collect_if_finished(tg, index, state)
            if terminal:
                self._fail_unfinished_of_terminal_job()
        return True

    def _stuck_in_queue(self, counts: Any) -> bool:
        """Fail the electrons of a job that started no task within ``queue_timeout``.

        Batch keeps a job QUEUED or SCHEDULED for as long as the region lacks the quota or the
        capacity for its VMs (days, for a GPU type in short supply); nobody would hear of it.
        """
        assert self.job is not None
        limit = self.config.queue_timeout
        waited = anyio.current_time() - self.created_at
        started = sum(int(counts.get(state, 0)) for state in _STARTED_TASK_STATES)
        if (
            not limit
            or waited < limit
            or started
            or self.job.status.state not in _WAITING_JOB_STATES
        ):
            return False
        state = batch_v1.JobStatus.State(self.job.status.state).name
        self.batch.fail_live(
            TaskInfrastructureError(
                f"Batch job {self.job_id} started no task within queue_timeout={limit:g}s (it "
                f"is still {state}): Batch is waiting for VMs it cannot get, usually for lack "
                "of quota (CPUs, GPUs, Spot VMs, IP addresses) or capacity in the region; "
                "check the quotas and the job's status events, or raise queue_timeout "
                "(constructor or [executors.gcpbatch_array]; 0 waits as long as Batch does). "
                "The job was deleted, no task of it ran",
                events=tuple(event.description for event in self.job.status.status_events),
            )
        )
        return True

    def _collect_if_finished(self, tg: anyio.abc.TaskGroup, index: int, state: str) -> None:
        member = self.launched.get(index)
        if state in _FINISHED_TASK_STATES:
            self.finished.add(index)
        if member is None or index in self.handled or state not in _FINISHED_TASK_STATES:
            return
        self.handled.add(index)
        tg.start_soon(self._collect, member, state)

    def _fail_unfinished_of_terminal_job(self) -> None:
        assert self.job is not None
        events = tuple(event.description for event in self.job.status.status_events)
        for member in self.batch.live_members():
            if member.index not in self.handled:
                member.fail(
                    infrastructure_error(
                        None,
                        time_limit=self.config.time_limit,
                        retries=self.config.retries,
                        job_events=events,
                    )
                )

    async def _collect(self, member: Member[ElectronOutcome], state: str) -> None:
        """Read the task's objects and resolve (or fail) its electron, and only its electron.

        Whatever reading one task's outcome raises ends up as that electron's error: raised
        out of here it would end the monitor and fail every job-mate still waiting.
        """
        ref = TaskRef(self.job_id, member.index)
        for read in range(1, _OUTCOME_READS + 1):
            try:
                outcome = await self._read_outcome(ref, state)
                break
            except Exception as raised:
                error = _first_error(raised)
                if read < _OUTCOME_READS and isinstance(error, _READ_AGAIN_ON):
                    logger.warning(
                        "reading the outcome of task %d of job %s failed, reading it again: %s",
                        ref.index,
                        ref.job_id,
                        error,
                    )
                    await anyio.sleep(0.5 * read)  # back off: this is not a synchronisation
                    continue
                member.fail(_electron_error(error, ref))
                return
        if isinstance(outcome, BaseException):
            member.fail(outcome)
        else:
            member.resolve(outcome)

    async def _read_outcome(self, ref: TaskRef, state: str) -> ElectronOutcome | BaseException:
        """The outcome the runner recorded, in one download when the task's state says which.

        A succeeded task normally has ``result.pkl``, a failed one ``error.pkl``; the other
        object is read only when the expected one is absent (a result written by an attempt
        that Batch then counted as failed is still the electron's result).
        """
        store, key = self.ctx.store, self.payload.key
        succeeded = state == "SUCCEEDED"
        reads = (TaskObject.RESULT, TaskObject.ERROR)
        for obj in reads if succeeded else reversed(reads):
            data = await store.download(ref, obj)
            if data is None:
                continue
            if obj is TaskObject.RESULT:
                result = decode_result(data, key=key, task=ref)
                return ElectronOutcome(result.value, stdout=result.stdout, stderr=result.stderr)
            failure = decode_error(data, key=key, task=ref)
            return ElectronOutcome(
                error=failure.to_exception(),
                traceback_text=failure.traceback_text,
                stdout=failure.stdout,
                stderr=failure.stderr,
            )
        if await store.exists(ref, TaskObject.CANCELLED):
            # Cancelled by whoever wrote the marker (another process too): the runner stopped
            # the function and recorded no outcome.
            return ElectronCancelledError(
                f"task {ref.index} of job {ref.job_id} was cancelled (its cancel marker is set)"
            )
        return infrastructure_error(
            await self._whole_task(ref),
            time_limit=self.config.time_limit,
            retries=self.config.retries,
        )

    async def _whole_task(self, ref: TaskRef) -> batch_v1.Task | None:
        """The task with its status events (exit codes, attempts), which polls do not list.

        ``None`` when it cannot be read: the error then says what a task without events says.
        """
        try:
            return await self.ctx.jobs.get_task(ref.job_id, ref.index)
        except BatchApiError as exc:
            logger.warning("could not read task %d of job %s: %s", ref.index, ref.job_id, exc)
            return None

    async def mark_cancellations(self) -> None:
        """Write the ``cancelled`` marker of every electron cancelled after launch."""
        while cancelled := await self.batch.wait_cancelled():
            async with anyio.create_task_group() as tg:
                for member in cancelled:
                    ref = TaskRef(self.job_id, member.index)
                    # Unwritten, the task runs to its end and nobody takes its result.
                    what = f"mark task {ref.index} of job {ref.job_id} cancelled"
                    tg.start_soon(self.ctx.housekeeping, what, self.ctx.store.write_cancelled, ref)

    async def renew_lease(self) -> None:
        """Renew the job's lease until cancelled: a few times per ``orphan_timeout``.

        Its tasks stop once it is older than ``orphan_timeout``, e.g. after this process died.
        """
        timeout = self.config.orphan_timeout
        if not timeout:
            return
        what = f"renew the lease of job {self.job_id}"
        while True:
            await anyio.sleep(min(self.config.poll_freq, timeout / 4))
            await self.ctx.housekeeping(what, self.ctx.store.renew_lease, self.job_id)

    async def stop(self) -> None:
        """The executor is stopping: delete the job if it may still run tasks, then fail the
        electrons still waiting on it (a process may end once they have their errors), and
        delete its tasks' objects."""
        if len(self.finished) < len(self.batch.members):
            await self._delete_job("the executor is stopping")
        self.batch.fail_live(
            TaskInfrastructureError(
                f"the executor stopped (its process was interrupted or terminated, or the "
                f"Covalent server shut down) while this electron waited on Batch job "
                f"{self.job_id}: the job was deleted; dispatch the electron again"
            )
        )
        await self._clean_up()

    async def _delete_job(self, why: str) -> None:
        logger.info("deleting job %s: %s", self.job_id, why)
        try:
            await self.ctx.jobs.delete(self.job_id)
        except BatchApiError as exc:
            logger.warning("could not delete job %s: %s", self.job_id, exc)

    async def _clean_up(self) -> None:
        if self.config.orphan_timeout:  # nobody renews it any more, nor needs it
            what = f"delete the lease of job {self.job_id}"
            await self.ctx.housekeeping(what, self.ctx.store.delete_lease, self.job_id)
        if not self.config.keep_objects:
            what = f"delete the task objects of job {self.job_id}"
            await self.ctx.housekeeping(what, self.ctx.store.delete_tasks, self.job_id)

    async def finish(self) -> None:
        """Delete the job if it still runs tasks nobody waits for; delete its tasks' objects.

        Whether tasks still run is decided from the tasks listed finished, not from the job's
        counts: a ListTasks can already see a task that the GetJob before it did not count.
        """
        job = self.job
        unfinished = len(self.finished) < len(self.batch.members)
        if job is not None and unfinished and job.status.state not in _TERMINAL_JOB_STATES:
            await self._delete_job("no electron is waiting on it")
        await self._clean_up()
