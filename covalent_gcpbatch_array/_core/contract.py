"""The task contract: what the executor and a task's runner agree on, defined once.

The executor builds every array job from these names (:mod:`._core.jobs`), the runner reads
them in each task (:mod:`covalent_gcpbatch_array.runner`), and the outcome module, the CLI and
the tests interpret what a task did through them. Nothing here imports a Google library.

- the task's environment: :data:`ENV_BUCKET`, :data:`ENV_JOB_PREFIX`, :data:`ENV_HMAC_KEY`,
  :data:`ENV_CANCEL_POLL`, :data:`ENV_CANCEL_GRACE`, :data:`ENV_ORPHAN_TIMEOUT` (ours) and
  :data:`ENV_TASK_INDEX`, :data:`ENV_TASK_ATTEMPT` (set by Batch);
- the runner's exit codes (:data:`EXIT_OK`, :data:`EXIT_USER_ERROR`, :data:`EXIT_INFRA_ERROR`,
  :data:`EXIT_ORPHANED`, :data:`EXIT_NO_INPUT`) and Batch's reserved ones
  (:data:`RESERVED_EXIT_CODES`);
- which task an object belongs to (:class:`TaskRef`), and the rules for job ids and bucket
  prefixes, the only parts of an object name that are not fixed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "ENV_BUCKET",
    "ENV_CANCEL_GRACE",
    "ENV_CANCEL_POLL",
    "ENV_HMAC_KEY",
    "ENV_JOB_PREFIX",
    "ENV_ORPHAN_TIMEOUT",
    "ENV_TASK_ATTEMPT",
    "ENV_TASK_INDEX",
    "EXIT_INFRA_ERROR",
    "EXIT_MAX_RUN_DURATION",
    "EXIT_NO_INPUT",
    "EXIT_OK",
    "EXIT_ORPHANED",
    "EXIT_USER_ERROR",
    "JOB_ID_PATTERN",
    "MAX_PREFIX_LENGTH",
    "NEVER_RETRIED_EXIT_CODES",
    "RESERVED_EXIT_CODES",
    "RUNNER_MODULE",
    "TaskRef",
    "task_index_of",
    "validate_job_id",
    "validate_prefix",
]

#: The module every task runs: ``python -m covalent_gcpbatch_array.runner``.
RUNNER_MODULE = "covalent_gcpbatch_array.runner"

# The task's environment, set by the executor in the job definition.
ENV_BUCKET = "CGA_BUCKET"  # the bucket name
ENV_JOB_PREFIX = "CGA_JOB_PREFIX"  # the job's folder, "{prefix}/{job_id}"
ENV_HMAC_KEY = "CGA_HMAC_KEY"  # the job's key, 64 hex digits
ENV_CANCEL_POLL = "CGA_CANCEL_POLL_SECONDS"  # how often to look for the cancel marker
ENV_CANCEL_GRACE = "CGA_CANCEL_GRACE_SECONDS"  # how long a cancelled function may linger
ENV_ORPHAN_TIMEOUT = "CGA_ORPHAN_TIMEOUT_SECONDS"  # stop when the job's lease is this old
# ... and by Batch in every task.
ENV_TASK_INDEX = "BATCH_TASK_INDEX"  # 0 .. taskCount-1
ENV_TASK_ATTEMPT = "BATCH_TASK_RETRY_ATTEMPT"  # 0 on the first attempt

# The runner's exit codes.
EXIT_OK = 0  # the outcome is recorded, or there was nothing to do
EXIT_INFRA_ERROR = 1  # no outcome: storage or the task's set-up failed; Batch may retry
EXIT_USER_ERROR = 3  # error.pkl is recorded: another attempt would fail the same way
EXIT_ORPHANED = 4  # no outcome: the job's lease is older than orphan_timeout (its executor died)
EXIT_NO_INPUT = 5  # no outcome: the task has no input (its upload failed, or it was cleaned up)

#: Batch's reserved exit codes (cloud.google.com/batch/docs/troubleshooting#reserved-exit-codes).
RESERVED_EXIT_CODES = {
    50001: "the VM was preempted (Spot or preemptible capacity was reclaimed)",
    50002: "the VM stopped reporting to Batch (lost or unresponsive)",
    50003: "the VM was rebooted while the task was running",
    50004: "the task could not reach Batch's agent (VM unresponsive)",
    50005: "the task ran past its maximum run duration",
    50006: "the VM was deleted or not found while the task was running",
}
EXIT_MAX_RUN_DURATION = 50005  # the attempt ran past the job's maxRunDuration (time_limit)

#: Exit codes whose task fails at once, whatever ``retries`` says: the function raised (another
#: attempt would raise again), nobody waits for the task any more, it has no input, or the
#: attempt ran past ``time_limit`` (Batch would otherwise retry it with the same limit).
#: ``retries`` is for preemptions and other VM faults.
NEVER_RETRIED_EXIT_CODES = (EXIT_USER_ERROR, EXIT_ORPHANED, EXIT_NO_INPUT, EXIT_MAX_RUN_DURATION)

#: A valid Batch job id, the only kind of job id this package makes.
JOB_ID_PATTERN = re.compile(r"[a-z]([a-z0-9-]{0,61}[a-z0-9])?")
#: A bucket prefix: segments of ``A-Z a-z 0-9 . _ -`` joined by '/', none starting with '.'
#: (so no ``.``, ``..`` or hidden folder), no empty segment, no leading or trailing '/'.
_PREFIX_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*")
#: An object name is at most 1,024 bytes; the rest of the longest one (``/{job id of up to 63}
#: /tasks/{index}/{file name}``) takes at most 124, so the prefix may take 900.
MAX_PREFIX_LENGTH = 900


def task_index_of(task_name: str) -> int:
    """The index of a Batch task from its resource name ``.../tasks/{index}``."""
    return int(task_name.rsplit("/", 1)[-1])


def validate_job_id(job_id: str) -> str:
    """Return ``job_id`` if it is a valid Batch job id, else raise ``ValueError``."""
    if not isinstance(job_id, str) or not JOB_ID_PATTERN.fullmatch(job_id):
        raise ValueError(
            f"invalid job id {job_id!r}: it must be 1 to 63 characters of lowercase letters, "
            f"digits and '-', start with a letter and not end with '-'"
        )
    return job_id


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` if it is a safe folder path for job folders, else raise ``ValueError``.

    A safe prefix is segments of ``A-Z a-z 0-9 . _ -`` joined by '/', none empty or starting
    with '.', with no '/' at either end, and at most :data:`MAX_PREFIX_LENGTH` characters. The
    empty prefix puts job folders at the top of the bucket.
    """
    if not isinstance(prefix, str) or (prefix and not _PREFIX_PATTERN.fullmatch(prefix)):
        raise ValueError(
            f"invalid bucket prefix {prefix!r}: use folder names of letters, digits and . _ - "
            "joined by '/', none starting with '.', and no '/' at either end"
        )
    if len(prefix) > MAX_PREFIX_LENGTH:
        raise ValueError(
            f"invalid bucket prefix of {len(prefix)} characters: at most {MAX_PREFIX_LENGTH}, so "
            "that every object name stays within Cloud Storage's 1,024 bytes"
        )
    return prefix


@dataclass(frozen=True)
class TaskRef:
    """Which task an object belongs to; both fields are validated on creation."""

    job_id: str  # the Batch job id the executor made
    index: int  # the task's BATCH_TASK_INDEX, 0 .. taskCount-1

    def __post_init__(self) -> None:
        validate_job_id(self.job_id)
        if isinstance(self.index, bool) or not isinstance(self.index, int) or self.index < 0:
            raise ValueError(f"invalid task index {self.index!r}: it must be an int >= 0")
