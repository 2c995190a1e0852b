"""Explaining a task that ended without a result: exit codes, events, time limits."""

from __future__ import annotations

import pickle

import pytest
from google.cloud import batch_v1

from covalent_gcpbatch_array._core.outcome import infrastructure_error, task_exit_code, task_index
from covalent_gcpbatch_array.exceptions import TaskInfrastructureError, TimeLimitExceeded


def task(*exit_codes: int, name: str = "projects/p/locations/l/jobs/j/taskGroups/group0/tasks/7"):
    events = [
        batch_v1.StatusEvent(
            description=f"Task state is updated from RUNNING to FAILED with exit code {code}",
            task_execution=batch_v1.TaskExecution(exit_code=code),
        )
        for code in exit_codes
    ]
    events.insert(
        0, batch_v1.StatusEvent(description="Task state is updated from PENDING to ASSIGNED")
    )
    return batch_v1.Task(name=name, status=batch_v1.TaskStatus(status_events=events))


class TestTaskRecord:
    def test_index_comes_from_the_name(self) -> None:
        assert task_index(task()) == 7

    def test_exit_code_is_the_last_attempts(self) -> None:
        assert task_exit_code(task(50001, 1)) == 1
        assert task_exit_code(task()) is None


class TestInfrastructureError:
    def test_time_limit_names_the_key_and_the_value(self) -> None:
        error = infrastructure_error(task(50005), time_limit=30, retries=0)
        assert isinstance(error, TimeLimitExceeded)
        assert "time_limit=30s" in str(error)
        assert error.exit_code == 50005

    def test_preemption_is_described_with_attempts(self) -> None:
        error = infrastructure_error(task(50001, 50001), time_limit=300, retries=1)
        assert type(error) is TaskInfrastructureError
        assert "preempted" in str(error)
        assert "after 2 attempt(s) (retries=1)" in str(error)
        assert "exit code 50001" in str(error)

    def test_attempts_are_counted_from_the_events_not_from_retries(self) -> None:
        # Batch does not retry an attempt that exited 0: one attempt, whatever retries says.
        error = infrastructure_error(task(0), time_limit=300, retries=3)
        assert "after 1 attempt(s) (retries=3)" in str(error)
        assert "exited with code 0 without writing a result or an error" in str(error)
        assert "after 2 attempt(s)" in str(
            infrastructure_error(task(1, 1), time_limit=1, retries=3)
        )
        assert "after 2 attempt(s)" in str(
            infrastructure_error(task(50005, 50005), time_limit=1, retries=1)
        )

    def test_the_runners_own_failure_points_at_the_tasks_log(self) -> None:
        error = infrastructure_error(task(1, 1), time_limit=300, retries=1)
        assert "the task's runner could not do its work (exit code 1)" in str(error)
        assert "`gcpbatch-array logs j 7`" in str(error)

    def test_other_exit_code_says_no_result_was_written(self) -> None:
        error = infrastructure_error(task(137), time_limit=300, retries=0)
        assert "exited with code 137 without writing a result" in str(error)

    def test_events_are_in_the_message(self) -> None:
        error = infrastructure_error(task(2), time_limit=300, retries=0)
        assert "Batch status events:" in str(error)
        assert "from PENDING to ASSIGNED" in str(error)
        assert error.events[0].endswith("PENDING to ASSIGNED")

    def test_job_events_explain_a_task_batch_never_listed(self) -> None:
        error = infrastructure_error(
            None, time_limit=300, retries=0, job_events=("Job failed: quota exceeded",)
        )
        assert "without an exit code" in str(error)
        assert "Job failed: quota exceeded" in str(error)

    @pytest.mark.parametrize("code", [50005, 50001, 1])
    def test_errors_survive_pickling(self, code: int) -> None:
        error = infrastructure_error(task(code), time_limit=10, retries=0)
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error)
        assert str(copy) == str(error)
        assert copy.exit_code == code
