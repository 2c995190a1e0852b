"""Reading and validating a Batch ``Job`` definition, as ``CreateJob`` receives it.

The JSON body is parsed with protobuf's own JSON parser against ``google.cloud.batch.v1.Job``,
so field names, types and enum names are checked exactly as Google's front end checks them.
What the emulator acts on (task count, parallelism, retries, lifecycle policy, run limits,
runnables, environment) is extracted into a :class:`JobSpec`; everything else (allocation
policy, logs policy, compute resources, labels, ...) is kept in :attr:`JobSpec.echo` and sent
back by every ``GetJob`` and ``ListJobs``, with the fields Google fills in (the task group's
name, ``batch-job-id`` label, ...).

What Google checks at ``CreateJob`` is refused here with 400 (labels, priority, ids, limits).
What Google accepts and fails at scheduling (a machine type, GPU, zone or instance template that
does not exist, checked against :mod:`covalent_gcpbatch_array._core.catalogue`), and what the local
cloud cannot do (volumes, networks, secrets, ...), is kept in :attr:`JobSpec.scheduling_failure`:
the job is accepted and then FAILS with a status event naming the field.
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

from covalent_gcpbatch_array._core.catalogue import ShapeProblem, catalogue
from covalent_gcpbatch_array._core.contract import JOB_ID_PATTERN  # Google's rule for job ids
from covalent_gcpbatch_array.local.api_errors import ApiError

__all__ = [
    "BATCH_JOB_ID_LABEL",
    "MAX_JOB_BYTES",
    "MAX_LABELS",
    "MAX_RETRY_COUNT",
    "MAX_TASK_COUNT",
    "JobSpec",
    "LifecycleAction",
    "LifecycleRule",
    "RunnableSpec",
    "parse_job",
    "validate_job_id",
]

# Google Batch limits (cloud.google.com/batch/quotas and batch.proto).
MAX_TASK_COUNT = 100_000
MAX_RETRY_COUNT = 10
MAX_JOB_BYTES = 1024 * 1024  # "job definition size: 1 MB"
# Labels (cloud.google.com/batch/docs/organize-resources-using-labels, and Compute Engine's label
# rules): Batch adds batch-job-id itself; goog- and google- prefixes are reserved; 64 per resource.
BATCH_JOB_ID_LABEL = "batch-job-id"
MAX_LABELS = 64
_RESERVED_LABEL_PREFIXES = ("goog-", "google-")
_LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")
# Job.priority: "The valid value range is [0, 100)".
MAX_PRIORITY = 100
# What a status event says of a documented feature the local cloud does not reproduce.
NOT_SUPPORTED = "is not supported by the local cloud"
# Runs a script whose text starts with a shebang line: the text goes to a file run as a program.
_SHEBANG_TEXT = (
    'f=$(mktemp "${TMPDIR:-/tmp}/batch-script.XXXXXX") || exit 1; printf %s "$0" > "$f"; '
    'chmod +x "$f"; "$f"; status=$?; rm -f "$f"; exit $status'
)
# Runs a script file: by its shebang line if it has one, else with /bin/sh.
_SCRIPT_PATH = (
    'IFS= read -r first < "$0"; case "$first" in "#!"*) exec ${first#??} "$0";; '
    '*) exec /bin/sh "$0";; esac'
)

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
    environment: Mapping[str, str]  # taskSpec.environment(s) variables
    lifecycle: LifecycleRule | None  # the lifecycle policy, if any
    task_environments: tuple[Mapping[str, str], ...]  # per task index (taskEnvironments), or ()
    require_hosts_file: bool  # tasks get BATCH_HOSTS_FILE
    priority: int  # Job.priority, 0..99
    labels: Mapping[str, str]  # Job.labels, batch-job-id included
    scheduling_failure: str | None  # why the job FAILS at scheduling (it is accepted first)
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
    job_id = job_name.rsplit("/", 1)[1]
    labels = _labels(dict(job.labels), "job.labels")
    _labels(dict(job.allocation_policy.labels), "job.allocation_policy.labels")
    if not 0 <= job.priority < MAX_PRIORITY:
        raise ApiError.invalid_argument(
            "job.priority", f"priority must be in [0, {MAX_PRIORITY}), got {job.priority}"
        )
    group = job.task_groups[0]
    task_environments = tuple(dict(env.variables) for env in group.task_environments)
    # "Task count will be the length of task_environments" (task_count is then ignored).
    task_count = len(task_environments) or group.task_count or 1
    if not 1 <= task_count <= MAX_TASK_COUNT:
        raise ApiError.invalid_argument(
            "job.task_groups[0].task_count",
            f"task_count must be between 1 and {MAX_TASK_COUNT}, got {group.task_count}",
        )
    if group.parallelism < 0:
        raise ApiError.invalid_argument(
            "job.task_groups[0].parallelism", f"parallelism must be >= 0, got {group.parallelism}"
        )
    in_order = group.scheduling_policy == batch_v1.TaskGroup.SchedulingPolicy.IN_ORDER
    if in_order and group.parallelism not in (0, 1):
        raise ApiError.invalid_argument(
            "job.task_groups[0].parallelism",
            f"parallelism must be 1 if the scheduling_policy is IN_ORDER, got {group.parallelism}",
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
    group.parallelism = group.parallelism or (1 if in_order else task_count)
    job.labels[BATCH_JOB_ID_LABEL] = job_id
    return JobSpec(
        task_count=task_count,
        parallelism=group.parallelism,
        max_retry_count=spec.max_retry_count,
        max_run_duration=max_run_duration,
        runnables=runnables,
        environment={**spec.environments, **spec.environment.variables},
        lifecycle=_lifecycle(spec.lifecycle_policies),
        task_environments=task_environments,
        require_hosts_file=group.require_hosts_file,
        priority=job.priority,
        labels={**labels, BATCH_JOB_ID_LABEL: job_id},
        scheduling_failure=_scheduling_failure(job, location=job_name.split("/")[3]),
        echo=json_format.MessageToDict(job),
        fingerprint=fingerprint,
    )


def _labels(labels: dict[str, str], field: str) -> dict[str, str]:
    """Custom labels checked as Google checks them. :raises ApiError: 400 naming the label"""
    if len(labels) > MAX_LABELS:
        raise ApiError.invalid_argument(
            field, f"{len(labels)} labels given; a resource takes at most {MAX_LABELS}"
        )
    for key, value in labels.items():
        if key.startswith(_RESERVED_LABEL_PREFIXES):
            raise ApiError.invalid_argument(
                field,
                f"label {key!r}: names starting with 'goog-' or 'google-' are reserved for "
                f"predefined labels; rename it",
            )
        if not _LABEL_KEY.fullmatch(key) or not _LABEL_VALUE.fullmatch(value):
            raise ApiError.invalid_argument(
                field,
                f"label {key}={value!r}: names are 1-63 lowercase letters, digits, '_' or '-', "
                f"starting with a letter; values are 0-63 of the same",
            )
    return labels


# Set fields of a Job that the local cloud cannot honour, by their paths in the Job.
_UNSUPPORTED_FIELDS = (
    ("notifications", "Pub/Sub notifications"),
    ("allocation_policy.network", "VPC networks"),
    ("allocation_policy.placement", "placement policies"),
    ("task_groups[0].task_spec.volumes", "volumes (GCS, NFS and disk mounts)"),
    ("task_groups[0].task_spec.environment.secret_variables", "Secret Manager variables"),
    ("task_groups[0].task_spec.environment.encrypted_variables", "KMS-encrypted variables"),
    ("task_groups[0].run_as_non_root", "OS Login users (run_as_non_root)"),
)


def _scheduling_failure(job: Any, *, location: str) -> str | None:
    """Why Google (or the local cloud) fails this accepted job at scheduling, or None.

    Either a shape Google cannot allocate (checked against the compute catalogue), or a
    documented feature the local cloud does not reproduce; the text names the field.
    """
    for path, what in _UNSUPPORTED_FIELDS:
        if _is_set(job, path):
            return f"job.{path}: {what} {NOT_SUPPORTED}."
    for k, runnable in enumerate(job.task_groups[0].task_spec.runnables):
        if runnable.container.volumes:
            field = f"job.task_groups[0].task_spec.runnables[{k}].container.volumes"
            return f"{field}: container volumes {NOT_SUPPORTED}."
    if job.logs_policy.destination == batch_v1.LogsPolicy.Destination.PATH:
        return f"job.logs_policy.destination: PATH (logs written to a volume) {NOT_SUPPORTED}."
    policy = job.allocation_policy
    zones = []
    for place in policy.location.allowed_locations:
        kind, _, name = place.partition("/")
        if kind == "zones":
            zones.append(name)
        elif kind != "regions" or name != location:
            return (
                f"job.allocation_policy.location.allowed_locations: {place!r} is not a region "
                f"or zone of {location}; use 'regions/{location}' or 'zones/{location}-<z>'"
            )
    for k, instance in enumerate(policy.instances):
        field = f"job.allocation_policy.instances[{k}]"
        if instance.instance_template:
            return (
                f"{field}.instance_template: instance template {instance.instance_template!r} "
                f"does not exist (the local cloud has no instance templates)."
            )
        vm = instance.policy
        if vm.reservation:
            return f"{field}.policy.reservation: reservation {vm.reservation!r} does not exist."
        gpus = list(vm.accelerators)
        if len(gpus) > 1:
            return f"{field}.policy.accelerators: one accelerator type per VM, got {len(gpus)}."
        resources = job.task_groups[0].task_spec.compute_resource
        problem = catalogue().check(
            region=location,
            machine_type=vm.machine_type,
            accelerator_type=gpus[0].type_ if gpus else "",
            accelerator_count=gpus[0].count if gpus else 0,
            zones=zones,
            vcpus=resources.cpu_milli / 1000,
            memory_mib=resources.memory_mib,
        )
        if problem is not None:
            return f"{_problem_field(field, problem)}: {problem.message}."
    if not policy.instances:
        problem = catalogue().check(region=location, zones=zones)
        if problem is not None:
            return f"{_problem_field('', problem)}: {problem.message}."
    return None


def _problem_field(instance: str, problem: ShapeProblem) -> str:
    """The Job field a catalogue problem is about."""
    return {
        "region": "job.name (location)",
        "zone": "job.allocation_policy.location.allowed_locations",
        "machine_type": f"{instance}.policy.machine_type",
        "accelerator_type": f"{instance}.policy.accelerators[0].type",
        "accelerator_count": f"{instance}.policy.accelerators[0].count",
        "vcpus": "job.task_groups[0].task_spec.compute_resource.cpu_milli",
        "memory": "job.task_groups[0].task_spec.compute_resource.memory_mib",
    }[problem.part]


def _is_set(message: Any, path: str) -> bool:
    """Whether the (possibly nested, ``[0]``-indexed) field ``path`` of ``message`` is set."""
    value = message
    for part in path.split("."):
        name, _, index = part.partition("[")
        value = getattr(value, name)
        if index:
            value = value[int(index.rstrip("]"))]
    if hasattr(value, "ListFields"):
        return bool(value.ListFields())
    return bool(value)


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
        # Google runs a script with /bin/sh unless its first line is a shebang line.
        if runnable.script.WhichOneof("command") == "path":
            argv = ("/bin/sh", "-c", _SCRIPT_PATH, runnable.script.path)
        elif runnable.script.text.startswith("#!"):
            argv = ("/bin/sh", "-c", _SHEBANG_TEXT, runnable.script.text)
        elif runnable.script.text:
            argv = ("/bin/sh", "-c", runnable.script.text)
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
