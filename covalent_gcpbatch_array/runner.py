"""The task side: what ``python -m covalent_gcpbatch_array.runner`` does in each Batch task.

Task ``i`` of a job reads its own input envelope from ``{job folder}/tasks/{i}/input.pkl``,
runs the function in the main thread with its stdout and stderr captured, and writes
``result.pkl`` (exit 0) or ``error.pkl`` (exit 3) next to it, never overwriting either. Both
carry what the function printed; ``stdout`` and ``stderr`` copies are kept beside them when it
printed anything.

Exit codes (defined in :mod:`._core.contract`; the job's lifecycle policy maps
``EXIT_USER_ERROR`` to FAIL_TASK):

- ``EXIT_OK`` (0): the result is written, or there was nothing to do (the task is cancelled,
  or an earlier attempt already wrote its result);
- ``EXIT_USER_ERROR`` (3): ``error.pkl`` is written: the function raised, or the input
  cannot run in this image (versions, missing modules, a tampered input). Retrying cannot help;
- ``EXIT_ORPHANED`` (4): the job's lease is older than ``CGA_ORPHAN_TIMEOUT_SECONDS``: the
  executor that owns the job is gone, nobody will take the result; never retried;
- ``EXIT_NO_INPUT`` (5): the task has no input (its upload failed, or the job was cleaned up);
  never retried;
- anything else, e.g. ``EXIT_INFRA_ERROR`` (1): an infrastructure failure (storage down
  after retries, a bad task environment): Batch may retry the task.

Stopping: a watcher thread checks the ``cancelled`` marker, and the job's lease, every
``CGA_CANCEL_POLL_SECONDS``. When the marker appears or the lease is too old, the watcher sends
SIGUSR1 to the main thread, whose handler raises :class:`TaskCancelled` inside the function
(this interrupts sleeps and waits on subprocesses too); the runner then uploads the outputs and
exits without writing an outcome: 0 when cancelled, ``EXIT_ORPHANED`` when orphaned. A function
that swallows that exception, or is stuck in C code, gets ``CGA_CANCEL_GRACE_SECONDS``
(default 5) before the watcher ends the process with ``os._exit``.
The function stays in the main thread, where signals, ``signal.alarm`` and C libraries that
assume the main thread behave as they would locally.

Storage: every request is retried by google-cloud-storage's ``DEFAULT_RETRY`` (429, 5xx,
dropped connections, for up to 120 s); what still fails ends the task as an infrastructure
failure. The outcome is written with ``if_generation_match=0``, which makes its retries safe
too: a 412 means the object is there, ours (an answer lost in transit) or another attempt's,
and the runner exits as the recorded outcome says. Once it is recorded the process ends with
``os._exit``, so threads the function left running cannot keep the VM alive.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from types import FrameType
from typing import Any, NoReturn, TextIO

from covalent_gcpbatch_array._core import contract
from covalent_gcpbatch_array._core.clients import make_storage_client
from covalent_gcpbatch_array._core.contract import TaskRef
from covalent_gcpbatch_array._core.envelopes import (
    TaskInput,
    decode_input,
    encode_error,
    encode_result,
    parse_job_key,
)
from covalent_gcpbatch_array._core.output_capture import OutputCapture
from covalent_gcpbatch_array._core.storage import (
    JobLayout,
    TaskObject,
    TaskOutcome,
    TaskStore,
)
from covalent_gcpbatch_array.exceptions import (
    ElectronResultError,
    ResultIntegrityError,
    StorageError,
    TaskEnvironmentError,
)

__all__ = ["RunnerSettings", "TaskCancelled", "main"]

_DEFAULT_CANCEL_POLL = 2.0
_DEFAULT_CANCEL_GRACE = 5.0


class TaskCancelled(BaseException):
    """Raised in the function's thread when the executor cancels the task.

    A BaseException, like KeyboardInterrupt, so that ``except Exception`` in user code lets
    it through.
    """


class _RunnerSetupError(Exception):
    """The task's environment is incomplete or invalid (an executor bug, or a hand-made job)."""


def _read(environ: Mapping[str, str], name: str, parse: Callable[[str], Any], default: Any) -> Any:
    text = environ.get(name, "").strip()
    if not text:
        if default is None:
            raise _RunnerSetupError(f"{name} is not set")
        return default
    try:
        return parse(text)
    except ValueError as exc:
        # Never echo the key's value into logs.
        shown = "(hidden)" if name == contract.ENV_HMAC_KEY else repr(text)
        raise _RunnerSetupError(f"{name}={shown} is invalid: {exc}") from exc


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("it must be a number > 0")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError("it must be a number >= 0")
    return value


