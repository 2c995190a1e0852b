"""Tests of the coalescing scheduler, on trio's MockClock: time is virtual and exact.

Times in these tests are multiples of 1/8 s, so sums of them are exact floats and flush times
can be compared with ``==``. The fake launch code (:class:`FakeCloud`) plays the executor's
part: electrons "upload" their input into its dict, its jobs "run" for ``run_time`` seconds and
resolve each live member with a value computed from that member's own input.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import math
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from anyio.abc import TaskGroup
from hypothesis import given, settings
from hypothesis import strategies as st

from covalent_gcpbatch_array._core.coalescer import (
    Batch,
    BatchPhase,
    BatchPolicy,
    Coalescer,
    CoalescerStatistics,
    FlushReason,
    Member,
    MemberState,
    fresh_copy,
)
from covalent_gcpbatch_array.exceptions import (
    BatchLaunchError,
    CoalescerClosedError,
    ElectronCancelledError,
    GCPBatchArrayError,
    StorageError,
    TaskInfrastructureError,
)
from tests.virtual_time import HANG, fails_if_stuck, mock_clock_backend

Key = str
Value = tuple[str, Any]


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    """Every test here runs on trio's MockClock."""
    return mock_clock_backend()


@dataclass
class Launch:
    """One call of the fake launch code."""

    batch: Batch[Key, Value]  # the batch it got
    at: float  # anyio.current_time() of the call
    indices: list[int]  # the launched members' indices


@dataclass
class FakeCloud:
    """The launch code's fake: a bucket of inputs, and jobs that turn them into results."""

    run_time: float = 1.0  # how long a job runs before it resolves its members
    fail_with: Exception | None = None  # raised by launch() after run_time, if set
    resolve_before_failing: int = 0  # members resolved before raising fail_with
    return_early: bool = False  # return after run_time without resolving anyone
    inputs: dict[tuple[str, int], Any] = field(default_factory=dict)  # (batch_id, index) -> input
    launches: list[Launch] = field(default_factory=list)
    cancelled_seen: list[Member[Value]] = field(default_factory=list)  # via wait_cancelled()

    async def launch(self, batch: Batch[Key, Value]) -> None:
        launched = batch.launched_members()
        self.launches.append(Launch(batch, anyio.current_time(), [m.index for m in launched]))
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(self._watch_cancellations, batch)
            await anyio.sleep(self.run_time)
            if self.return_early:
                task_group.cancel_scope.cancel()
                return
            if self.fail_with is not None:
                for member in batch.live_members()[: self.resolve_before_failing]:
                    member.resolve(self.result_for(member))
                raise self.fail_with
            for member in batch.live_members():
                member.resolve(self.result_for(member))

    def result_for(self, member: Member[Value]) -> Value:
        return ("result of", self.inputs[(member.batch_id, member.index)])

    async def _watch_cancellations(self, batch: Batch[Key, Value]) -> None:
        while cancelled := await batch.wait_cancelled():
            self.cancelled_seen.extend(cancelled)


@dataclass
class Electron:
    """What one electron's run() saw."""

    member: Member[Value] | None = None  # its place, once joined
    joined_at: float = math.nan  # anyio.current_time() of its join
    value: Value | None = None  # what wait() returned
    error: BaseException | None = None  # what its run() raised
    finished_at: float = math.nan  # when its run() returned or raised


async def run_electron(
    coalescer: Coalescer[Key, Value],
    cloud: FakeCloud,
    key: Key,
    policy: BatchPolicy,
    electron: Electron,
    *,
    join_at: float,
    payload: Any,
    queue_time: float = 0.0,
    upload_time: float = 0.0,
    upload_error: Exception | None = None,
) -> None:
    """Play an electron's run(): join at ``join_at``, wait ``queue_time`` for its turn to
    upload, upload, wait, record what happened."""
    await anyio.sleep_until(join_at)
    try:
        with coalescer.join(key, policy) as member:
            electron.member = member
            electron.joined_at = anyio.current_time()
            await anyio.sleep(queue_time)
            member.set_uploading()
            await anyio.sleep(upload_time)
            if upload_error is not None:
                raise upload_error
            cloud.inputs[(member.batch_id, member.index)] = payload
            member.set_ready()
            electron.value = await member.wait()
    except Exception as exc:
        electron.error = exc
    finally:
        electron.finished_at = anyio.current_time()


def launched_indices(electrons: list[Electron]) -> list[int]:
    """The task indices of electrons that joined."""
    return [e.member.index for e in electrons if e.member is not None]


def start_electrons(
    task_group: TaskGroup,
    coalescer: Coalescer[Key, Value],
    cloud: FakeCloud,
    policy: BatchPolicy,
    join_times: list[float],
    *,
    key: Key = "shape",
    **options: Any,
) -> list[Electron]:
    """Start one electron per join time, with payloads 0, 1, 2..."""
    electrons = [Electron() for _ in join_times]
    for payload, (electron, join_at) in enumerate(zip(electrons, join_times, strict=True)):
        task_group.start_soon(
            functools.partial(
                run_electron,
                coalescer,
                cloud,
                key,
                policy,
                electron,
                join_at=join_at,
                payload=payload,
                **options,
            )
        )
    return electrons


def batches_of(electrons: list[Electron]) -> list[Batch[Key, Value]]:
    """The distinct batches of these electrons, in the order they opened."""
    found: dict[int, Batch[Key, Value]] = {}
    for electron in electrons:
        assert electron.member is not None
        found.setdefault(id(electron.member.batch), electron.member.batch)
    return sorted(found.values(), key=lambda batch: batch.opened_at)


