"""Parsing and validating Batch Job definitions (the emulator's CreateJob body)."""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from covalent_gcpbatch_array.local.api_errors import ApiError
from covalent_gcpbatch_array.local.batch.spec import (
    JobSpec,
    LifecycleAction,
    LifecycleRule,
    parse_job,
    validate_job_id,
)

JOB_NAME = "projects/p/locations/us-east1/jobs/j"


def resolve(image_uri: str, entrypoint: str, commands: Sequence[str]) -> list[str]:
    """A container map like the launcher's: one known image."""
    if image_uri != "known/image":
        raise ValueError(f"image {image_uri!r} is not mapped")
    return [entrypoint or "/entry", *commands]


def parse(job: dict[str, Any]) -> JobSpec:
    return parse_job(json.dumps(job).encode(), job_name=JOB_NAME, resolve_container=resolve)


def job_with(task_spec: dict[str, Any], **group: Any) -> dict[str, Any]:
    return {"taskGroups": [{"taskSpec": task_spec, **group}]}


SCRIPT = {"runnables": [{"script": {"text": "echo hi"}}]}


class TestParseJob:
    def test_defaults_are_filled_in_and_everything_else_is_echoed(self) -> None:
        spec = parse(
            {
                **job_with({**SCRIPT, "computeResource": {"cpuMilli": "2000"}}),
                "labels": {"team": "science"},
                "logsPolicy": {"destination": "CLOUD_LOGGING"},
                "status": {"state": "RUNNING"},  # output only: ignored
            }
        )

        assert (spec.task_count, spec.parallelism, spec.max_retry_count) == (1, 1, 0)
        assert spec.runnables[0].argv == ("/bin/sh", "-c", "echo hi")  # Google's default shell
        group = spec.echo["taskGroups"][0]
        assert group["name"] == JOB_NAME + "/taskGroups/group0"
        assert (group["taskCount"], group["parallelism"]) == ("1", "1")
        assert group["taskSpec"]["computeResource"] == {"cpuMilli": "2000"}
        assert spec.echo["labels"] == {"team": "science", "batch-job-id": JOB_NAME.rsplit("/")[-1]}
        assert spec.echo["logsPolicy"] == {"destination": "CLOUD_LOGGING"}
        assert "status" not in spec.echo

    def test_what_the_emulator_acts_on_is_extracted(self) -> None:
        spec = parse(
            job_with(
                {
                    "runnables": [
                        {
                            "script": {"path": "/opt/run.sh"},
                            "environment": {"variables": {"A": "1"}},
                        },
                        {"barrier": {}},
                        {
                            "container": {"imageUri": "known/image", "commands": ["x", "y"]},
                            "ignoreExitStatus": True,
                            "background": True,
                            "alwaysRun": True,
                            "timeout": "2.5s",
                        },
                    ],
                    "environment": {"variables": {"B": "2"}},
                    "maxRetryCount": 3,
                    "maxRunDuration": "90s",
                    "lifecyclePolicies": [
                        {"action": "FAIL_TASK", "actionCondition": {"exitCodes": [3]}}
                    ],
                },
                taskCount="7",
                parallelism="2",
            )
        )

        assert (spec.task_count, spec.parallelism, spec.max_retry_count) == (7, 2, 3)
        assert spec.max_run_duration == 90.0
        assert spec.environment == {"B": "2"}
        script, barrier, container = spec.runnables
        assert script.argv is not None and script.argv[0] == "/bin/sh"
        assert script.argv[-1] == "/opt/run.sh" and script.environment == {"A": "1"}
        assert barrier.argv is None
        assert container.argv == ("/entry", "x", "y")
        assert (container.ignore_exit_status, container.background, container.always_run) == (
            True,
            True,
            True,
        )
        assert container.timeout == 2.5
        assert spec.lifecycle == LifecycleRule(LifecycleAction.FAIL_TASK, frozenset({3}))

    def test_the_fingerprint_ignores_key_order_and_output_fields(self) -> None:
        one = parse({"labels": {"a": "1", "b": "2"}, **job_with(SCRIPT)})
        same = parse({**job_with(SCRIPT), "labels": {"b": "2", "a": "1"}, "uid": "ignored"})
        other = parse({**job_with(SCRIPT), "labels": {"a": "1"}})

        assert one.fingerprint == same.fingerprint
        assert one.fingerprint != other.fingerprint

    @pytest.mark.parametrize(
        ("job", "field"),
        [
            (job_with({"runnables": [{"script": {}}]}), "runnables[0].script"),
            (job_with({"runnables": [{"barrier": {}}]}), "runnables"),
            (job_with({"runnables": [{}]}), "runnables[0]"),
            (job_with({"runnables": [{"container": {}}]}), "container.image_uri"),
            (
                job_with({"runnables": [{"container": {"imageUri": "unknown/image"}}]}),
                "container.image_uri",
            ),
            (job_with({**SCRIPT, "maxRunDuration": "-5s"}), "max_run_duration"),
            (job_with({**SCRIPT, "maxRetryCount": -1}), "max_retry_count"),
            (
                job_with({**SCRIPT, "lifecyclePolicies": [{"action": 1}, {"action": 2}]}),
                "lifecycle_policies",
            ),
            (
                job_with({**SCRIPT, "lifecyclePolicies": [{"action": 77}]}),
                "lifecycle_policies[0].action",
            ),
            (job_with(SCRIPT, taskCount="100001"), "task_count"),
            ({**job_with(SCRIPT), "labels": {"big": "x" * 1_100_000}}, "job"),
            ({"taskGroups": []}, "task_groups"),
            ({"taskGroups": [{"taskSpec": SCRIPT}, {"taskSpec": SCRIPT}]}, "task_groups"),
        ],
    )
    def test_invalid_definitions_name_the_field(self, job: dict[str, Any], field: str) -> None:
        with pytest.raises(ApiError) as refused:
            parse(job)
        assert refused.value.code == 400
        assert refused.value.field is not None and refused.value.field.endswith(field)
        assert field in refused.value.message


