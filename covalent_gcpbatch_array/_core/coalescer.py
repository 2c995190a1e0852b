"""The coalescing scheduler: it groups concurrent electrons into batches, one Batch job each.

Each electron's ``run()`` joins the :class:`Coalescer` with a key (its job shape) and a
:class:`BatchPolicy`. Members with an equal key and policy share a batch. A batch opens with
its first member, and every member learns its ``(batch_id, index)`` the moment it joins, so it
can upload its input while the batch is still open. The life of a batch::

    OPEN ──wave complete, window cap, full, idle gap or closing──▶ FLUSHED ──members ready or gone──▶ LAUNCHED ──▶ DONE
                                                   └──every member withdrew: never launched──▶ DONE

and of a member::

    JOINED ──set_ready──▶ READY ──batch launched──▶ LAUNCHED ──resolve / fail──▶ RESOLVED
       └─────withdraw / cancel────┴──▶ WITHDRAWN / CANCELLED      └──cancel──▶ CANCELLED

The launch callback runs once per batch, in the coalescer's own task group: cancelling one
electron's ``run()`` never cancels or loses its batch-mates. Nothing is lost: when the callback
raises, returns early, or the coalescer is torn down, every member still waiting gets an error.

Pure anyio: no Google imports, and time comes from :func:`anyio.current_time`, so the tests run
it on trio's ``MockClock``. A join is O(1): no task per member, one timer task per batch. The
one exception to pure anyio is a member's wait on asyncio (see :meth:`Member.wait`).
"""

from __future__ import annotations

import asyncio
import copy
import enum
import logging
import math
import sys
import uuid
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, NamedTuple, TypeVar, cast

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup

from covalent_gcpbatch_array.exceptions import (
    BatchLaunchError,
    CoalescerClosedError,
    ElectronCancelledError,
    StorageError,
)

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = [
    "Batch",
    "BatchPhase",
    "BatchPolicy",
    "Coalescer",
    "CoalescerStatistics",
    "FlushReason",
    "Member",
    "MemberState",
    "fresh_copy",
]

logger = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