async def run_fleet(
    policy: BatchPolicy,
    offsets: list[float],
    cloud: FakeCloud | None = None,
    **options: Any,
) -> tuple[list[Electron], FakeCloud, float]:
    """Run electrons joining at ``t0 + offset`` to the end; return them, the cloud and t0."""
    cloud = cloud or FakeCloud()
    t0 = anyio.current_time()
    async with Coalescer(cloud.launch) as coalescer, anyio.create_task_group() as group:
        electrons = start_electrons(
            group, coalescer, cloud, policy, [t0 + o for o in offsets], **options
        )
    return electrons, cloud, t0


class TestBatchPolicy:
    @pytest.mark.parametrize(
        ("arguments", "field_name"),
        [
            ({"window": -1.0, "idle_gap": 0.0, "max_size": 10}, "window"),
            ({"window": math.nan, "idle_gap": 0.0, "max_size": 10}, "window"),
            ({"window": 1.0, "idle_gap": -0.5, "max_size": 10}, "idle_gap"),
            ({"window": 1.0, "idle_gap": 0.0, "max_size": 0}, "max_size"),
            ({"window": 1.0, "idle_gap": 0.0, "max_size": 2.5}, "max_size"),
            ({"window": 1.0, "idle_gap": 0.0, "max_size": True}, "max_size"),
        ],
    )
    def test_rejects_bad_values(self, arguments: dict[str, Any], field_name: str) -> None:
        with pytest.raises(ValueError, match=f"BatchPolicy.{field_name}"):
            BatchPolicy(**arguments)

    @pytest.mark.parametrize(
        ("window", "max_size", "expected"),
        [(0.0, 10, True), (5.0, 1, True), (5.0, 10, False), (math.inf, 10, False)],
    )
    def test_flushes_at_once_only_for_baselines(
        self, window: float, max_size: int, expected: bool
    ) -> None:
        assert BatchPolicy(window=window, idle_gap=0, max_size=max_size).flushes_at_once is expected


class TestFlushTriggers:
    @pytest.mark.anyio
    @fails_if_stuck
    async def test_window_flushes_exactly_when_it_elapses(self) -> None:
        policy = BatchPolicy(window=5.0, idle_gap=0.0, max_size=100)
        electrons, cloud, t0 = await run_fleet(policy, [0.0, 1.0, 4.5, 6.0])
        first, second = batches_of(electrons)
        assert [len(first.members), len(second.members)] == [3, 1]
        assert (first.flush_reason, first.flushed_at) == (FlushReason.WINDOW, t0 + 5.0)
        assert (second.flush_reason, second.flushed_at) == (FlushReason.WINDOW, t0 + 11.0)
        assert [launch.at for launch in cloud.launches] == [t0 + 5.0, t0 + 11.0]
        assert [e.value for e in electrons] == [("result of", p) for p in range(4)]

    @pytest.mark.anyio
    @fails_if_stuck
    async def test_full_batch_flushes_at_the_join_that_fills_it(self) -> None:
        policy = BatchPolicy(window=10.0, idle_gap=0.0, max_size=3)
        electrons, cloud, t0 = await run_fleet(policy, [0.0, 0.5, 1.0, 1.0, 2.0])
        first, second = batches_of(electrons)
        assert (first.flush_reason, first.flushed_at) == (FlushReason.FULL, t0 + 1.0)
        assert cloud.launches[0].at == t0 + 1.0
        assert [m.index for m in second.members] == [0, 1]
        assert (second.flush_reason, second.flushed_at) == (FlushReason.WINDOW, t0 + 11.0)

    @pytest.mark.anyio
    @fails_if_stuck
    async def test_idle_gap_flushes_when_joins_pause(self) -> None:
        policy = BatchPolicy(window=10.0, idle_gap=1.0, max_size=100)
        electrons, _, t0 = await run_fleet(policy, [0.0, 0.5, 4.0])
        first, second = batches_of(electrons)
        assert len(first.members) == 2
        assert (first.flush_reason, first.flushed_at) == (FlushReason.IDLE, t0 + 1.5)
        assert (second.flush_reason, second.flushed_at) == (FlushReason.IDLE, t0 + 5.0)

    @pytest.mark.anyio
    @fails_if_stuck
    async def test_each_join_rearms_the_idle_gap(self) -> None:
        policy = BatchPolicy(window=10.0, idle_gap=1.0, max_size=100)
        electrons, _, t0 = await run_fleet(policy, [0.0, 0.75, 1.5, 2.25, 3.0])
        (batch,) = batches_of(electrons)
        assert len(batch.members) == 5
        assert (batch.flush_reason, batch.flushed_at) == (FlushReason.IDLE, t0 + 4.0)

    @pytest.mark.anyio
    @fails_if_stuck
    async def test_window_caps_a_steady_trickle(self) -> None:
        policy = BatchPolicy(window=2.0, idle_gap=1.0, max_size=100)
        electrons, _, t0 = await run_fleet(policy, [0.0, 0.5, 1.0, 1.5, 2.25, 2.75])
        first, second = batches_of(electrons)
        assert len(first.members) == 4
        assert (first.flush_reason, first.flushed_at) == (FlushReason.WINDOW, t0 + 2.0)
        assert (second.flush_reason, second.flushed_at) == (FlushReason.IDLE, t0 + 3.75)

    @pytest.mark.anyio
    @fails_if_stuck
    async def test_zero_idle_gap_waits_for_the_window(self) -> None:
        policy = BatchPolicy(window=3.0, idle_gap=0.0, max_size=100)
        electrons, _, t0 = await run_fleet(policy, [0.0, 0.125])
        (batch,) = batches_of(electrons)
        assert (batch.flush_reason, batch.flushed_at) == (FlushReason.WINDOW, t0 + 3.0)

    @pytest.mark.anyio
    @fails_if_stuck
    async def test_infinite_window_flushes_when_full(self) -> None:
        policy = BatchPolicy(window=math.inf, idle_gap=0.0, max_size=2)
        electrons, _, t0 = await run_fleet(policy, [0.0, 7.0])
        (batch,) = batches_of(electrons)
        assert (batch.flush_reason, batch.flushed_at) == (FlushReason.FULL, t0 + 7.0)


