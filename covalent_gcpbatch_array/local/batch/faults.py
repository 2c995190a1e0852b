"""Quota and fault injection bookkeeping for the Batch emulator.

Three small pieces of state, all driven from the emulator's admin endpoints:

- :class:`CallFaults`: "the next k calls of method M fail with HTTP status S";
- :class:`TaskFaults`: "attempt a of task i of job J dies with exit code E" (at start, or after
  running for a while), for a named job or for the next job created;
- :class:`CreationQuota`: the job-creation quota, a sliding window (60 s, as Google's
  per-minute quota, unless a test shortens it).

None of them does I/O or knows about HTTP beyond :class:`ApiError`; the scheduler and the HTTP
layer ask them what to do. The module is light, so ``LocalCloud`` takes the knobs' defaults from
it without loading the emulator.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from covalent_gcpbatch_array.local.api_errors import STATUS_NAMES, ApiError

__all__ = [
    "DEFAULT_OPERATION_DELAY",
    "DEFAULT_QUOTA_WINDOW_SECONDS",
    "RPC_METHODS",
    "CallFaults",
    "CreationQuota",
    "TaskFault",
    "TaskFaults",
]

# The BatchServiceClient RPCs the emulator answers, by their CamelCase RPC names.
RPC_METHODS = (
    "CreateJob",
    "GetJob",
    "ListJobs",
    "DeleteJob",
    "CancelJob",
    "ListTasks",
    "GetTask",
    "GetOperation",
)

#: Google's job-creation quota counts creates per minute.
DEFAULT_QUOTA_WINDOW_SECONDS = 60.0
#: Seconds a deleted (cancelled) job stays DELETION_IN_PROGRESS (CANCELLATION_IN_PROGRESS).
DEFAULT_OPERATION_DELAY = 2.0


class CallFaults:
    """Planned failures of the next calls of an RPC method."""

    def __init__(self) -> None:
        # method -> HTTP statuses the next calls of that method answer, first one first
        self._planned: dict[str, deque[int]] = {}

    def add(self, method: str, status: int, count: int) -> None:
        """Make the next ``count`` calls of ``method`` fail with HTTP ``status``.

        :raises ValueError: unknown method, a status with no Google name, or count < 0
        """
        if method not in RPC_METHODS:
            raise ValueError(f"unknown method {method!r}; use one of {', '.join(RPC_METHODS)}")
        if status not in STATUS_NAMES:
            raise ValueError(
                f"HTTP status {status} has no Google status; use one of {sorted(STATUS_NAMES)}"
            )
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        self._planned.setdefault(method, deque()).extend([status] * count)

    def take(self, method: str) -> ApiError | None:
        """The error this call of ``method`` must answer with, if one is planned."""
        planned = self._planned.get(method)
        if not planned:
            return None
        status = planned.popleft()
        return ApiError(
            status,
            f"Injected fault: {method} answered with HTTP {status} {STATUS_NAMES[status]} "
            f"(planned with /_emulator/fail_calls; {len(planned)} more planned)",
        )

    def pending(self) -> dict[str, int]:
        """How many planned failures are left, by method."""
        return {method: len(statuses) for method, statuses in self._planned.items() if statuses}


@dataclass(frozen=True)
class TaskFault:
    """How one task attempt is made to fail."""

    exit_code: int  # the exit code the attempt reports, replacing the process's own
    after_seconds: float  # 0: fails as it starts (no process); > 0: killed after running so long


@dataclass
class TaskFaults:
    """Planned failures of task attempts, keyed by (job id, task index, attempt)."""

    # (job_id, index, attempt) -> the fault for that attempt
    _by_attempt: dict[tuple[str, int, int], TaskFault] = field(default_factory=dict)
    # (index, attempt) -> fault waiting for the next job to be created
    _next_job: dict[tuple[int, int], TaskFault] = field(default_factory=dict)

    def add(
        self,
        *,
        index: int,
        attempt: int,
        exit_code: int,
        job_id: str | None = None,
        after_seconds: float = 0.0,
    ) -> None:
        """Plan that attempt ``attempt`` of task ``index`` dies with ``exit_code``.

        :param job_id: the job; None means the next job created
        :param after_seconds: 0 fails the attempt as it would start; more lets it run that long
        :raises ValueError: a negative index, attempt or delay, or a non-finite delay
        """
        if index < 0 or attempt < 0:
            raise ValueError(f"index and attempt must be >= 0, got {index} and {attempt}")
        if not math.isfinite(after_seconds) or after_seconds < 0:
            raise ValueError(f"after_seconds must be a finite number >= 0, got {after_seconds}")
        fault = TaskFault(exit_code=exit_code, after_seconds=after_seconds)
        if job_id is None:
            self._next_job[(index, attempt)] = fault
        else:
            self._by_attempt[(job_id, index, attempt)] = fault

    def bind_next_job(self, job_id: str) -> None:
        """Hand the faults planned for "the next job" to the job just created."""
        for (index, attempt), fault in self._next_job.items():
            self._by_attempt[(job_id, index, attempt)] = fault
        self._next_job.clear()

    def take(self, job_id: str, index: int, attempt: int) -> TaskFault | None:
        """The fault planned for this attempt, if any (each fault is used once)."""
        return self._by_attempt.pop((job_id, index, attempt), None)

    def forget_job(self, job_id: str) -> None:
        """Drop the faults of a deleted job, so a new job with the same id starts clean."""
        for key in [key for key in self._by_attempt if key[0] == job_id]:
            del self._by_attempt[key]


class CreationQuota:
    """Google's job-creation quota: at most ``limit`` creates in any ``window_seconds`` window.

    Google's window is a minute (the default). A shorter one lets a test meet the quota and see
    it move on in seconds: ``CreationQuota(1, window_seconds=5)``.

    :param limit: creates allowed per window; None means unlimited
    :param window_seconds: the length of the sliding window, > 0
    :param clock: a monotonic clock in seconds (injectable for tests)
    :raises ValueError: a limit below 1, or a window that is not a finite number > 0
    """

    def __init__(
        self,
        limit: int | None = None,
        window_seconds: float = DEFAULT_QUOTA_WINDOW_SECONDS,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        # monotonic times of the successful creates still inside the window, oldest first
        self._recent: deque[float] = deque()
        self.limit = limit
        self.window_seconds = window_seconds

    @property
    def limit(self) -> int | None:
        """Creates allowed per window (None: unlimited)."""
        return self._limit

    @limit.setter
    def limit(self, limit: int | None) -> None:
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
        ):
            raise ValueError(f"the quota must be an integer >= 1 or None, got {limit!r}")
        self._limit = limit

    @property
    def window_seconds(self) -> float:
        """The length of the sliding window in seconds."""
        return self._window_seconds

    @window_seconds.setter
    def window_seconds(self, seconds: float) -> None:
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, int | float)
            or not (math.isfinite(seconds) and seconds > 0)
        ):
            raise ValueError(f"the quota window must be a number of seconds > 0, got {seconds!r}")
        self._window_seconds = float(seconds)

    def check(self) -> None:
        """Refuse a create that would exceed the quota.

        :raises ApiError: 429 RESOURCE_EXHAUSTED naming the job-creation quota
        """
        if self.limit is None:
            return
        now = self._clock()
        while self._recent and now - self._recent[0] >= self.window_seconds:
            self._recent.popleft()
        if len(self._recent) >= self.limit:
            retry_in = self.window_seconds - (now - self._recent[0])
            raise ApiError.resource_exhausted(
                f"Quota exceeded for quota metric 'Job creation requests' and limit "
                f"'Job creation requests per minute per region' of service "
                f"'batch.googleapis.com': {self._describe()}. Retry in {retry_in:.1f} s, or "
                f"raise the emulator's quota."
            )

    def record(self) -> None:
        """Count a successful create."""
        self._recent.append(self._clock())

    def _describe(self) -> str:
        if self.window_seconds == DEFAULT_QUOTA_WINDOW_SECONDS:
            return f"{self.limit} jobs per minute (the emulator's jobs_per_minute)"
        return (
            f"{self.limit} jobs per {self.window_seconds:g} s (the emulator's jobs_per_window "
            f"and quota_window_seconds)"
        )
