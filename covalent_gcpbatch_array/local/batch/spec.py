"""Reading and validating a Batch ``Job`` definition, as ``CreateJob`` receives it.

The JSON body is parsed with protobuf's own JSON parser against ``google.cloud.batch.v1.Job``,
so field names, types and enum names are checked exactly as Google's front end checks them.
What the emulator acts on (task count, parallelism, retries, lifecycle policy, run limits,
runnables, environment) is extracted into a :class:`JobSpec`; everything else (allocation
policy, logs policy, compute resources, labels, ...) is kept in :attr:`JobSpec.echo` and sent
back unchanged by every ``GetJob`` and ``ListJobs``.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.cloud import batch_v1
from google.protobuf import json_format

from covalent_gcpbatch_array.local.api_errors import ApiError

__all__ = [
    "JOB_ID_PATTERN",
    "MAX_JOB_BYTES",
    "MAX_RETRY_COUNT",
    "MAX_TASK_COUNT",
    "JobSpec",
    "LifecycleAction",
    "LifecycleRule",
    "RunnableSpec",
    "parse_job",
    "validate_job_id",
]

# Google's rule for job ids: lowercase letter first, then letters, digits, '-', not ending in '-'.
JOB_ID_PATTERN = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")
# Google Batch limits (cloud.google.com/batch/quotas and batch.proto).
MAX_TASK_COUNT = 100_000
MAX_RETRY_COUNT = 10
MAX_JOB_BYTES = 1024 * 1024  # "job definition size: 1 MB"

# Maps (image_uri, entrypoint, commands) to a local command line; raises ValueError if unmapped.
ContainerResolver = Callable[[str, str, Sequence[str]], list[str]]

_JOB_PB = batch_v1.Job.pb()
_ACTION_NAMES = {1: "RETRY_TASK", 2: "FAIL_TASK"}


class LifecycleAction(enum.Enum):
    """What a lifecycle policy does when a failed attempt's exit code is listed."""

    RETRY_TASK = "RETRY_TASK"  # listed codes are retried, other codes fail the task at once
    FAIL_TASK = "FAIL_TASK"  # listed codes fail the task at once, other codes are retried


@dataclass(frozen=True)
class LifecycleRule:
    """The task spec's lifecycle policy (Google supports one)."""

    action: LifecycleAction  # what happens to the listed exit codes
    exit_codes: frozenset[int]  # the exit codes the condition lists


@dataclass(frozen=True)
class RunnableSpec:
    """One runnable of the task spec, resolved to a local command line."""

    label: str  # "runnable 0 (script)", for logs and messages
    argv: tuple[str, ...] | None  # the command to run; None for a barrier (nothing to run)
    environment: Mapping[str, str]  # the runnable's own variables, over the task spec's
    ignore_exit_status: bool  # a non-zero exit does not fail the task
    background: bool  # started, not waited for; killed when the foreground runnables end
    always_run: bool  # runs even after an earlier runnable failed
    timeout: float | None  # seconds this runnable may run (exit code 50005 past it)


@dataclass(frozen=True)
class JobSpec:
    """The parts of a Job definition the emulator acts on, plus the whole of it to echo."""

    task_count: int  # tasks in the (single) task group
    parallelism: int  # tasks of this job that may run at once
    max_retry_count: int  # extra attempts a failed task gets (0..10)
    max_run_duration: float | None  # seconds an attempt may run (exit code 50005 past it)
    runnables: tuple[RunnableSpec, ...]  # run in order on every attempt
    environment: Mapping[str, str]  # taskSpec.environment.variables
    lifecycle: LifecycleRule | None  # the lifecycle policy, if any
    echo: dict[str, Any]  # the definition as received, in Google's JSON, defaults filled in
    fingerprint: bytes  # canonical bytes of the definition, to compare requestId repeats

    def retry_allowed(self, exit_code: int, attempt: int) -> bool:
        """Whether a failed attempt ``attempt`` (0-based) with ``exit_code`` is tried again."""
        if attempt >= self.max_retry_count:
            return False
        if self.lifecycle is None:
            return True
        listed = exit_code in self.lifecycle.exit_codes
        if self.lifecycle.action is LifecycleAction.FAIL_TASK:
            return not listed
        return listed


def validate_job_id(job_id: str) -> None:
    """Check a job id as Google does.

    :raises ApiError: 400 INVALID_ARGUMENT naming ``job_id`` and the rule it breaks
    """
    if not JOB_ID_PATTERN.fullmatch(job_id):
        raise ApiError.invalid_argument(
            "job_id",
            f"{job_id!r} is not a valid job id: use at most 63 characters, lowercase letters, "
            f"digits and '-', starting with a letter and not ending with '-' "
            f"(pattern {JOB_ID_PATTERN.pattern})",
        )