class TestGrouping:
    @pytest.mark.anyio
    @fails_if_stuck
    async def test_indices_follow_join_order(self) -> None:
        policy = BatchPolicy(window=5.0, idle_gap=0.0, max_size=100)
        electrons, cloud, _ = await run_fleet(policy, [3.0, 0.0, 2.0, 1.0])
        assert [e.member.index for e in electrons if e.member] == [3, 0, 2, 1]
        assert cloud.launches[0].indices == [0, 1, 2, 3]
        # Each electron gets the result computed from its own input.
        assert [e.value for e in electrons] == [("result of", p) for p in range(4)]

    @pytest.mark.anyio
    @fails_if_stuck
    async def test_keys_and_policies_make_separate_batches(self) -> None:
        cloud = FakeCloud()
        made: list[str] = []

        def new_batch_id(key: Key) -> str:
            made.append(f"job-{key}-{len(made)}")
            return made[-1]

        short = BatchPolicy(window=1.0, idle_gap=0.0, max_size=100)
        long = BatchPolicy(window=2.0, idle_gap=0.0, max_size=100)
        plan = [("a", short), ("b", short), ("a", long), ("a", short), ("b", short)]
        async with Coalescer(cloud.launch, new_batch_id=new_batch_id) as coalescer:
            members = [coalescer.join(key, policy) for key, policy in plan]
            for member in members:
                cloud.inputs[(member.batch_id, member.index)] = member.batch.key
                member.set_ready()
        assert made == ["job-a-0", "job-b-1", "job-a-2"]
        assert [(m.batch_id, m.index) for m in members] == [
            ("job-a-0", 0),
            ("job-b-1", 0),
            ("job-a-2", 0),
            ("job-a-0", 1),
            ("job-b-1", 1),
        ]
        assert sorted(launch.batch.batch_id for launch in cloud.launches) == sorted(made)

    @pytest.mark.anyio
    @fails_if_stuck
    async def test_duplicate_batch_id_is_refused(self) -> None:
        cloud = FakeCloud()
        policy = BatchPolicy(window=1.0, idle_gap=0.0, max_size=100)
        async with Coalescer(cloud.launch, new_batch_id=lambda key: "same") as coalescer:
            member = coalescer.join("a", policy)
            with pytest.raises(ValueError, match="'same', the id of an unfinished batch"):
                coalescer.join("b", policy)
            member.cancel()
        assert coalescer.statistics().open_batches == 0

    @pytest.mark.anyio
    @fails_if_stuck
    async def test_member_lookup_by_batch_id_and_index(self) -> None:
        cloud = FakeCloud()
        policy = BatchPolicy(window=1.0, idle_gap=0.0, max_size=100)
        async with Coalescer(cloud.launch) as coalescer:
            first, second = coalescer.join("a", policy), coalescer.join("a", policy)
            assert coalescer.member(first.batch_id, 1) is second
            assert coalescer.member(first.batch_id, 2) is None
            assert coalescer.member("no-such-batch", 0) is None
            first.cancel()
            second.cancel()
        assert coalescer.member(first.batch_id, 0) is None  # finished batches are forgotten