@dataclass(frozen=True)
class RunnerSettings:
    """What the runner reads from its environment."""

    bucket: str  # CGA_BUCKET
    layout: JobLayout  # from CGA_JOB_PREFIX
    index: int  # BATCH_TASK_INDEX
    attempt: int  # BATCH_TASK_RETRY_ATTEMPT (0 on the first attempt)
    key: bytes  # from CGA_HMAC_KEY
    cancel_poll_seconds: float  # CGA_CANCEL_POLL_SECONDS
    cancel_grace_seconds: float  # CGA_CANCEL_GRACE_SECONDS
    orphan_timeout: float  # CGA_ORPHAN_TIMEOUT_SECONDS (0: never stop for an old lease)

    @property
    def task(self) -> TaskRef:
        """This task."""
        return TaskRef(self.layout.job_id, self.index)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> RunnerSettings:
        """Read and validate the settings.

        :raises _RunnerSetupError: a variable is missing or invalid
        """
        settings = cls(
            bucket=_read(environ, contract.ENV_BUCKET, str, None),
            layout=_read(environ, contract.ENV_JOB_PREFIX, JobLayout.from_folder, None),
            index=_read(environ, contract.ENV_TASK_INDEX, int, None),
            attempt=_read(environ, contract.ENV_TASK_ATTEMPT, int, 0),
            key=_read(environ, contract.ENV_HMAC_KEY, parse_job_key, None),
            cancel_poll_seconds=_read(
                environ, contract.ENV_CANCEL_POLL, _positive, _DEFAULT_CANCEL_POLL
            ),
            cancel_grace_seconds=_read(
                environ, contract.ENV_CANCEL_GRACE, _positive, _DEFAULT_CANCEL_GRACE
            ),
            orphan_timeout=_read(environ, contract.ENV_ORPHAN_TIMEOUT, _non_negative, 0.0),
        )
        try:
            TaskRef(settings.layout.job_id, settings.index)
        except ValueError as exc:
            raise _RunnerSetupError(f"{contract.ENV_TASK_INDEX} is invalid: {exc}") from exc
        return settings


class _Log:
    """The runner's own messages, on the process's real stderr (never in the captured one)."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._stream: TextIO = os.fdopen(os.dup(2), "w", buffering=1, closefd=True)

    def __call__(self, message: str) -> None:
        with contextlib.suppress(OSError, ValueError):  # nowhere left to report to
            self._stream.write(f"[cga-runner {self._prefix}] {message}\n")

    def close(self) -> None:
        self._stream.close()


@dataclass(frozen=True)
class _Stop:
    """Why the task must stop before its function ends, and the exit code that says so."""

    exit_code: int
    why: str


def _why_stop(store: TaskStore, settings: RunnerSettings) -> _Stop | None:
    """Whether the task must stop: its cancel marker is set, or its job is orphaned."""
    if store.exists(settings.task, TaskObject.CANCELLED):
        return _Stop(contract.EXIT_OK, "cancel marker found")
    return _orphaned(store, settings)


def _orphaned(store: TaskStore, settings: RunnerSettings) -> _Stop | None:
    """A stop when the job's lease is older than ``orphan_timeout`` (or missing), else None."""
    timeout = settings.orphan_timeout
    if not timeout:
        return None
    age = store.lease_age(settings.layout.job_id, datetime.now(timezone.utc))
    if age is not None and age <= timeout:
        return None
    lease = "has no lease" if age is None else f"has a lease last renewed {age:.0f} s ago"
    return _Stop(
        contract.EXIT_ORPHANED,
        f"orphaned: job {settings.layout.job_id} {lease} (orphan_timeout={timeout:g} s): the "
        "executor that owns it is gone and nobody will take this task's result",
    )


