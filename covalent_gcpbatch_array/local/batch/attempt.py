"""Running one attempt of one task: the "VM" side of the Batch emulator.

An attempt runs the task spec's runnables in order through the task launcher, each with the
task's environment, its stdout/stderr kept in files, under the attempt's time limits: the
task's ``maxRunDuration`` and each runnable's ``timeout`` (both end the attempt with exit code
50005, as Google does), and an injected fault (a chosen exit code, at start or after a delay).
The result is the attempt's exit code; the scheduler turns it into task states.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal, Protocol

import anyio

from covalent_gcpbatch_array._core.contract import EXIT_MAX_RUN_DURATION
from covalent_gcpbatch_array.local.batch.faults import TaskFault
from covalent_gcpbatch_array.local.batch.spec import JobSpec, RunnableSpec

__all__ = [
    "EXIT_GENERIC_FAILURE",
    "Launcher",
    "TaskProcessHandle",
    "attempt_output",
    "run_attempt",
    "vm_environment",
]

logger = logging.getLogger(__name__)

# Google's reserved exit codes the emulator produces itself (and EXIT_MAX_RUN_DURATION: past
# maxRunDuration or a runnable's timeout).
EXIT_GENERIC_FAILURE = 50000  # the runnable could not be started at all
# How long to wait for a SIGKILLed process to be reaped before giving up on it.
_REAP_TIMEOUT = 5.0


class TaskProcessHandle(Protocol):
    """What the emulator needs of a started task process (``TaskProcess`` of the launcher)."""

    pid: int

    async def wait(self) -> int: ...

    def kill(self) -> None: ...


class Launcher(Protocol):
    """What the emulator needs of the task launcher (``TaskLauncher``)."""

    def container_argv(
        self, image_uri: str, entrypoint: str, commands: Sequence[str]
    ) -> list[str]: ...

    async def start(
        self, argv: Sequence[str], *, env: Mapping[str, str], stdout: Path, stderr: Path
    ) -> TaskProcessHandle: ...


def vm_environment(
    spec: JobSpec,
    *,
    job_id: str,
    job_uid: str,
    index: int,
    attempt: int,
    home: Path,
    storage_endpoint: str,
) -> dict[str, str]:
    """The environment a task of this job sees, before each runnable's own variables.

    The "VM image" provides PATH (the emulator's Python first, so ``python3`` has this
    project's dependencies), HOME and STORAGE_EMULATOR_HOST; the task spec's variables come
    over those; Batch's own ``BATCH_*`` variables come last and cannot be overridden.
    """
    python_bin = str(Path(sys.executable).parent)
    env = {
        "PATH": os.pathsep.join([python_bin, os.environ.get("PATH", os.defpath)]),
        "HOME": str(home),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "STORAGE_EMULATOR_HOST": storage_endpoint,
    }
    env.update(spec.environment)
    env.update(
        {
            "BATCH_TASK_INDEX": str(index),
            "BATCH_TASK_COUNT": str(spec.task_count),
            "BATCH_TASK_RETRY_ATTEMPT": str(attempt),
            "BATCH_JOB_ID": job_id,
            "BATCH_JOB_UID": job_uid,
        }
    )
    return env


async def run_attempt(
    launcher: Launcher,
    spec: JobSpec,
    *,
    env: Mapping[str, str],
    output_dir: Path,
    fault: TaskFault | None,
    on_running: Callable[[], None],
) -> int:
    """Run one attempt and return its exit code.

    :param env: the task's environment (see :func:`vm_environment`)
    :param output_dir: the attempt's folder (it must exist); runnable k writes ``k.stdout``
        and ``k.stderr`` there
    :param fault: an injected failure: at start (no process runs) or after ``after_seconds``;
        its exit code replaces the process's own either way
    :param on_running: called when the first process is about to start (task RUNNING)
    """
    if fault is not None and fault.after_seconds == 0:
        return fault.exit_code
    limit, limit_code = math.inf, EXIT_MAX_RUN_DURATION
    if spec.max_run_duration is not None:
        limit = spec.max_run_duration
    if fault is not None and fault.after_seconds < limit:
        limit, limit_code = fault.after_seconds, fault.exit_code
    on_running()
    with anyio.move_on_after(limit) as limit_scope:
        exit_code = await _run_runnables(launcher, spec.runnables, env, output_dir)
    if limit_scope.cancelled_caught:
        return limit_code
    if fault is not None:
        # The "VM" was lost: whatever the process said, Batch reports the fault's code.
        return fault.exit_code
    return exit_code


async def _run_runnables(
    launcher: Launcher,
    runnables: Sequence[RunnableSpec],
    env: Mapping[str, str],
    output_dir: Path,
) -> int:
    """Run the runnables in order; the first failing one's exit code is the attempt's."""
    failure: int | None = None
    background: list[TaskProcessHandle] = []
    try:
        for k, runnable in enumerate(runnables):
            if runnable.argv is None or (failure is not None and not runnable.always_run):
                continue
            process = await _start(launcher, runnable, k, env, output_dir)
            if process is None:
                code: int | None = EXIT_GENERIC_FAILURE
            elif runnable.background:
                background.append(process)
                continue
            else:
                code = await _wait(process, runnable.timeout)
                if code is None:
                    code = EXIT_MAX_RUN_DURATION
            if code != 0 and not runnable.ignore_exit_status and failure is None:
                failure = code
    finally:
        for process in background:
            process.kill()
        with anyio.CancelScope(shield=True), anyio.move_on_after(_REAP_TIMEOUT):
            for process in background:
                await process.wait()
    return failure or 0


async def _start(
    launcher: Launcher, runnable: RunnableSpec, k: int, env: Mapping[str, str], output_dir: Path
) -> TaskProcessHandle | None:
    """Start one runnable; on a launcher failure, note it in its stderr file and return None."""
    assert runnable.argv is not None
    stderr = output_dir / f"{k}.stderr"
    try:
        return await launcher.start(
            runnable.argv,
            env={**env, **runnable.environment, **_batch_variables(env)},
            stdout=output_dir / f"{k}.stdout",
            stderr=stderr,
        )
    except Exception as exc:
        # A runnable that cannot start fails its task, never the emulator.
        logger.warning("could not start %s %s: %r", runnable.label, list(runnable.argv), exc)
        with stderr.open("a") as file:
            file.write(f"Batch emulator: could not start {runnable.label}:\n")
            file.write("".join(traceback.format_exception(exc)))
        return None


def _batch_variables(env: Mapping[str, str]) -> dict[str, str]:
    return {key: value for key, value in env.items() if key.startswith("BATCH_")}


async def _wait(process: TaskProcessHandle, time_limit: float | None) -> int | None:
    """The process's exit code, or None if it ran past ``time_limit`` (it is then killed).

    If the caller is cancelled (max run duration, a fault, the job deleted, shutdown), the
    process is killed and reaped before the cancellation goes on.
    """
    try:
        with anyio.move_on_after(math.inf if time_limit is None else time_limit):
            return await process.wait()
    except BaseException:
        await _kill(process)
        raise
    await _kill(process)
    return None


async def _kill(process: TaskProcessHandle) -> None:
    process.kill()
    with anyio.CancelScope(shield=True), anyio.move_on_after(_REAP_TIMEOUT):
        await process.wait()


def attempt_output(output_dir: Path, stream: Literal["stdout", "stderr"]) -> str | None:
    """An attempt's captured output (its runnables' in order), or None if it ran no process."""
    files = sorted(output_dir.glob(f"*.{stream}"), key=lambda path: int(path.name.split(".")[0]))
    if not files:
        return None
    return "".join(path.read_text(errors="replace") for path in files)