class TestReadiness:
    @pytest.mark.anyio
    @fails_if_stuck
    async def test_launch_waits_for_every_upload(self) -> None:
        policy = BatchPolicy(window=1.0, idle_gap=0.0, max_size=100)
        cloud = FakeCloud()
        t0 = anyio.current_time()
        async with Coalescer(cloud.launch) as coalescer, anyio.create_task_group() as group:
            fast = start_electrons(group, coalescer, cloud, policy, [t0, t0])
            slow = start_electrons(group, coalescer, cloud, policy, [t0], upload_time=5.0)
        (batch,) = batches_of(fast + slow)
        assert batch.flushed_at == t0 + 1.0
        assert cloud.launches[0].at == t0 + 5.0
        assert all(e.value is not None for e in fast + slow)

    @pytest.mark.anyio
    @fails_if_stuck
    async def test_settle_timeout_counts_from_each_uploads_start(self) -> None:
        policy = BatchPolicy(window=1.0, idle_gap=0.0, max_size=100, settle_timeout=2.0)
        cloud = FakeCloud()
        t0 = anyio.current_time()
        async with Coalescer(cloud.launch) as coalescer, anyio.create_task_group() as group:
            fast = start_electrons(group, coalescer, cloud, policy, [t0])
            stuck_early = start_electrons(group, coalescer, cloud, policy, [t0], upload_time=100.0)
            queued = start_electrons(
                group, coalescer, cloud, policy, [t0], queue_time=10.0, upload_time=1.5
            )
            stuck_late = start_electrons(
                group, coalescer, cloud, policy, [t0], queue_time=20.0, upload_time=100.0
            )
        # Started before the flush (t0 + 1): let go 2 s after it. Queued until t0 + 10, then
        # 1.5 s: kept. Started at t0 + 20: let go at t0 + 22, and the job launches then.
        assert cloud.launches[0].at == t0 + 22.0
        assert cloud.launches[0].indices == sorted(launched_indices(fast + queued))
        assert all(e.value is not None for e in fast + queued)
        for stuck in (stuck_early, stuck_late):
            assert isinstance(stuck[0].error, StorageError)
            assert "within 2 s of the start of its upload" in str(stuck[0].error)

    @pytest.mark.anyio
    @fails_if_stuck
    async def test_withdrawn_member_is_skipped_and_keeps_its_error(self) -> None:
        policy = BatchPolicy(window=1.0, idle_gap=0.0, max_size=100)
        cloud = FakeCloud()
        broken = OSError("bucket refused the upload")
        t0 = anyio.current_time()
        async with Coalescer(cloud.launch) as coalescer, anyio.create_task_group() as group:
            before = start_electrons(group, coalescer, cloud, policy, [t0])
            failing = start_electrons(
                group,
                coalescer,
                cloud,
                policy,
                [t0 + 0.125],
                upload_time=0.5,
                upload_error=broken,
            )
            after = start_electrons(group, coalescer, cloud, policy, [t0 + 0.25])
        assert cloud.launches[0].indices == [0, 2]
        assert failing[0].error is broken
        assert failing[0].member is not None
        assert failing[0].member.state is MemberState.WITHDRAWN
        with pytest.raises(OSError, match="bucket refused"):
            await failing[0].member.wait()
        assert before[0].value == ("result of", 0)
        assert after[0].value == ("result of", 0)

    @pytest.mark.anyio
    @fails_if_stuck
    async def test_member_cancelled_during_upload_is_skipped(self) -> None:
        policy = BatchPolicy(window=1.0, idle_gap=0.0, max_size=100)
        cloud = FakeCloud()
        async with Coalescer(cloud.launch) as coalescer, anyio.create_task_group() as group:
            mates = start_electrons(group, coalescer, cloud, policy, [0.0, 0.0])
            await anyio.sleep(0.25)
            with anyio.move_on_after(0.5):  # the electron's run() is cancelled mid-upload
                with coalescer.join("shape", policy) as cancelled:
                    await anyio.sleep(3.0)
        assert cancelled.state is MemberState.CANCELLED
        assert cloud.launches[0].indices == [0, 1]
        assert cloud.launches[0].at == cloud.launches[0].batch.opened_at + 1.0
        with pytest.raises(ElectronCancelledError, match=f"task 2 of batch {cancelled.batch_id}"):
            await cancelled.wait()
        assert [e.value for e in mates] == [("result of", 0), ("result of", 1)]

    @pytest.mark.anyio
    @fails_if_stuck
    async def test_batch_whose_members_all_withdrew_is_never_launched(self) -> None:
        policy = BatchPolicy(window=1.0, idle_gap=0.0, max_size=100)
        electrons, cloud, _ = await run_fleet(
            policy, [0.0, 0.25], upload_error=OSError("no bucket")
        )
        (batch,) = batches_of(electrons)
        assert cloud.launches == []
        assert batch.phase is BatchPhase.DONE
        assert [m.state for m in batch.members] == [MemberState.WITHDRAWN] * 2

    @pytest.mark.anyio
    @fails_if_stuck
    async def test_leaving_without_set_ready_withdraws(self) -> None:
        cloud = FakeCloud()
        policy = BatchPolicy(window=1.0, idle_gap=0.0, max_size=100)
        async with Coalescer(cloud.launch) as coalescer:
            with coalescer.join("shape", policy) as member:
                pass
        assert member.state is MemberState.WITHDRAWN
        with pytest.raises(RuntimeError, match="without calling set_ready"):
            await member.wait()
        assert cloud.launches == []


class TestCancellation:
    @pytest.mark.anyio
    @fails_if_stuck
    async def test_cancelling_one_wait_leaves_its_batch_mates_resolved(self) -> None:
        policy = BatchPolicy(window=1.0, idle_gap=0.0, max_size=100)
        cloud = FakeCloud(run_time=4.0)
        t0 = anyio.current_time()
        async with Coalescer(cloud.launch) as coalescer, anyio.create_task_group() as group:
            mates = start_electrons(group, coalescer, cloud, policy, [t0, t0])
            member = coalescer.join("shape", policy)
            cloud.inputs[(member.batch_id, member.index)] = 2
            member.set_ready()
            with anyio.move_on_after(2.0) as scope:
                await member.wait()
            assert scope.cancelled_caught
            assert member.state is MemberState.LAUNCHED  # a cancelled wait changes nothing
        assert [e.value for e in mates] == [("result of", 0), ("result of", 1)]
        assert [e.finished_at for e in mates] == [t0 + 5.0, t0 + 5.0]
        assert await member.wait() == ("result of", 2)

    @pytest.mark.anyio
    @fails_if_stuck
    async def test_cancelled_run_cancels_its_member_and_only_it(self) -> None:
        policy = BatchPolicy(window=1.0, idle_gap=0.0, max_size=100)
        cloud = FakeCloud(run_time=4.0)
        async with Coalescer(cloud.launch) as coalescer, anyio.create_task_group() as group:
            mates = start_electrons(group, coalescer, cloud, policy, [0.0, 0.0])
            with anyio.move_on_after(2.0):  # cancels the whole run(), after launch
                with coalescer.join("shape", policy) as cancelled:
                    cloud.inputs[(cancelled.batch_id, cancelled.index)] = 2
                    cancelled.set_ready()
                    await cancelled.wait()
        assert cancelled.state is MemberState.CANCELLED
        assert cloud.cancelled_seen == [cancelled]
        assert cloud.launches[0].indices == [0, 1, 2]
        assert [e.value for e in mates] == [("result of", 0), ("result of", 1)]
        with pytest.raises(ElectronCancelledError):
            await cancelled.wait()

    @pytest.mark.anyio
    @fails_if_stuck
    async def test_cancel_after_launch_reaches_the_launch_code(self) -> None:
        policy = BatchPolicy(window=1.0, idle_gap=0.0, max_size=100)
        cloud = FakeCloud(run_time=4.0)
        async with Coalescer(cloud.launch) as coalescer, anyio.create_task_group() as group:
            mates = start_electrons(group, coalescer, cloud, policy, [0.0, 0.0, 0.0])
            await anyio.sleep(2.0)
            target = mates[1].member
            assert target is not None
            assert target.state is MemberState.LAUNCHED
            assert target.cancel() is True
            assert target.cancel() is False  # first outcome wins
            await anyio.sleep(0.5)
            assert cloud.cancelled_seen == [target]
        assert isinstance(mates[1].error, ElectronCancelledError)
        assert (mates[0].value, mates[2].value) == (("result of", 0), ("result of", 2))
        assert target is not None  # for mypy: `async with` may swallow exceptions
        assert target.state is MemberState.CANCELLED  # the later resolve() was a no-op