class _CancelWatcher:
    """Checks for a reason to stop in a daemon thread and interrupts the main thread."""

    def __init__(
        self, why_stop: Callable[[], _Stop | None], settings: RunnerSettings, log: _Log
    ) -> None:
        self._why_stop = why_stop
        self._poll = settings.cancel_poll_seconds
        self._grace = settings.cancel_grace_seconds
        self._log = log
        self._armed = False  # True while the function runs: the handler may raise then
        self.stop: _Stop | None = None  # why the function was stopped, once it was
        self._finished = threading.Event()  # the function returned or raised: stand down
        self._main = threading.main_thread().ident
        self._can_signal = False  # our SIGUSR1 handler is installed (we run in the main thread)
        self._give_up: Callable[[int], None] = lambda exit_code: None
        self._thread = threading.Thread(target=self._watch, name="cga-cancel-watcher", daemon=True)

    def call(
        self, give_up: Callable[[int], None], fn: Callable[..., Any], *args: Any, **kw: Any
    ) -> Any:
        """Run ``fn`` in this (main) thread while watching; ``give_up`` runs on a hard stop."""
        self._give_up = give_up
        if threading.current_thread() is threading.main_thread():
            # Left installed afterwards: a late SIGUSR1 must find this no-op, not the default
            # action (which would kill the process).
            signal.signal(signal.SIGUSR1, self._on_signal)
            self._can_signal = True
        self._thread.start()
        self._armed = True
        try:
            return fn(*args, **kw)
        finally:
            self._armed = False
            self._finished.set()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Runs in the main thread between two bytecodes; only interrupt the function itself.
        if self._armed:
            self._armed = False
            raise TaskCancelled()

    def _watch(self) -> None:
        failures = 0
        while not self._finished.wait(self._poll):
            try:
                stop = self._why_stop()
            except StorageError as exc:
                failures += 1
                if failures == 1:
                    self._log(f"cannot check the cancel marker (will keep trying): {exc}")
                continue
            if stop is not None:
                break
        else:
            return
        self.stop = stop
        self._log(f"{stop.why}: stopping the function")
        if self._armed and self._can_signal and self._main is not None:
            signal.pthread_kill(self._main, signal.SIGUSR1)
        if not self._finished.wait(self._grace):
            self._log(f"the function did not stop within {self._grace:g} s: ending the process")
            self._give_up(stop.exit_code)


def _hard_stop(
    capture: OutputCapture, store: TaskStore, settings: RunnerSettings, log: _Log, exit_code: int
) -> None:
    """Upload what the function printed so far and end the process (stopped, grace over)."""
    try:
        _upload_streams(store, settings, *capture.snapshot())
    except Exception as exc:
        log(f"could not upload the outputs: {exc}")
    log.close()
    os._exit(exit_code)


def _upload_streams(
    store: TaskStore, settings: RunnerSettings, stdout: bytes, stderr: bytes
) -> None:
    """Keep what this attempt printed in its folder, for people and `gcpbatch-array logs`.

    The executor reads the streams from the result or error envelope; these copies are written
    only when there is something in them (two requests fewer for a quiet task), under names of
    this attempt's own (``stdout.{attempt}``): a task never replaces an object.
    """
    for obj, data in ((TaskObject.STDOUT, stdout), (TaskObject.STDERR, stderr)):
        if data:
            store.write_output(settings.task, obj, settings.attempt, data)


def _record_failure(
    store: TaskStore,
    settings: RunnerSettings,
    exc: BaseException,
    streams: tuple[bytes, bytes] = (b"", b""),
) -> int:
    stdout, stderr = streams
    data = encode_error(exc, key=settings.key, task=settings.task, stdout=stdout, stderr=stderr)
    # A result recorded meanwhile (an earlier attempt thought lost) wins: keep one outcome.
    if TaskOutcome.of(store.task_objects(settings.task)) is TaskOutcome.SUCCEEDED:
        return contract.EXIT_OK
    if store.write_if_absent(settings.task, TaskObject.ERROR, data):
        return contract.EXIT_USER_ERROR
    return _settled_exit(store, settings.task)


def _settled_exit(store: TaskStore, task: TaskRef) -> int:
    """Exit as the outcome already recorded says (another attempt won the race)."""
    outcome = TaskOutcome.of(store.task_objects(task))
    return {
        TaskOutcome.SUCCEEDED: contract.EXIT_OK,
        TaskOutcome.CANCELLED: contract.EXIT_OK,
        TaskOutcome.FAILED: contract.EXIT_USER_ERROR,
    }.get(outcome, contract.EXIT_INFRA_ERROR)


