"""The task contract: one definition of the names and rules the executor and the runner share."""

from __future__ import annotations

import pytest
from google.cloud import batch_v1

from covalent_gcpbatch_array._core import contract
from covalent_gcpbatch_array._core.contract import TaskRef, validate_job_id, validate_prefix
from covalent_gcpbatch_array._core.jobs import build_job
from covalent_gcpbatch_array._core.outcome import infrastructure_error
from covalent_gcpbatch_array._core.storage import JobLayout, TaskStore
from covalent_gcpbatch_array.config import ExecutorConfig
from covalent_gcpbatch_array.exceptions import ConfigError, TimeLimitExceeded
from covalent_gcpbatch_array.runner import RunnerSettings

CONFIG = {
    "project_id": "my-project",
    "bucket_name": "my-bucket",
    "container_image_uri": "image",
    "bucket_prefix": "runs/cga",
}

VALID_PREFIXES = ["runs", "a.b_c-D/9", "runs/cga", "_x/-y", "p" * 900]
INVALID_PREFIXES = [
    *("/", "/runs", "runs/", "runs/cga/", "runs/../x", "..", "a//b", "./a", ".hidden"),
    *("a/.b", "a b", "runs\\x", "é", "a/\n", "runs\n", "p" * 901),
]


class TestJobIds:
    @pytest.mark.parametrize("job_id", ["a", "cga-0123-abc", "z9", "a" * 63])
    def test_valid_job_ids(self, job_id: str) -> None:
        assert validate_job_id(job_id) == job_id

    @pytest.mark.parametrize(
        "job_id", ["", "A", "9a", "a-", "a_b", "a/b", "..", "a" * 64, "job\n", "ä"]
    )
    def test_invalid_job_ids(self, job_id: str) -> None:
        with pytest.raises(ValueError, match="invalid job id"):
            validate_job_id(job_id)


class TestBucketPrefix:
    @pytest.mark.parametrize("prefix", ["", *VALID_PREFIXES])
    def test_valid_prefixes_are_returned_unchanged(self, prefix: str) -> None:
        assert validate_prefix(prefix) == prefix

    @pytest.mark.parametrize("prefix", INVALID_PREFIXES)
    def test_unsafe_prefixes(self, prefix: str) -> None:
        with pytest.raises(ValueError, match="invalid bucket prefix"):
            validate_prefix(prefix)

    @pytest.mark.parametrize("prefix", VALID_PREFIXES + INVALID_PREFIXES)
    def test_the_config_and_the_store_apply_the_same_rule(self, prefix: str) -> None:
        """A prefix the config refuses never reaches a job folder, and the other way round."""
        try:
            ExecutorConfig.from_values({**CONFIG, "bucket_prefix": prefix})
            config_accepts = True
        except ConfigError as exc:
            assert "not a valid object prefix" in str(exc)
            config_accepts = False
        try:
            JobLayout(prefix, "job-1")
            store_accepts = True
        except ValueError:
            store_accepts = False
        assert config_accepts == store_accepts == (prefix in VALID_PREFIXES)

    def test_the_store_refuses_what_the_config_refuses(self) -> None:
        with pytest.raises(ValueError, match="invalid bucket prefix"):
            TaskStore(_NoClient(), "bucket", "runs/")  # type: ignore[arg-type]


class _NoClient:
    def bucket(self, name: str) -> object:
        return object()


class TestTaskRef:
    @pytest.mark.parametrize("index", [-1, True, 1.0, "1"])
    def test_invalid_task_index(self, index: object) -> None:
        with pytest.raises(ValueError, match="invalid task index"):
            TaskRef("job", index)  # type: ignore[arg-type]

    def test_invalid_job_id(self) -> None:
        with pytest.raises(ValueError, match="invalid job id"):
            TaskRef("Job", 0)


class TestTaskEnvironment:
    def test_the_runner_reads_what_the_job_sets(self) -> None:
        """Every variable the executor puts in a job is read by the runner under that name."""
        config = ExecutorConfig.from_values(CONFIG)
        job = build_job(config.shape, task_count=3, job_prefix="runs/cga/job-1", hmac_key="ab" * 32)
        spec = job.task_groups[0].task_spec
        assert list(spec.runnables[0].container.commands) == ["-m", contract.RUNNER_MODULE]
        environ = {
            **spec.environment.variables,
            contract.ENV_TASK_INDEX: "2",
            contract.ENV_TASK_ATTEMPT: "1",
        }
        settings = RunnerSettings.from_environ(environ)
        assert settings.bucket == "my-bucket"
        assert settings.layout == JobLayout("runs/cga", "job-1")
        assert settings.task == TaskRef("job-1", 2)
        assert settings.attempt == 1
        assert settings.key == bytes.fromhex("ab" * 32)
        assert settings.cancel_poll_seconds == float(
            spec.environment.variables[contract.ENV_CANCEL_POLL]
        )

    def test_the_runner_module_is_the_runner(self) -> None:
        import covalent_gcpbatch_array.runner as runner

        assert runner.__name__ == contract.RUNNER_MODULE


class TestExitCodes:
    def test_the_job_fails_at_once_on_the_never_retried_codes(self) -> None:
        job = build_job(
            ExecutorConfig.from_values(CONFIG).shape,
            task_count=1,
            job_prefix="runs/cga/job-1",
            hmac_key="ab" * 32,
        )
        (policy,) = job.task_groups[0].task_spec.lifecycle_policies
        assert policy.action == batch_v1.LifecyclePolicy.Action.FAIL_TASK
        assert tuple(policy.action_condition.exit_codes) == contract.NEVER_RETRIED_EXIT_CODES
        assert contract.EXIT_USER_ERROR in contract.NEVER_RETRIED_EXIT_CODES
        assert contract.EXIT_MAX_RUN_DURATION in contract.NEVER_RETRIED_EXIT_CODES
        assert contract.EXIT_INFRA_ERROR not in contract.NEVER_RETRIED_EXIT_CODES

    def test_the_runners_codes_are_distinct_and_not_reserved(self) -> None:
        codes = {contract.EXIT_OK, contract.EXIT_INFRA_ERROR, contract.EXIT_USER_ERROR}
        assert len(codes) == 3
        assert not codes & set(contract.RESERVED_EXIT_CODES)
        assert contract.EXIT_MAX_RUN_DURATION in contract.RESERVED_EXIT_CODES

    def test_the_max_run_duration_code_means_the_time_limit(self) -> None:
        task = batch_v1.Task(name="projects/p/locations/r/jobs/j/taskGroups/group0/tasks/0")
        task.status.status_events.append(
            batch_v1.StatusEvent(
                task_execution=batch_v1.TaskExecution(exit_code=contract.EXIT_MAX_RUN_DURATION)
            )
        )
        error = infrastructure_error(task, time_limit=30, retries=0)
        assert isinstance(error, TimeLimitExceeded)
