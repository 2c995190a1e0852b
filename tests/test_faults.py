"""Fault injection and the job-creation quota of the Batch emulator (no server needed)."""

from __future__ import annotations

import pytest

from covalent_gcpbatch_array.local.api_errors import ApiError
from covalent_gcpbatch_array.local.batch.faults import (
    CallFaults,
    CreationQuota,
    TaskFault,
    TaskFaults,
)


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TestCallFaults:
    def test_the_next_calls_of_that_method_fail_then_calls_pass(self) -> None:
        faults = CallFaults()
        faults.add("CreateJob", 503, 2)
        faults.add("GetJob", 429, 1)

        first = faults.take("CreateJob")
        assert first is not None and (first.code, first.status) == (503, "UNAVAILABLE")
        assert faults.pending() == {"CreateJob": 1, "GetJob": 1}
        assert faults.take("ListTasks") is None
        assert faults.take("CreateJob") is not None
        assert faults.take("CreateJob") is None
        error = faults.take("GetJob")
        assert error is not None and error.to_json()["error"]["status"] == "RESOURCE_EXHAUSTED"
        assert faults.pending() == {}

    def test_statuses_queue_in_order(self) -> None:
        faults = CallFaults()
        faults.add("ListTasks", 500, 1)
        faults.add("ListTasks", 403, 1)

        codes = [
            error.code for error in (faults.take("ListTasks"), faults.take("ListTasks")) if error
        ]
        assert codes == [500, 403]

    @pytest.mark.parametrize(
        ("method", "status", "count", "message"),
        [
            ("MakeCoffee", 503, 1, "unknown method"),
            ("GetJob", 418, 1, "no Google status"),
            ("GetJob", 503, -1, "count"),
        ],
    )
    def test_bad_plans_are_refused(
        self, method: str, status: int, count: int, message: str
    ) -> None:
        with pytest.raises(ValueError, match=message):
            CallFaults().add(method, status, count)


class TestTaskFaults:
    def test_a_fault_for_the_next_job_binds_to_the_next_job_only(self) -> None:
        faults = TaskFaults()
        faults.add(index=3, attempt=0, exit_code=50001)

        faults.bind_next_job("first")
        faults.bind_next_job("second")

        assert faults.take("second", 3, 0) is None
        assert faults.take("first", 3, 1) is None
        assert faults.take("first", 3, 0) == TaskFault(exit_code=50001, after_seconds=0.0)
        assert faults.take("first", 3, 0) is None  # each fault fires once

    def test_faults_for_a_named_job_wait_for_it_and_are_forgotten_with_it(self) -> None:
        faults = TaskFaults()
        faults.add(index=0, attempt=1, exit_code=50002, job_id="j", after_seconds=2.5)
        faults.add(index=1, attempt=0, exit_code=50002, job_id="j")
        faults.bind_next_job("other")

        assert faults.take("j", 0, 1) == TaskFault(exit_code=50002, after_seconds=2.5)
        faults.forget_job("j")
        assert faults.take("j", 1, 0) is None

    @pytest.mark.parametrize(
        ("index", "attempt", "after_seconds"),
        [(-1, 0, 0.0), (0, -1, 0.0), (0, 0, -1.0), (0, 0, float("nan"))],
    )
    def test_bad_faults_are_refused(self, index: int, attempt: int, after_seconds: float) -> None:
        with pytest.raises(ValueError):
            TaskFaults().add(index=index, attempt=attempt, exit_code=1, after_seconds=after_seconds)


class TestCreationQuota:
    def test_the_quota_is_a_sliding_60_second_window(self) -> None:
        clock = FakeClock()
        quota = CreationQuota(2, clock=clock)
        quota.check()
        quota.record()
        clock.now += 30
        quota.check()
        quota.record()

        with pytest.raises(ApiError) as refused:
            quota.check()
        assert refused.value.code == 429 and refused.value.status == "RESOURCE_EXHAUSTED"
        assert "2 jobs per minute" in refused.value.message
        assert refused.value.to_json()["error"]["details"][0]["reason"] == "RATE_LIMIT_EXCEEDED"

        clock.now += 30  # the first create leaves the window
        quota.check()

    def test_no_quota_means_unlimited_and_the_quota_can_change(self) -> None:
        clock = FakeClock()
        quota = CreationQuota(None, clock=clock)
        for _ in range(1000):
            quota.check()
            quota.record()

        quota.limit = 1000
        with pytest.raises(ApiError):
            quota.check()
        quota.limit = 1001
        quota.check()

    def test_a_shorter_window_lets_creates_through_sooner(self) -> None:
        clock = FakeClock()
        quota = CreationQuota(1, window_seconds=5, clock=clock)
        quota.check()
        quota.record()

        clock.now += 4.9
        with pytest.raises(ApiError) as refused:
            quota.check()
        assert "1 jobs per 5 s" in refused.value.message
        assert "Retry in 0.1 s" in refused.value.message

        clock.now += 0.1  # five seconds after the create, it leaves the window
        quota.check()
        quota.record()
        clock.now += 1
        with pytest.raises(ApiError):
            quota.check()

    def test_widening_the_window_counts_creates_already_made(self) -> None:
        clock = FakeClock()
        quota = CreationQuota(1, window_seconds=5, clock=clock)
        quota.check()
        quota.record()
        clock.now += 10
        quota.window_seconds = 60  # the create 10 s ago is inside a minute
        with pytest.raises(ApiError) as refused:
            quota.check()
        assert "1 jobs per minute" in refused.value.message
        clock.now += 50
        quota.check()

    @pytest.mark.parametrize("limit", [0, -1, True, 1.5])
    def test_bad_limits_are_refused(self, limit: object) -> None:
        with pytest.raises(ValueError, match="integer >= 1"):
            CreationQuota(limit)  # type: ignore[arg-type]

    @pytest.mark.parametrize("window", [0, -5, float("inf"), float("nan"), True])
    def test_bad_windows_are_refused(self, window: float) -> None:
        with pytest.raises(ValueError, match="seconds > 0"):
            CreationQuota(1, window_seconds=window)