class TestLaunchFailures:
    @pytest.mark.anyio
    @fails_if_stuck
    async def test_launch_raising_fails_every_member_and_the_coalescer_carries_on(self) -> None:
        policy = BatchPolicy(window=1.0, idle_gap=0.0, max_size=100)
        cloud = FakeCloud(fail_with=RuntimeError("quota exceeded"))
        t0 = anyio.current_time()
        async with Coalescer(cloud.launch) as coalescer, anyio.create_task_group() as group:
            failed = start_electrons(group, coalescer, cloud, policy, [t0, t0, t0])
            await anyio.sleep(3.0)
            cloud.fail_with = None
            later = start_electrons(group, coalescer, cloud, policy, [t0 + 3.0])
        errors = [e.error for e in failed]
        assert all(isinstance(error, BatchLaunchError) for error in errors)
        assert len({id(error) for error in errors}) == 3  # each electron its own exception
        assert all(error and isinstance(error.__cause__, RuntimeError) for error in errors)
        for electron in failed:
            assert electron.member is not None
            message = str(electron.error)
            assert f"launching batch {electron.member.batch_id} (3 tasks) failed" in message
            assert f"task {electron.member.index} has no result: RuntimeError: quota" in message
        assert later[0].value == ("result of", 0)

    @pytest.mark.anyio
    @fails_if_stuck
    async def test_members_resolved_before_the_launch_raised_keep_their_results(self) -> None:
        policy = BatchPolicy(window=1.0, idle_gap=0.0, max_size=100)
        cloud = FakeCloud(fail_with=ConnectionError("monitor lost"), resolve_before_failing=1)
        electrons, _, _ = await run_fleet(policy, [0.0, 0.125], cloud)
        assert electrons[0].value == ("result of", 0)
        assert isinstance(electrons[1].error, BatchLaunchError)

    @pytest.mark.anyio
    @fails_if_stuck
    async def test_launch_returning_early_fails_the_members_left(self) -> None:
        policy = BatchPolicy(window=1.0, idle_gap=0.0, max_size=100)
        electrons, _, _ = await run_fleet(policy, [0.0, 0.0], FakeCloud(return_early=True))
        for electron in electrons:
            assert isinstance(electron.error, BatchLaunchError)
            assert "returned without an outcome" in str(electron.error)


class TestBaselines:
    @pytest.mark.anyio
    @pytest.mark.parametrize(
        ("policy", "reason"),
        [
            (BatchPolicy(window=0.0, idle_gap=1.0, max_size=100), FlushReason.WINDOW),
            (BatchPolicy(window=10.0, idle_gap=1.0, max_size=1), FlushReason.FULL),
        ],
    )
    @fails_if_stuck
    async def test_one_batch_per_member_flushed_at_once(
        self, policy: BatchPolicy, reason: FlushReason
    ) -> None:
        electrons, cloud, t0 = await run_fleet(policy, [0.0, 0.0, 0.0, 0.5])
        batches = batches_of(electrons)
        assert [len(batch.members) for batch in batches] == [1, 1, 1, 1]
        assert [batch.flush_reason for batch in batches] == [reason] * 4
        assert [batch.flushed_at for batch in batches] == [t0, t0, t0, t0 + 0.5]
        assert sorted(launch.at for launch in cloud.launches) == [t0, t0, t0, t0 + 0.5]
        assert [e.value for e in electrons] == [("result of", p) for p in range(4)]