@dataclass(frozen=True)
class BatchPolicy:
    """When a batch stops taking members. ``window == 0`` or ``max_size == 1`` gives every
    member a batch of its own, flushed at once (the one-job-per-electron baseline).

    :raises ValueError: a negative or NaN duration, or a ``max_size`` below 1
    """

    window: float  # seconds a batch stays open after its first member joined (inf: no limit)
    idle_gap: float  # flush early once no member joined for this long; 0 disables
    max_size: int  # members per batch (the executor caps it at Batch's 100,000 tasks per job)
    #: seconds a flushed batch waits for a member whose upload started (counted from the
    #: flush at the earliest) and is not ready yet; then it leaves the batch (withdrawn with a
    #: StorageError), which launches without it (inf: waits for every one). A member that has
    #: not started its upload (queued behind other uploads) is waited for.
    settle_timeout: float = math.inf

    def __post_init__(self) -> None:
        for name in ("window", "idle_gap", "settle_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value >= 0:  # `not >=` catches NaN
                raise ValueError(
                    f"BatchPolicy.{name} must be a number of seconds >= 0, got {value!r}"
                )
        if isinstance(self.max_size, bool) or not isinstance(self.max_size, int):
            raise ValueError(f"BatchPolicy.max_size must be an int, got {self.max_size!r}")
        if self.max_size < 1:
            raise ValueError(f"BatchPolicy.max_size must be at least 1, got {self.max_size}")

    @property
    def flushes_at_once(self) -> bool:
        """True for the baseline policies, whose batches hold a single member."""
        return self.window == 0 or self.max_size == 1


class MemberState(enum.Enum):
    """Where one member (one electron) is in its life."""

    JOINED = "joined"  # has its (batch_id, index); its input is being uploaded
    READY = "ready"  # input uploaded; waiting for its batch to launch
    LAUNCHED = "launched"  # its task is in the launched job; waiting for its outcome
    RESOLVED = "resolved"  # has its outcome: a value or an error
    WITHDRAWN = "withdrawn"  # gave up before launch (its upload failed); never launched
    CANCELLED = "cancelled"  # cancelled by the user, before launch (never launched) or after


class BatchPhase(enum.Enum):
    """Where one batch is in its life."""

    OPEN = "open"  # taking new members
    FLUSHED = "flushed"  # closed to new members; waiting until each is ready or gone
    LAUNCHED = "launched"  # the launch callback is running
    DONE = "done"  # launch returned or was not needed; every member has its outcome


class FlushReason(enum.Enum):
    """Why a batch stopped taking members."""

    WAVE_COMPLETE = "wave complete"  # every member it expected joined (Batch.flush_complete)
    WINDOW = "window cap"  # policy.window elapsed since the first member joined (or window == 0)
    FULL = "full"  # policy.max_size members joined
    IDLE = "idle gap"  # no member joined for policy.idle_gap seconds
    CLOSING = "closing"  # the coalescer is closing


class CoalescerStatistics(NamedTuple):
    """A snapshot of a :class:`Coalescer`; the ``members_*`` fields add up to every join."""

    open_batches: int  # taking new members
    waiting_batches: int  # flushed; waiting for members to be ready or to withdraw
    launched_batches: int  # launch callback running
    finished_batches: int  # launch returned, or never needed because every member withdrew
    members_waiting: int  # joined, input not ready yet
    members_ready: int  # input ready, batch not launched yet
    members_live: int  # launched, outcome not known yet
    members_done: int  # resolved, withdrawn or cancelled


_UNSETTLED = (MemberState.JOINED, MemberState.READY)
_PENDING = (MemberState.JOINED, MemberState.READY, MemberState.LAUNCHED)


class Member(Generic[T]):
    """One electron's place in a batch: task ``index`` of the job ``batch_id``.

    Used as a context manager around the electron's whole life (upload and wait), it makes
    sure the batch never waits for it forever: leaving on an exception before launch
    withdraws it with that exception; leaving on a cancellation (or an exception after
    launch) cancels it; leaving normally without :meth:`set_ready` withdraws it.
    """

    __slots__ = ("_batch", "_error", "_event", "_futures", "_state", "_value", "index")

    def __init__(self, batch: Batch[Any, T], index: int) -> None:
        self._batch = batch  # the batch it belongs to
        self.index = index  # its task index: 0, 1, 2... in join order
        self._state = MemberState.JOINED  # where it is in its life
        self._value: T | None = None  # the outcome once RESOLVED without error
        self._error: BaseException | None = None  # the outcome when it failed or gave up
        self._event: anyio.Event | None = None  # off asyncio: made on a wait, set on settling
        self._futures: list[asyncio.Future[None]] | None = None  # on asyncio: one per wait

    @property
    def batch(self) -> Batch[Any, T]:
        """The batch this member belongs to."""
        return self._batch

    @property
    def batch_id(self) -> str:
        """The id of its batch (the Batch job id)."""
        return self._batch.batch_id

    @property
    def state(self) -> MemberState:
        """Where the member is in its life."""
        return self._state

    @property
    def done(self) -> bool:
        """True once the outcome is known (resolved, failed, withdrawn or cancelled)."""
        return self._state not in _PENDING

    def set_uploading(self) -> None:
        """Mark the upload of the input as started: from now on (or from the flush, if later)
        the batch waits at most ``settle_timeout`` for it. A no-op unless JOINED."""
        if self._state is MemberState.JOINED:
            self._batch._upload_started(self)

    def set_ready(self) -> None:
        """Mark the input as uploaded. A no-op if the member already gave up or was failed."""
        if self._state is MemberState.JOINED:
            self._move(MemberState.READY)

    def withdraw(self, reason: BaseException) -> None:
        """Give up before launch (the upload failed); :meth:`wait` raises ``reason``.

        The index stays reserved: the job still has that task, and the launch code skips it.
        A no-op once the member is done.

        :raises RuntimeError: the member was already launched (use :meth:`cancel`)
        """
        if self._state in _UNSETTLED:
            self._finish(MemberState.WITHDRAWN, error=reason)
        elif self._state is MemberState.LAUNCHED:
            raise RuntimeError(
                f"{self!r} is already launched: withdraw() is for giving up before launch, "
                f"use cancel() to stop a launched task"
            )

    def cancel(self) -> bool:
        """Cancel the electron; :meth:`wait` raises :class:`ElectronCancelledError`.

        Before launch it counts as withdrawn. After launch the launch code sees the state
        CANCELLED (see :meth:`Batch.wait_cancelled`) and stops the task.

        :return: True if this call cancelled it, False if it was already done
        """
        if self.done:
            return False
        error = ElectronCancelledError(
            f"the electron (task {self.index} of batch {self.batch_id}) was cancelled"
        )
        self._finish(MemberState.CANCELLED, error=error)
        return True

    def resolve(self, value: T) -> None:
        """Give the electron its result (launch code only). A no-op once the member is done.

        :raises RuntimeError: the member is not launched yet
        """
        if self._check_launched("resolve"):
            self._finish(MemberState.RESOLVED, value=value)

    def fail(self, error: BaseException) -> None:
        """Give the electron its error (launch code only): a fresh exception object per member.

        A no-op once the member is done.

        :raises RuntimeError: the member is not launched yet
        """
        if not isinstance(error, BaseException):
            raise TypeError(f"fail() takes an exception, got {error!r}")
        if self._check_launched("fail"):
            self._finish(MemberState.RESOLVED, error=error)

    async def wait(self) -> T:
        """Wait for the outcome and return the result, or raise the error.

        Cancelling a wait does not change the member (the context manager does that).

        :raises ElectronCancelledError: the member was cancelled
        :raises BatchLaunchError: the launch code of its batch failed
        :raises CoalescerClosedError: the coalescer was torn down before the member ran
        """
        if self.done:
            await anyio.lowlevel.checkpoint()
        elif (future := self._new_future()) is not None:
            try:
                await future
            finally:
                if self._futures is not None:  # cancelled: this wait is over, not the member
                    self._futures.remove(future)
        else:
            if self._event is None:
                self._event = anyio.Event()
            await self._event.wait()
        if self._error is not None:
            raise self._error
        return cast(T, self._value)

    def _new_future(self) -> asyncio.Future[None] | None:
        """On asyncio, a future for one wait, completed on settling; else None.

        Thousands of members wait at once: a bare future costs a fifth of an anyio.Event (an
        asyncio.Event with its deque of waiters, ~1.3 KB in all), and awaiting one is what
        asyncio.Event.wait does, cancellation included.
        """
        try:
            future = asyncio.get_running_loop().create_future()
        except RuntimeError:  # not asyncio: anyio runs on trio
            return None
        if self._futures is None:
            self._futures = []
        self._futures.append(future)
        return future

    def __enter__(self) -> Member[T]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is None:
            if self._state is MemberState.JOINED:
                self.withdraw(RuntimeError(f"{self!r} left its batch without calling set_ready()"))
        elif isinstance(exc, Exception) and self._state in _UNSETTLED:
            self.withdraw(exc)
        else:
            # A cancellation, or an error after launch: nobody will take the outcome.
            self.cancel()

    def __repr__(self) -> str:
        return f"<Member {self.batch_id}[{self.index}] {self._state.value}>"

    def _check_launched(self, action: str) -> bool:
        if self._state in _UNSETTLED:
            raise RuntimeError(f"cannot {action} {self!r}: only launched members get outcomes")
        return self._state is MemberState.LAUNCHED

    def _finish(
        self, state: MemberState, *, value: T | None = None, error: BaseException | None = None
    ) -> None:
        self._value = value
        self._error = error
        self._move(state)
        if self._event is not None:
            self._event.set()
        futures, self._futures = self._futures, None
        for future in futures or ():
            if not future.done():
                future.set_result(None)

    def _move(self, new: MemberState) -> None:
        old, self._state = self._state, new
        self._batch._member_moved(self, old, new)


class Batch(Generic[K, T]):
    """A group of members that becomes one Batch job with ``len(members)`` tasks.

    The launch callback gets it once every member is ready or gone, runs the job for
    :meth:`launched_members` (the other indices are skipped), resolves or fails each of them,
    and returns.
    """

    def __init__(
        self, coalescer: Coalescer[K, T], batch_id: str, key: K, policy: BatchPolicy, now: float
    ) -> None:
        self.batch_id = batch_id  # unique; the Batch job id, known when the batch opens
        self.key = key  # what its members share (the job shape)
        self.policy = policy  # when it flushes
        self.members: list[Member[T]] = []  # every member, by index
        self.phase = BatchPhase.OPEN  # where it is in its life
        self.flush_reason: FlushReason | None = None  # why it stopped taking members
        self.opened_at = now  # anyio.current_time() of the first join
        self.flushed_at: float | None = None  # anyio.current_time() of the flush
        self.payload: Any = None  # the launch code's own data about the batch (never read here)
        self._coalescer = coalescer
        self._last_join_at = now  # the idle deadline is this plus policy.idle_gap
        self._unready = 0  # members still JOINED: the launch waits for this to be 0
        #: JOINED members whose upload started, with its time, in the order they started
        self._uploading: dict[Member[T], float] = {}
        self._live = 0  # members LAUNCHED and without an outcome
        self._launched: list[Member[T]] = []  # the members given to the launch code
        self._cancelled: list[Member[T]] = []  # launched members cancelled, not yet reported
        self._change: anyio.Event | None = None  # set on progress; made when someone waits
        self._timer: anyio.CancelScope | None = None  # the flush timer's sleep, while OPEN
        self._expecting = False  # more members are known to be coming: no idle-gap flush

    def launched_members(self) -> list[Member[T]]:
        """The members that were launched (in index order), whatever their state now."""
        return list(self._launched)

    def live_members(self) -> list[Member[T]]:
        """The members launched and still without an outcome."""
        return [member for member in self._launched if member.state is MemberState.LAUNCHED]

    def fail_live(self, error: BaseException) -> None:
        """Fail every live member with ``error``, each with a copy of its own (launch code only).

        A copy per member: an exception object raised in several electrons' tasks at once
        would collect every one of their tracebacks and contexts.
        """
        for member in self.live_members():
            member.fail(fresh_copy(error))

    async def wait_cancelled(self) -> list[Member[T]]:
        """Wait until launched members are cancelled, and return those not reported yet.

        Returns ``[]`` once no launched member is left without an outcome, so
        ``while cancelled := await batch.wait_cancelled(): ...`` ends with the batch.
        """
        while not self._cancelled and self._live:
            await self._wait_change()
        await anyio.lowlevel.checkpoint()
        cancelled, self._cancelled = self._cancelled, []
        return cancelled

    async def wait_resolved(self) -> None:
        """Wait until every launched member has its outcome."""
        while self._live:
            await self._wait_change()
        await anyio.lowlevel.checkpoint()

    def set_expecting(self, expecting: bool) -> None:
        """Say whether more members are known to be on their way.

        While True the idle gap does not flush the batch; the window and ``max_size`` still do.
        """
        if expecting != self._expecting:
            self._expecting = expecting
            if self._timer is not None:
                self._timer.cancel()  # the timer recomputes its deadline

    def flush_complete(self) -> None:
        """Flush now (reason WAVE_COMPLETE): every member it expected joined. No-op unless OPEN."""
        if self.phase is BatchPhase.OPEN:
            self._flush(FlushReason.WAVE_COMPLETE, anyio.current_time())

    def __repr__(self) -> str:
        return f"<Batch {self.batch_id} {self.phase.value} members={len(self.members)}>"

    # -- used by the coalescer --

    def _add_member(self, now: float) -> Member[T]:
        member: Member[T] = Member(self, len(self.members))
        self.members.append(member)
        self._last_join_at = now
        self._unready += 1
        self._coalescer._member_counts[MemberState.JOINED] += 1
        return member

    def _flush(self, reason: FlushReason, now: float) -> None:
        self._coalescer._batch_flushed(self)
        self.phase = BatchPhase.FLUSHED
        self.flush_reason = reason
        self.flushed_at = now
        if self._timer is not None:
            self._timer.cancel()
        logger.debug(
            "batch %s flushed (%s): %d members, %.2f s after it opened",
            self.batch_id,
            reason.value,
            len(self.members),
            now - self.opened_at,
        )

    async def _wait_flushed(self) -> None:
        """Sleep until the window or idle deadline, unless a join or close flushes first.

        A join only records its time: when the timer wakes at an idle deadline that a later
        join pushed back, it sleeps again until the new one. Joins cost no timer operation,
        and the timer wakes at most about ``2 * window / idle_gap`` times (plus once per
        :meth:`set_expecting` change). No idle deadline while the batch is expecting members.
        """
        policy = self.policy
        window_deadline = self.opened_at + policy.window
        while self.phase is BatchPhase.OPEN:
            idle_deadline = self._idle_deadline()
            with anyio.CancelScope(deadline=min(window_deadline, idle_deadline)) as self._timer:
                await anyio.sleep_forever()
            self._timer = None
            if self.phase is not BatchPhase.OPEN:
                return  # flushed by a join (full or wave complete) or by closing
            now = anyio.current_time()
            if now >= window_deadline:
                self._flush(FlushReason.WINDOW, now)
            elif now >= self._idle_deadline():  # nobody joined since, and nobody is expected
                self._flush(FlushReason.IDLE, now)

    def _idle_deadline(self) -> float:
        if self._expecting or not self.policy.idle_gap:
            return math.inf
        return self._last_join_at + self.policy.idle_gap

    def _upload_started(self, member: Member[T]) -> None:
        self._uploading[member] = anyio.current_time()
        if len(self._uploading) == 1:
            self._notify()  # the first deadline to watch

    async def _settle(self) -> None:
        """Wait until no member is JOINED, withdrawing each whose upload has run for
        ``settle_timeout`` (counted from the flush at the earliest): its job-mates go on.

        Uploads start in order, so the first one still running has the first deadline.
        """
        timeout = self.policy.settle_timeout
        while self._unready:
            first = next(iter(self._uploading.items()), None)
            if first is None:
                deadline = math.inf
            else:
                member, started_at = first
                deadline = max(started_at, cast(float, self.flushed_at)) + timeout
                if deadline <= anyio.current_time():
                    member.withdraw(
                        StorageError(
                            f"the input of task {member.index} of batch {self.batch_id} was "
                            f"not uploaded within {timeout:g} s of the start of its upload (or "
                            "of the batch's flush): the batch was launched without it (Cloud "
                            "Storage kept failing or the input is very large); dispatch the "
                            "electron again, and for a large input on a slow link raise the "
                            "executor's upload_timeout"
                        )
                    )
                    continue
            with anyio.CancelScope(deadline=deadline):
                await self._wait_change()

    def _launch_ready_members(self) -> int:
        for member in self.members:
            if member.state is MemberState.READY:
                self._launched.append(member)
                member._move(MemberState.LAUNCHED)
        return len(self._launched)

    def _member_moved(self, member: Member[T], old: MemberState, new: MemberState) -> None:
        counts = self._coalescer._member_counts
        counts[old] -= 1
        counts[new] += 1
        if old is MemberState.JOINED:
            self._uploading.pop(member, None)
            self._unready -= 1
            if not self._unready:
                self._notify()
        if new is MemberState.LAUNCHED:
            self._live += 1
        elif old is MemberState.LAUNCHED:
            self._live -= 1
            if new is MemberState.CANCELLED:
                self._cancelled.append(member)
                self._notify()
            elif not self._live:
                self._notify()

    def _notify(self) -> None:
        if self._change is not None:
            self._change.set()
            self._change = None

    async def _wait_change(self) -> None:
        if self._change is None:
            self._change = anyio.Event()
        await self._change.wait()


def fresh_copy(error: BaseException) -> BaseException:
    """A new exception object equal to ``error``: same type, arguments, attributes and cause."""
    copied = copy.copy(error)
    copied.__cause__ = error.__cause__
    copied.__traceback__ = None
    return copied


def _random_batch_id(key: object) -> str:
    return f"batch-{uuid.uuid4().hex[:16]}"


class Coalescer(Generic[K, T]):
    """Groups members by key and policy into batches, and launches each batch once.

    Use it as ``async with Coalescer(launch) as coalescer:``; it owns a task group with one
    task per unfinished batch (the flush timer, then the launch). When the ``async with`` body
    ends normally, the open batches flush (reason CLOSING) and launch as usual, and the exit
    waits for every launch to return. When the body raises or is cancelled, every batch task is
    cancelled and each member still waiting fails with :class:`CoalescerClosedError`.

    :param launch: called once per batch that has a ready member, in the coalescer's task
        group; it must resolve or fail every member of :meth:`Batch.live_members`. If it raises
        an :class:`Exception`, each of those members fails with a :class:`BatchLaunchError`
        chained to it, and the coalescer carries on.
    :param new_batch_id: makes the id of a new batch from its key (default: ``batch-<hex>``)
    """

    def __init__(
        self,
        launch: Callable[[Batch[K, T]], Awaitable[None]],
        *,
        new_batch_id: Callable[[K], str] = _random_batch_id,
    ) -> None:
        self._launch = launch
        self._new_batch_id = new_batch_id
        self._task_group: TaskGroup | None = None  # set while inside `async with`
        self._closing = False  # set on exit: no more joins
        self._open: dict[tuple[K, BatchPolicy], Batch[K, T]] = {}  # OPEN batches
        self._unfinished: dict[str, Batch[K, T]] = {}  # batches not DONE, by id
        self._batch_counts = dict.fromkeys(BatchPhase, 0)  # batches per phase
        self._member_counts = dict.fromkeys(MemberState, 0)  # members per state

    async def __aenter__(self) -> Coalescer[K, T]:
        if self._task_group is not None or self._closing:
            raise RuntimeError("a Coalescer can be entered only once")
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        assert self._task_group is not None, "__aexit__ without __aenter__"
        self._closing = True
        if exc is None:
            now = anyio.current_time()
            for batch in list(self._open.values()):
                batch._flush(FlushReason.CLOSING, now)
        # On an exception the task group cancels every batch task; their cleanup fails members.
        return await self._task_group.__aexit__(exc_type, exc, traceback)

    def join(self, key: K, policy: BatchPolicy) -> Member[T]:
        """Join the open batch for ``(key, policy)``, opening one if there is none.

        Never blocks. The member knows its ``(batch_id, index)`` at once; the caller uploads
        its input, then calls :meth:`Member.set_ready` (or withdraws) and :meth:`Member.wait`.
        Call it from the event loop's thread.

        :raises CoalescerClosedError: the coalescer is closing
        :raises RuntimeError: the coalescer is not entered (``async with``)
        """
        if self._closing:
            raise CoalescerClosedError(
                "the coalescer is closing (the executor is shutting down): no new electrons"
            )
        if self._task_group is None:
            raise RuntimeError("use `async with Coalescer(...)` before join()")
        now = anyio.current_time()
        batch = self._open.get((key, policy))
        if batch is None:
            batch = self._open_batch(key, policy, now)
        member = batch._add_member(now)
        if policy.window == 0:
            batch._flush(FlushReason.WINDOW, now)
        elif len(batch.members) >= policy.max_size:
            batch._flush(FlushReason.FULL, now)
        return member

    def member(self, batch_id: str, index: int) -> Member[T] | None:
        """The member at ``index`` of the unfinished batch ``batch_id``, or None."""
        batch = self._unfinished.get(batch_id)
        if batch is None or not 0 <= index < len(batch.members):
            return None
        return batch.members[index]

    def statistics(self) -> CoalescerStatistics:
        """A snapshot of the batches and members, by phase and state."""
        batches, members = self._batch_counts, self._member_counts
        return CoalescerStatistics(
            open_batches=batches[BatchPhase.OPEN],
            waiting_batches=batches[BatchPhase.FLUSHED],
            launched_batches=batches[BatchPhase.LAUNCHED],
            finished_batches=batches[BatchPhase.DONE],
            members_waiting=members[MemberState.JOINED],
            members_ready=members[MemberState.READY],
            members_live=members[MemberState.LAUNCHED],
            members_done=members[MemberState.RESOLVED]
            + members[MemberState.WITHDRAWN]
            + members[MemberState.CANCELLED],
        )

    def _open_batch(self, key: K, policy: BatchPolicy, now: float) -> Batch[K, T]:
        assert self._task_group is not None
        batch_id = self._new_batch_id(key)
        if batch_id in self._unfinished:
            raise ValueError(f"new_batch_id returned {batch_id!r}, the id of an unfinished batch")
        batch = Batch(self, batch_id, key, policy, now)
        self._open[(key, policy)] = batch
        self._unfinished[batch_id] = batch
        self._batch_counts[BatchPhase.OPEN] += 1
        self._task_group.start_soon(self._run_batch, batch, name=f"coalescer batch {batch_id}")
        return batch

    def _batch_flushed(self, batch: Batch[K, T]) -> None:
        del self._open[(batch.key, batch.policy)]
        self._set_phase(batch, BatchPhase.FLUSHED)

    def _set_phase(self, batch: Batch[K, T], phase: BatchPhase) -> None:
        self._batch_counts[batch.phase] -= 1
        self._batch_counts[phase] += 1
        batch.phase = phase

    async def _run_batch(self, batch: Batch[K, T]) -> None:
        """The one task of a batch: flush timer, wait for members, launch, clean up."""
        failure: Callable[[Member[T]], BaseException] = _closed_error
        try:
            await batch._wait_flushed()
            await batch._settle()
            if batch._launch_ready_members():
                self._set_phase(batch, BatchPhase.LAUNCHED)
                try:
                    await self._launch(batch)
                except Exception as exc:
                    failure = _launch_failed(exc)
                else:
                    failure = _launch_returned_early
        finally:
            # Nothing is lost: whoever still waits gets an error, whatever ended the batch.
            for member in batch.members:
                if not member.done:
                    member._finish(MemberState.RESOLVED, error=failure(member))
            if batch.phase is BatchPhase.OPEN:
                del self._open[(batch.key, batch.policy)]
            self._set_phase(batch, BatchPhase.DONE)
            del self._unfinished[batch.batch_id]


def _closed_error(member: Member[Any]) -> BaseException:
    return CoalescerClosedError(
        f"the electron (task {member.index} of batch {member.batch_id}) did not run: the "
        f"executor shut down before its batch finished; dispatch it again once the Covalent "
        f"server is running"
    )


def _launch_failed(raised: Exception) -> Callable[[Member[Any]], BaseException]:
    # Launch code runs task groups: name the one error inside, not "1 sub-exception".
    cause: BaseException = raised
    while isinstance(cause, BaseExceptionGroup) and len(cause.exceptions) == 1:
        cause = cause.exceptions[0]

    def error(member: Member[Any]) -> BaseException:
        batch = member.batch
        launch_error = BatchLaunchError(
            f"launching batch {batch.batch_id} ({len(batch.members)} tasks) failed, so its "
            f"task {member.index} has no result: {type(cause).__name__}: {cause} (the cause "
            f"is chained; the batch's other electrons got the same error)"
        )
        launch_error.__cause__ = cause
        return launch_error

    return error


def _launch_returned_early(member: Member[Any]) -> BaseException:
    return BatchLaunchError(
        f"the launch code of batch {member.batch_id} returned without an outcome for task "
        f"{member.index}: this is a bug in covalent-gcpbatch-array, please report it"
    )