def _run_task(settings: RunnerSettings, store: TaskStore, watch_store: TaskStore, log: _Log) -> int:
    """Run this task once and return the process exit code.

    :param store: used by the main thread
    :param watch_store: used by the cancel watcher thread (a client of its own)
    :raises StorageError: the bucket failed after the client's retries
    """
    task = settings.task
    outcome = TaskOutcome.of(store.task_objects(task))
    if outcome is not TaskOutcome.UNFINISHED:
        log(f"already {outcome.value}: nothing to do")
        return contract.EXIT_USER_ERROR if outcome is TaskOutcome.FAILED else contract.EXIT_OK
    if (stop := _orphaned(store, settings)) is not None:
        log(f"{stop.why}: not running the function")
        return stop.exit_code
    data = store.download(task, TaskObject.INPUT)
    if data is None:
        name = settings.layout.object_name(task.index, TaskObject.INPUT)
        log(
            f"no input at gs://{settings.bucket}/{name}: its upload failed or the job was "
            "cleaned up; nothing to run (never retried)"
        )
        return contract.EXIT_NO_INPUT
    try:
        task_input = decode_input(data, key=settings.key, task=task)
    except (ResultIntegrityError, TaskEnvironmentError) as exc:
        log(f"refusing the input: {exc}")
        return _record_failure(store, settings, exc)
    del data  # a large input should not be held twice while the function runs
    log(f"running {task_input.origin} (attempt {settings.attempt})")
    run = _call_watched(task_input, settings, watch_store, log)
    del task_input

    _upload_streams(store, settings, run.stdout, run.stderr)
    if run.stop is not None:
        log(f"{run.stop.why}: no outcome written")
        return run.stop.exit_code
    error = run.error
    if error is None:
        try:
            result = encode_result(
                run.value, key=settings.key, task=task, stdout=run.stdout, stderr=run.stderr
            )
        except ElectronResultError as exc:
            error = exc
        else:
            run.value = None
            if store.write_if_absent(task, TaskObject.RESULT, result):
                return contract.EXIT_OK
            return _settled_exit(store, task)
    # The traceback goes to the task's log too: once the executor deleted error.pkl, Cloud
    # Logging is where `gcpbatch-array logs` finds it.
    trace = "".join(traceback.format_exception(error)).rstrip("\n")
    log(f"the function raised {type(error).__name__}: writing error.pkl\n{trace}")
    return _record_failure(store, settings, error, (run.stdout, run.stderr))


@dataclass
class _Run:
    """How one call of the function went."""

    value: Any  # what it returned (None if it raised)
    error: BaseException | None  # what it raised, if it did
    stop: _Stop | None  # why the function was stopped (cancelled, orphaned): record no outcome
    stdout: bytes  # what it wrote to file descriptor 1
    stderr: bytes  # what it wrote to file descriptor 2


def _call_watched(
    task_input: TaskInput, settings: RunnerSettings, watch_store: TaskStore, log: _Log
) -> _Run:
    """Call the function in this thread, outputs captured, while watching for a cancel."""
    watcher = _CancelWatcher(lambda: _why_stop(watch_store, settings), settings, log)
    value: Any = None
    error: BaseException | None = None
    with OutputCapture() as capture:
        try:
            value = watcher.call(
                lambda exit_code: _hard_stop(capture, watch_store, settings, log, exit_code),
                task_input.fn,
                *task_input.args,
                **task_input.kwargs,
            )
        except TaskCancelled:
            pass
        except BaseException as exc:  # SystemExit and KeyboardInterrupt are the user's too
            error = exc
    return _Run(value, error, watcher.stop, capture.stdout, capture.stderr)


def main(environ: Mapping[str, str] | None = None) -> int:
    """The runner's entry point: returns the exit code."""
    environ = os.environ if environ is None else environ
    log = _Log(f"task {environ.get(contract.ENV_TASK_INDEX, '?')}")
    try:
        settings = RunnerSettings.from_environ(environ)
    except _RunnerSetupError as exc:
        log(f"cannot start: {exc}")
        return contract.EXIT_INFRA_ERROR
    # The function and its subprocesses have no use for the key: keep it out of their reach.
    os.environ.pop(contract.ENV_HMAC_KEY, None)
    try:
        store = TaskStore(make_storage_client(None), settings.bucket, settings.layout.prefix)
        watch_store = TaskStore(make_storage_client(None), settings.bucket, settings.layout.prefix)
        return _run_task(settings, store, watch_store, log)
    except StorageError as exc:
        log(f"storage failed (Batch may retry this task): {exc}")
        return contract.EXIT_INFRA_ERROR
    except Exception:
        log(f"unexpected runner failure (Batch may retry this task):\n{traceback.format_exc()}")
        return contract.EXIT_INFRA_ERROR
    finally:
        log.close()


def _exit_now(code: int) -> NoReturn:
    """End the process once the outcome is recorded, without the interpreter's shutdown.

    A normal exit joins every non-daemon thread the function left behind (and runs its atexit
    hooks): one forgotten thread would keep the task, and its VM, alive until the time limit.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit_now(main())