def parse_job(body: bytes, *, job_name: str, resolve_container: ContainerResolver) -> JobSpec:
    """Parse and validate the JSON body of a ``CreateJob`` request.

    :param body: the request body (a ``Job`` in Google's JSON)
    :param job_name: ``projects/P/locations/L/jobs/J``, to name the task group
    :param resolve_container: maps a container runnable to a local command line
    :raises ApiError: 400 INVALID_ARGUMENT naming the field at fault
    """
    if len(body) > MAX_JOB_BYTES:
        raise ApiError.invalid_argument(
            "job",
            f"the job definition is {len(body)} bytes, over Google's limit of {MAX_JOB_BYTES} "
            f"bytes: keep per-task data out of the job (e.g. in a bucket, by BATCH_TASK_INDEX)",
        )
    try:
        document = json.loads(body or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError.invalid_argument("job", f"Invalid JSON payload received. {exc}") from exc
    if not isinstance(document, dict):
        raise ApiError.invalid_argument(
            "job", f"Invalid JSON payload received: expected a Job object, got {document!r:.80}"
        )
    job = _JOB_PB()
    try:
        json_format.ParseDict(document, job)
    except json_format.ParseError as exc:
        raise ApiError.invalid_argument("job", f"Invalid JSON payload received. {exc}") from exc
    # Output-only fields are ignored on create, as Google does.
    for output_only in ("name", "uid", "status", "create_time", "update_time"):
        job.ClearField(output_only)
    fingerprint = job.SerializeToString(deterministic=True)

    if len(job.task_groups) != 1:
        raise ApiError.invalid_argument(
            "job.task_groups",
            f"a job needs exactly one task group (Google supports one), got {len(job.task_groups)}",
        )
    group = job.task_groups[0]
    task_count = group.task_count or 1
    if not 1 <= task_count <= MAX_TASK_COUNT:
        raise ApiError.invalid_argument(
            "job.task_groups[0].task_count",
            f"task_count must be between 1 and {MAX_TASK_COUNT}, got {group.task_count}",
        )
    if group.parallelism < 0:
        raise ApiError.invalid_argument(
            "job.task_groups[0].parallelism", f"parallelism must be >= 0, got {group.parallelism}"
        )
    spec = group.task_spec
    if not 0 <= spec.max_retry_count <= MAX_RETRY_COUNT:
        raise ApiError.invalid_argument(
            "job.task_groups[0].task_spec.max_retry_count",
            f"max_retry_count must be between 0 and {MAX_RETRY_COUNT}, got {spec.max_retry_count}",
        )
    max_run_duration = _seconds(
        spec.max_run_duration, "job.task_groups[0].task_spec.max_run_duration"
    )
    runnables = tuple(
        _runnable(runnable, k, resolve_container) for k, runnable in enumerate(spec.runnables)
    )
    if not any(runnable.argv is not None for runnable in runnables):
        raise ApiError.invalid_argument(
            "job.task_groups[0].task_spec.runnables",
            "the task spec needs at least one script or container runnable",
        )

    # Google fills these in and echoes them back.
    group.name = f"{job_name}/taskGroups/group0"
    group.task_count = task_count
    group.parallelism = group.parallelism or task_count
    return JobSpec(
        task_count=task_count,
        parallelism=group.parallelism,
        max_retry_count=spec.max_retry_count,
        max_run_duration=max_run_duration,
        runnables=runnables,
        environment=dict(spec.environment.variables),
        lifecycle=_lifecycle(spec.lifecycle_policies),
        echo=json_format.MessageToDict(job),
        fingerprint=fingerprint,
    )


def _seconds(duration: Any, field: str) -> float | None:
    """A Duration field in seconds; None when unset (zero)."""
    seconds = duration.seconds + duration.nanos / 1e9
    if seconds < 0:
        raise ApiError.invalid_argument(field, f"a duration must not be negative, got {seconds}s")
    return seconds or None


def _runnable(runnable: Any, k: int, resolve_container: ContainerResolver) -> RunnableSpec:
    field = f"job.task_groups[0].task_spec.runnables[{k}]"
    kind = runnable.WhichOneof("executable")
    argv: tuple[str, ...] | None
    if kind == "script":
        if runnable.script.WhichOneof("command") == "path":
            argv = ("bash", runnable.script.path)
        elif runnable.script.text:
            argv = ("bash", "-c", runnable.script.text)
        else:
            raise ApiError.invalid_argument(f"{field}.script", "a script needs `text` or `path`")
    elif kind == "container":
        container = runnable.container
        if not container.image_uri:
            raise ApiError.invalid_argument(
                f"{field}.container.image_uri", "a container runnable needs an image_uri"
            )
        try:
            argv = tuple(
                resolve_container(container.image_uri, container.entrypoint, container.commands)
            )
        except ValueError as exc:
            raise ApiError.invalid_argument(f"{field}.container.image_uri", str(exc)) from exc
    elif kind == "barrier":
        argv = None
    else:
        raise ApiError.invalid_argument(
            field, "a runnable needs one of `script`, `container` or `barrier`"
        )
    return RunnableSpec(
        label=f"runnable {k} ({kind})",
        argv=argv,
        environment=dict(runnable.environment.variables),
        ignore_exit_status=runnable.ignore_exit_status,
        background=runnable.background,
        always_run=runnable.always_run,
        timeout=_seconds(runnable.timeout, f"{field}.timeout"),
    )


def _lifecycle(policies: Sequence[Any]) -> LifecycleRule | None:
    field = "job.task_groups[0].task_spec.lifecycle_policies"
    if not policies:
        return None
    if len(policies) > 1:
        raise ApiError.invalid_argument(
            field, f"Google supports one lifecycle policy per task spec, got {len(policies)}"
        )
    policy = policies[0]
    if policy.action not in _ACTION_NAMES:
        raise ApiError.invalid_argument(
            f"{field}[0].action",
            f"action must be RETRY_TASK or FAIL_TASK, got {policy.action}",
        )
    return LifecycleRule(
        action=LifecycleAction(_ACTION_NAMES[policy.action]),
        exit_codes=frozenset(policy.action_condition.exit_codes),
    )