class TestShutdown:
    @pytest.mark.anyio
    @fails_if_stuck
    async def test_calm_exit_flushes_open_batches_and_launches_them(self) -> None:
        policy = BatchPolicy(window=100.0, idle_gap=0.0, max_size=100)
        cloud = FakeCloud()
        t0 = anyio.current_time()
        async with anyio.create_task_group() as group:
            async with Coalescer(cloud.launch) as coalescer:
                electrons = start_electrons(group, coalescer, cloud, policy, [t0, t0 + 1])
                await anyio.sleep(2.0)
            assert coalescer.statistics().finished_batches == 1  # exit waited for it
        (batch,) = batches_of(electrons)
        assert (batch.flush_reason, batch.flushed_at) == (FlushReason.CLOSING, t0 + 2.0)
        assert [e.value for e in electrons] == [("result of", 0), ("result of", 1)]

    @pytest.mark.anyio
    @fails_if_stuck
    async def test_torn_down_coalescer_fails_every_waiting_member(self) -> None:
        cloud = FakeCloud(run_time=50.0)
        t0 = anyio.current_time()
        running = BatchPolicy(window=1.0, idle_gap=0.0, max_size=100)
        still_open = BatchPolicy(window=100.0, idle_gap=0.0, max_size=100)
        async with anyio.create_task_group() as group:
            with anyio.move_on_after(5.0):  # the server shuts down: the coalescer is cancelled
                async with Coalescer(cloud.launch) as coalescer:
                    launched = start_electrons(group, coalescer, cloud, running, [0.0])
                    waiting = start_electrons(group, coalescer, cloud, still_open, [0.0])
                    uploading = start_electrons(
                        group, coalescer, cloud, still_open, [0.0], upload_time=80.0
                    )
                    await anyio.sleep_forever()
        for electron in launched + waiting + uploading:
            assert isinstance(electron.error, CoalescerClosedError)
            assert "executor shut down" in str(electron.error)
        assert [e.finished_at for e in launched + waiting] == [t0 + 5.0, t0 + 5.0]
        stats = coalescer.statistics()
        assert (stats.finished_batches, stats.members_done) == (2, 3)

    @pytest.mark.anyio
    @fails_if_stuck
    async def test_join_outside_the_async_with_is_refused(self) -> None:
        cloud = FakeCloud()
        policy = BatchPolicy(window=1.0, idle_gap=0.0, max_size=100)
        coalescer: Coalescer[Key, Value] = Coalescer(cloud.launch)
        with pytest.raises(RuntimeError, match="async with"):
            coalescer.join("shape", policy)
        async with coalescer:
            pass
        with pytest.raises(CoalescerClosedError, match="closing"):
            coalescer.join("shape", policy)
        with pytest.raises(RuntimeError, match="only once"):
            await coalescer.__aenter__()


class TestStatistics:
    @pytest.mark.anyio
    @fails_if_stuck
    async def test_counts_follow_batches_and_members(self) -> None:
        policy = BatchPolicy(window=1.0, idle_gap=0.0, max_size=100)
        cloud = FakeCloud(run_time=2.0)
        async with Coalescer(cloud.launch) as coalescer:
            assert coalescer.statistics() == CoalescerStatistics(0, 0, 0, 0, 0, 0, 0, 0)
            first, second, third = (coalescer.join("shape", policy) for _ in range(3))
            for member in (first, second, third):
                cloud.inputs[(member.batch_id, member.index)] = member.index
            first.set_ready()
            third.withdraw(OSError("upload failed"))
            assert coalescer.statistics() == CoalescerStatistics(1, 0, 0, 0, 1, 1, 0, 1)
            await anyio.sleep(1.5)  # flushed, waiting for the second upload
            assert coalescer.statistics() == CoalescerStatistics(0, 1, 0, 0, 1, 1, 0, 1)
            second.set_ready()
            await anyio.sleep(0.5)  # launched
            assert coalescer.statistics() == CoalescerStatistics(0, 0, 1, 0, 0, 0, 2, 1)
        assert coalescer.statistics() == CoalescerStatistics(0, 0, 0, 1, 0, 0, 0, 3)


class TestMemberApi:
    @pytest.mark.anyio
    @fails_if_stuck
    async def test_outcomes_are_for_launched_members_and_the_first_one_wins(self) -> None:
        policy = BatchPolicy(window=1.0, idle_gap=0.0, max_size=100)
        seen: list[Member[Value]] = []

        async def launch(batch: Batch[Key, Value]) -> None:
            (member,) = batch.live_members()
            with pytest.raises(RuntimeError, match="use cancel"):
                member.withdraw(OSError("too late"))
            with pytest.raises(TypeError, match="takes an exception"):
                member.fail("not an exception")  # type: ignore[arg-type]
            member.resolve(("first", 1))
            member.fail(ValueError("second"))
            member.resolve(("third", 3))
            assert member.cancel() is False
            seen.append(member)

        async with Coalescer(launch) as coalescer:
            member = coalescer.join("shape", policy)
            with pytest.raises(RuntimeError, match="only launched members get outcomes"):
                member.resolve(("early", 0))
            member.set_ready()
            assert await member.wait() == ("first", 1)
            assert await member.wait() == ("first", 1)
        assert seen == [member]
        assert member.state is MemberState.RESOLVED
        assert repr(member) == f"<Member {member.batch_id}[0] resolved>"

    @pytest.mark.anyio
    @fails_if_stuck
    async def test_the_launch_code_finds_its_payload_on_the_batch(self) -> None:
        policy = BatchPolicy(window=1.0, idle_gap=0.0, max_size=100)
        payloads: list[object] = []

        async def launch(batch: Batch[Key, Value]) -> None:
            payloads.append(batch.payload)
            for member in batch.live_members():
                member.resolve(("done", member.index))

        async with Coalescer(launch) as coalescer:
            first, second = coalescer.join("shape", policy), coalescer.join("shape", policy)
            assert first.batch is second.batch and first.batch.payload is None
            first.batch.payload = {"key": b"k"}
            first.set_ready()
            second.set_ready()
            assert await second.wait() == ("done", 1)
        assert payloads == [{"key": b"k"}]

    @pytest.mark.anyio
    @fails_if_stuck
    async def test_fail_live_gives_each_live_member_an_error_of_its_own(self) -> None:
        policy = BatchPolicy(window=1.0, idle_gap=0.0, max_size=100)
        cause = OSError("quota")
        error = GCPBatchArrayError("creating the job failed")
        error.__cause__ = cause

        async def launch(batch: Batch[Key, Value]) -> None:
            batch.live_members()[0].resolve(("done", 0))
            batch.fail_live(error)

        async with Coalescer(launch) as coalescer:
            members = [coalescer.join("shape", policy) for _ in range(3)]
            for member in members:
                member.set_ready()
            assert await members[0].wait() == ("done", 0)
            raised = []
            for member in members[1:]:
                with pytest.raises(GCPBatchArrayError, match="creating the job failed") as info:
                    await member.wait()
                raised.append(info.value)
        first, second = raised
        assert first is not second and error not in raised
        assert first.__cause__ is second.__cause__ is cause

    def test_fresh_copy_keeps_type_arguments_attributes_and_cause(self) -> None:
        error = TaskInfrastructureError("lost VM", exit_code=50001, events=("preempted",))
        error.__cause__ = OSError("x")
        try:
            raise error
        except TaskInfrastructureError:
            pass
        copied = fresh_copy(error)
        assert type(copied) is TaskInfrastructureError and copied is not error
        assert (str(copied), copied.exit_code, copied.events) == (
            str(error),
            50001,
            ("preempted",),
        )
        assert copied.__cause__ is error.__cause__
        assert copied.__traceback__ is None and error.__traceback__ is not None

    @pytest.mark.anyio
    @fails_if_stuck
    async def test_errors_belong_to_the_package_hierarchy(self) -> None:
        for error_type in (ElectronCancelledError, BatchLaunchError, CoalescerClosedError):
            assert issubclass(error_type, GCPBatchArrayError)