class TestRetryAllowed:
    @pytest.mark.parametrize(
        ("action", "exit_code", "attempt", "retried"),
        [
            (None, 1, 0, True),
            (None, 1, 2, False),  # attempt 2 was the last of max_retry_count=2
            ("FAIL_TASK", 3, 0, False),
            ("FAIL_TASK", 4, 0, True),
            ("RETRY_TASK", 3, 0, True),
            ("RETRY_TASK", 4, 0, False),
            ("RETRY_TASK", 3, 2, False),
        ],
    )
    def test_lifecycle_policy_and_retry_budget(
        self, action: str | None, exit_code: int, attempt: int, retried: bool
    ) -> None:
        task_spec: dict[str, Any] = {**SCRIPT, "maxRetryCount": 2}
        if action is not None:
            task_spec["lifecyclePolicies"] = [
                {"action": action, "actionCondition": {"exitCodes": [3]}}
            ]

        assert parse(job_with(task_spec)).retry_allowed(exit_code, attempt) is retried


def google_job_id_rule(job_id: str) -> bool:
    """Google's rule in words: <= 63 chars of [a-z0-9-], a letter first, no '-' last."""
    allowed = set(string.ascii_lowercase + string.digits + "-")
    return (
        0 < len(job_id) <= 63
        and set(job_id) <= allowed
        and job_id[0] in string.ascii_lowercase
        and not job_id.endswith("-")
    )


class TestJobId:
    @given(st.text(alphabet=string.ascii_letters + string.digits + "-_.", max_size=70))
    def test_the_pattern_is_google_s_rule(self, job_id: str) -> None:
        try:
            validate_job_id(job_id)
            accepted = True
        except ApiError as refused:
            assert refused.field == "job_id"
            accepted = False
        assert accepted == google_job_id_rule(job_id)

    def test_boundaries(self) -> None:
        validate_job_id("a")
        validate_job_id("a" * 63)
        with pytest.raises(ApiError, match="at most 63"):
            validate_job_id("a" * 64)
