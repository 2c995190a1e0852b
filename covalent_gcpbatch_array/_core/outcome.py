"""What one task's end means for its electron: a result, the user's error, or an infrastructure error.

Pure functions over Batch's task records and the objects the runner wrote, so every branch is
tested without a cloud.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.cloud import batch_v1

from covalent_gcpbatch_array._core.contract import (
    EXIT_INFRA_ERROR,
    EXIT_MAX_RUN_DURATION,
    EXIT_NO_INPUT,
    EXIT_ORPHANED,
    RESERVED_EXIT_CODES,
    task_index_of,
)
from covalent_gcpbatch_array.exceptions import TaskInfrastructureError, TimeLimitExceeded

__all__ = [
    "ElectronOutcome",
    "infrastructure_error",
    "task_attempts",
    "task_exit_code",
    "task_index",
]


@dataclass
class ElectronOutcome:
    """What the executor hands back to an electron's ``run()`` when its task ended."""

    result: Any = None  # the function's return value, when it returned
    error: BaseException | None = None  # the exception the function raised, rebuilt here
    traceback_text: str = ""  # the remote traceback, when the function raised
    stdout: str = ""  # what the task printed on standard output
    stderr: str = ""  # what the task printed on standard error


def task_index(task: batch_v1.Task) -> int:
    """The index of a task (from its resource name ``.../tasks/{index}``)."""
    return task_index_of(task.name)


def task_exit_code(task: batch_v1.Task) -> int | None:
    """The exit code of the task's last attempt, if Batch recorded one."""
    for event in reversed(task.status.status_events):
        if "task_execution" in event:
            return int(event.task_execution.exit_code)
    return None


def task_attempts(task: batch_v1.Task) -> int:
    """How many attempts of the task ended, from its status events (0 if none says)."""
    return sum(1 for event in task.status.status_events if "task_execution" in event)


def infrastructure_error(
    task: batch_v1.Task | None, *, time_limit: float, retries: int, job_events: tuple[str, ...] = ()
) -> TaskInfrastructureError:
    """Explain a task that ended without a result or a user error.

    :param task: Batch's record of the task (None if Batch never listed it)
    :param time_limit: the executor's ``time_limit``, for the message
    :param retries: the executor's ``retries``, for the message
    :param job_events: the job's status events, used when the task has none
    """
    events = tuple(event.description for event in task.status.status_events) if task else ()
    events = events or job_events
    code = task_exit_code(task) if task is not None else None
    # What Batch recorded, not what retries allows: exit 0 and user errors are not retried.
    count = (task_attempts(task) if task is not None else 0) or retries + 1
    attempts = f"after {count} attempt(s) (retries={retries})"
    if code == EXIT_MAX_RUN_DURATION:
        return TimeLimitExceeded(
            f"the task ran longer than time_limit={time_limit:g}s and Batch stopped it, "
            f"{attempts}; raise time_limit (constructor or [executors.gcpbatch_array]) if it "
            "needs more",
            exit_code=code,
            events=events,
        )
    if code in RESERVED_EXIT_CODES:
        reason = f"{RESERVED_EXIT_CODES[code]} (exit code {code})"
    elif code is None:
        reason = "the task ended without an exit code"
    elif code == 0:
        reason = (
            "the task process exited with code 0 without writing a result or an error (did "
            "the function end its own process, e.g. with os._exit()?)"
        )
    elif code == EXIT_ORPHANED:
        reason = (
            f"the task stopped because its job's lease was older than orphan_timeout (exit code "
            f"{code}): the executor that owned the job stopped renewing it (killed, or its "
            "machine lost)"
        )
    elif code == EXIT_NO_INPUT:
        reason = (
            f"the task found no input (exit code {code}): its upload failed or the job's "
            "objects were deleted"
        )
    elif code == EXIT_INFRA_ERROR and task is not None:
        job_id, index = task.name.split("/jobs/", 1)[-1].split("/")[0], task_index(task)
        reason = (
            f"the task's runner could not do its work (exit code {code}): Cloud Storage refused "
            "or kept failing its requests, or the task image cannot run it; the task's own "
            f"log says which (`gcpbatch-array logs {job_id} {index}`, or Cloud Logging)"
        )
    else:
        reason = f"the task process exited with code {code} without writing a result"
    return TaskInfrastructureError(
        f"{reason}, {attempts}; this is an infrastructure failure, not an error of the "
        "electron's function",
        exit_code=code,
        events=events,
    )