class TestScale:
    @pytest.mark.anyio
    @fails_if_stuck
    async def test_ten_thousand_joins_use_one_task_per_batch(self) -> None:
        policy = BatchPolicy(window=1.0, idle_gap=0.25, max_size=1000)
        cloud = FakeCloud()
        async with Coalescer(cloud.launch) as coalescer:
            tasks_before = len(anyio.get_running_tasks())
            members = [coalescer.join(f"shape-{i % 3}", policy) for i in range(10_000)]
            batch_count = len({member.batch_id for member in members})
            assert batch_count == 12  # ceil(3334 / 1000) + 2 * ceil(3333 / 1000)
            assert len(anyio.get_running_tasks()) - tasks_before == batch_count
            for number, member in enumerate(members):
                cloud.inputs[(member.batch_id, member.index)] = number
                member.set_ready()
            outcomes = [await member.wait() for member in members]
        assert outcomes == [("result of", number) for number in range(10_000)]
        assert (
            sorted(len(launch.indices) for launch in cloud.launches) == [333, 333, 334] + [1000] * 9
        )


class TestOnAsyncio:
    """The same scheduler on asyncio, the loop the Covalent server runs (real time, tiny)."""

    @pytest.fixture
    def anyio_backend(self) -> str:
        return "asyncio"

    @pytest.mark.anyio
    async def test_idle_flush_and_cancellation_on_asyncio(self) -> None:
        policy = BatchPolicy(window=30.0, idle_gap=0.02, max_size=100)
        cloud = FakeCloud(run_time=0.05)
        with anyio.fail_after(30):
            async with Coalescer(cloud.launch) as coalescer, anyio.create_task_group() as group:
                now = anyio.current_time()
                mates = start_electrons(group, coalescer, cloud, policy, [now] * 3)
                with anyio.move_on_after(0.03):
                    with coalescer.join("shape", policy) as cancelled:
                        cancelled.set_ready()
                        await cancelled.wait()
        (batch,) = batches_of(mates)
        assert batch.flush_reason is FlushReason.IDLE
        assert batch.flushed_at is not None
        assert batch.flushed_at >= max(e.joined_at for e in mates) + policy.idle_gap
        assert cancelled.state is MemberState.CANCELLED
        assert [e.value for e in mates] == [("result of", p) for p in range(3)]

    @pytest.mark.anyio
    async def test_a_cancelled_wait_leaves_the_member_and_its_other_waiters(self) -> None:
        policy = BatchPolicy(window=30.0, idle_gap=30.0, max_size=100)
        outcome: list[BaseException] = []

        async def wait_for(member: Member[Value], scope: anyio.CancelScope) -> None:
            with scope:
                try:
                    await member.wait()
                except OSError as exc:
                    outcome.append(exc)

        with anyio.fail_after(30):
            async with Coalescer(FakeCloud().launch) as coalescer:
                member = coalescer.join("shape", policy)
                async with anyio.create_task_group() as group:
                    first, second = anyio.CancelScope(), anyio.CancelScope()
                    group.start_soon(wait_for, member, first)
                    await anyio.wait_all_tasks_blocked()
                    first.cancel()  # as run() stops waiting once its upload is done
                    group.start_soon(wait_for, member, second)
                    await anyio.wait_all_tasks_blocked()
                    with anyio.move_on_after(0.01):
                        await member.wait()  # a wait cancelled while another one waits
                    member.withdraw(OSError("upload failed"))
        assert [str(exc) for exc in outcome] == ["upload failed"]

    @pytest.mark.anyio
    async def test_a_waiting_member_costs_little_more_than_a_bare_future(self) -> None:
        # Thousands of electrons wait at once; an anyio.Event each cost ~1.3 KB more.
        count = 300
        policy = BatchPolicy(window=30.0, idle_gap=30.0, max_size=count)
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in range(count)]
        async with Coalescer(FakeCloud().launch) as coalescer:
            members = [coalescer.join("shape", policy) for _ in range(count)]
            on_members = await traced_per_task([member.wait for member in members])
            on_futures = await traced_per_task([functools.partial(wait, f) for f in futures])
            for member in members:
                member.withdraw(OSError("done"))
        assert on_members - on_futures < 600


async def wait(future: asyncio.Future[None]) -> None:
    await future


async def traced_per_task(waits: list[Callable[[], Awaitable[Any]]]) -> float:
    """Bytes allocated per task while each of ``waits`` waits in a task of its own."""
    gc.collect()
    async with anyio.create_task_group() as group:
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for waiting in waits:
                group.start_soon(waiting)
            await anyio.wait_all_tasks_blocked()
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        group.cancel_scope.cancel()
    return grown / len(waits)


# -- property test: random arrivals, sizes and policies, all on the mock clock --

EIGHTHS = st.integers(min_value=0, max_value=16).map(lambda n: n / 8)
FATES = st.sampled_from(["ok", "ok", "ok", "withdraw", "cancel"])
ARRIVALS = st.lists(st.tuples(EIGHTHS, st.sampled_from(["a", "b"]), EIGHTHS, FATES), max_size=25)
POLICIES = st.builds(
    BatchPolicy,
    window=st.integers(min_value=0, max_value=24).map(lambda n: n / 8),
    idle_gap=st.integers(min_value=0, max_value=8).map(lambda n: n / 8),
    max_size=st.integers(min_value=1, max_value=5),
)


@dataclass
class Arrival:
    """One electron of a generated scenario and what happened to it."""

    key: Key  # its job shape
    join_at: float  # when it joins
    upload_time: float  # how long its upload takes
    fate: str  # "ok", "withdraw" (upload fails) or "cancel" (cancelled before ready)
    member: Member[Value] | None = None
    outcome: Value | BaseException | None = None


async def play(arrivals: list[Arrival], policies: dict[Key, BatchPolicy]) -> FakeCloud:
    cloud = FakeCloud(run_time=1.0)

    async def electron(number: int, arrival: Arrival) -> None:
        await anyio.sleep_until(arrival.join_at)
        try:
            with coalescer.join(arrival.key, policies[arrival.key]) as member:
                arrival.member = member
                await anyio.sleep(arrival.upload_time)
                if arrival.fate == "withdraw":
                    raise OSError(f"upload {number} failed")
                if arrival.fate == "cancel":
                    member.cancel()
                    await member.wait()
                cloud.inputs[(member.batch_id, member.index)] = number
                member.set_ready()
                arrival.outcome = await member.wait()
        except Exception as exc:
            arrival.outcome = exc

    with anyio.fail_after(HANG):
        async with Coalescer(cloud.launch) as coalescer, anyio.create_task_group() as group:
            for number, arrival in enumerate(arrivals):
                group.start_soon(electron, number, arrival)
    stats = coalescer.statistics()
    assert stats.members_done == len(arrivals)
    assert stats.finished_batches == len({id(a.member.batch) for a in arrivals if a.member})
    return cloud


def joined(arrivals: list[Arrival]) -> Iterator[tuple[int, Arrival, Member[Value]]]:
    for number, arrival in enumerate(arrivals):
        assert arrival.member is not None
        yield number, arrival, arrival.member


@settings(max_examples=200, deadline=None)
@given(ARRIVALS, POLICIES, POLICIES)
def test_random_scenarios_keep_every_promise(
    raw: list[tuple[float, Key, float, str]], policy_a: BatchPolicy, policy_b: BatchPolicy
) -> None:
    policies = {"a": policy_a, "b": policy_b}
    arrivals, clock = [], 0.0
    for gap, key, upload_time, fate in raw:
        clock += gap
        arrivals.append(Arrival(key, clock, upload_time, fate))
    backend, options = mock_clock_backend()
    cloud = anyio.run(play, arrivals, policies, backend=backend, backend_options=options)
    by_member = {id(member): arrival for _, arrival, member in joined(arrivals)}
    batches = {id(member.batch): member.batch for _, _, member in joined(arrivals)}
    launched = {id(launch.batch): launch for launch in cloud.launches}
    # Every member is in exactly one batch, at its index, and batch ids are unique.
    assert sum(len(batch.members) for batch in batches.values()) == len(arrivals)
    assert len({batch.batch_id for batch in batches.values()}) == len(batches)
    for batch in batches.values():
        policy = policies[batch.key]
        members = batch.members
        join_times = [by_member[id(member)].join_at for member in members]
        assert [member.index for member in members] == list(range(len(members)))
        assert all(by_member[id(member)].key == batch.key for member in members)
        assert join_times == sorted(join_times)  # indices in join order
        assert len(members) <= policy.max_size
        assert batch.opened_at == join_times[0]
        assert batch.flushed_at is not None
        assert batch.flushed_at <= batch.opened_at + policy.window
        expected_flush = {
            FlushReason.WINDOW: batch.opened_at + policy.window,
            FlushReason.IDLE: join_times[-1] + policy.idle_gap,
            FlushReason.FULL: join_times[-1],
        }
        if batch.flush_reason in expected_flush:
            assert batch.flushed_at == expected_flush[batch.flush_reason]
        if batch.flush_reason is FlushReason.FULL:
            assert len(members) == policy.max_size
        ok = [m.index for m in members if by_member[id(m)].fate == "ok"]
        # Launched once, with exactly its ready members; never when all of them gave up.
        if ok:
            assert launched[id(batch)].indices == ok
        else:
            assert id(batch) not in launched
    assert len(cloud.launches) == len(launched)
    for number, arrival, _ in joined(arrivals):
        if arrival.fate == "ok":
            assert arrival.outcome == ("result of", number)
        elif arrival.fate == "withdraw":
            assert isinstance(arrival.outcome, OSError)
            assert str(arrival.outcome) == f"upload {number} failed"
        else:
            assert isinstance(arrival.outcome, ElectronCancelledError)
