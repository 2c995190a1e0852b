"""Tests of the task runner: real subprocesses against a real fake-gcs-server."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from google.cloud import batch_v1, storage
from test_storage import ScriptedProxy  # a sibling test module (pytest puts tests/ on sys.path)

from covalent_gcpbatch_array._core import contract
from covalent_gcpbatch_array._core.clients import make_storage_client
from covalent_gcpbatch_array._core.contract import (
    EXIT_INFRA_ERROR,
    EXIT_NO_INPUT,
    EXIT_OK,
    EXIT_ORPHANED,
    EXIT_USER_ERROR,
    NEVER_RETRIED_EXIT_CODES,
    TaskRef,
)
from covalent_gcpbatch_array._core.envelopes import (
    ElectronOrigin,
    RuntimeVersions,
    TaskFailure,
    TaskResult,
    decode_error,
    decode_result,
    encode_error,
    encode_input,
    encode_result,
    new_job_key,
)
from covalent_gcpbatch_array._core.jobs import build_job, new_job_id
from covalent_gcpbatch_array._core.storage import (
    JobLayout,
    TaskObject,
    TaskStore,
)
from covalent_gcpbatch_array.config import ExecutorConfig
from covalent_gcpbatch_array.exceptions import (
    ElectronResultError,
    LocalCloudError,
    RemoteTaskError,
    ResultIntegrityError,
    TaskEnvironmentError,
)
from covalent_gcpbatch_array.local import LocalCloud
from covalent_gcpbatch_array.local.gcs.fake_gcs import GcsEmulator
from tests.polling import job_reached, wait_until

# The functions below run in the runner's process, where this module cannot be imported.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

ORIGIN = ElectronOrigin("dispatch-runner", 5)
_RUN_TIMEOUT = 120.0  # a hung runner fails the test instead of hanging the suite


@pytest.fixture(scope="module")
def gcs_endpoint() -> Iterator[str]:
    with GcsEmulator.start() as gcs:
        yield gcs.endpoint


@pytest.fixture(scope="module")
def client(gcs_endpoint: str) -> Iterator[storage.Client]:
    client = make_storage_client("test-project", gcs_endpoint)
    yield client
    client.close()


@dataclass
class Job:
    """One job's folder in a fresh bucket, and how to run its tasks' runner."""

    endpoint: str  # the fake-gcs-server
    store: TaskStore  # the executor's view of the bucket
    layout: JobLayout  # the job's object names
    key: bytes = field(default_factory=new_job_key)  # the job's HMAC key

    def task(self, index: int = 0) -> TaskRef:
        return TaskRef(self.layout.job_id, index)

    def submit(
        self,
        fn: Callable[..., Any],
        *args: Any,
        index: int = 0,
        versions: RuntimeVersions | None = None,
        **kwargs: Any,
    ) -> TaskRef:
        task = self.task(index)
        data = encode_input(
            fn, args, kwargs, key=self.key, task=task, origin=ORIGIN, versions=versions
        )
        self.store.upload_input(task, data)
        return task

    def environment(self, index: int = 0, **extra: str) -> dict[str, str]:
        env = {
            "PATH": os.environ["PATH"],
            "HOME": os.environ.get("HOME", "/tmp"),
            "STORAGE_EMULATOR_HOST": self.endpoint,
            "BATCH_TASK_INDEX": str(index),
            "BATCH_TASK_COUNT": "100",
            "BATCH_TASK_RETRY_ATTEMPT": "0",
            contract.ENV_BUCKET: self.store.bucket_name,
            contract.ENV_JOB_PREFIX: self.layout.folder,
            contract.ENV_HMAC_KEY: self.key.hex(),
            contract.ENV_CANCEL_POLL: "0.2",
        }
        env.update(extra)
        return env

    def start(self, index: int = 0, **extra: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "covalent_gcpbatch_array.runner"],
            env=self.environment(index, **extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def run(self, index: int = 0, **extra: str) -> subprocess.CompletedProcess[str]:
        process = self.start(index, **extra)
        stdout, stderr = process.communicate(timeout=_RUN_TIMEOUT)
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)

    def objects(self, index: int = 0) -> frozenset[TaskObject]:
        return self.store.task_objects(self.task(index))

    def recorded(self, index: int = 0) -> TaskResult:
        data = self.store.download(self.task(index), TaskObject.RESULT)
        assert data is not None, "no result.pkl"
        return decode_result(data, key=self.key, task=self.task(index))

    def result(self, index: int = 0) -> Any:
        return self.recorded(index).value

    def failure(self, index: int = 0) -> TaskFailure:
        data = self.store.download(self.task(index), TaskObject.ERROR)
        assert data is not None, "no error.pkl"
        return decode_error(data, key=self.key, task=self.task(index))

    def output(self, obj: TaskObject, index: int = 0) -> str:
        data = self.store.read_output(self.task(index), obj)
        assert data is not None, f"no {obj.value} object"
        return data.decode()


@pytest.fixture
def job(gcs_endpoint: str, client: storage.Client) -> Job:
    bucket = f"cga-runner-{uuid.uuid4().hex[:10]}"
    client.create_bucket(bucket)
    store = TaskStore(client, bucket, "runs")
    return Job(gcs_endpoint, store, store.layout(f"job-{uuid.uuid4().hex[:8]}"))


def _wait_for(path: Path, process: subprocess.Popen[str]) -> None:
    """Wait until the task's function creates ``path`` (an external process: poll it)."""

    def appeared() -> bool:
        if path.exists():
            return True
        assert process.poll() is None, f"the runner exited early: {process.communicate()}"
        return False

    wait_until(appeared, what=str(path), timeout=_RUN_TIMEOUT)


# Functions run by the runner (pickled by value).


def add(a: int, b: int, *, marker: str) -> int:
    Path(marker).write_text("ran")
    print(f"adding {a} and {b}")
    return a + b


def ignore(*args: Any) -> None:
    return None


def touch(path: str) -> None:
    with open(path, "a") as file:
        file.write("ran\n")


def raise_value_error(message: str) -> None:
    print("about to fail")
    raise ValueError(message)


def exit_zero() -> None:
    sys.exit(0)


def return_generator() -> Any:
    return (x for x in range(3))


class NeedsTwoArgs(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def raise_needs_two_args() -> None:
    raise NeedsTwoArgs("cannot rebuild me", 7)


def chatter() -> str:
    print("print to stdout")
    print("print to stderr", file=sys.stderr)
    os.write(1, b"raw fd 1\n")
    subprocess.run(["sh", "-c", "echo child stdout; echo child stderr >&2"], check=True)
    return "done"


def sleep_until_cancelled(started: str, finished: str, swallow: bool) -> None:
    print("before the cancel", flush=True)
    Path(started).touch()
    try:
        time.sleep(600)
    except BaseException:
        if not swallow:
            raise
        print("swallowed the cancel", flush=True)
        time.sleep(600)
    Path(finished).touch()


def finish_elsewhere_then(
    endpoint: str, bucket: str, name: str, other: bytes, then_raise: bool
) -> str:
    """Record another attempt's outcome at ``name`` while this attempt still runs."""
    client = make_storage_client("p", endpoint)
    client.bucket(bucket).blob(name).upload_from_string(other, if_generation_match=0)
    client.close()
    if then_raise:
        raise RuntimeError("this attempt failed too late")
    return "this attempt's result"


def leave_a_thread_behind() -> str:
    threading.Thread(target=time.sleep, args=(600,), daemon=False).start()
    return "returned"


def read_key_from_environment() -> str | None:
    return os.environ.get(contract.ENV_HMAC_KEY)


class Tripwire:
    """Unpickling one creates ``path``: proves whether an input was ever unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return Path.touch, (Path(self.path),)


class TestOutcomes:
    def test_success_writes_the_result(self, job: Job, tmp_path: Path) -> None:
        marker = tmp_path / "ran"
        job.submit(add, 2, 3, marker=str(marker))
        done = job.run()
        assert done.returncode == EXIT_OK, done.stderr
        assert job.recorded() == TaskResult(5, stdout="adding 2 and 3\n", stderr="")
        assert marker.read_text() == "ran"
        # A copy of what it printed is kept beside the result; nothing for an empty stream.
        assert job.objects() == {TaskObject.INPUT, TaskObject.RESULT, TaskObject.STDOUT}
        assert job.output(TaskObject.STDOUT) == "adding 2 and 3\n"

    def test_quiet_success_writes_only_the_result(self, job: Job) -> None:
        job.submit(ignore)
        assert job.run().returncode == EXIT_OK
        assert job.objects() == {TaskObject.INPUT, TaskObject.RESULT}
        assert job.recorded() == TaskResult(None, stdout="", stderr="")

    def test_user_exception(self, job: Job) -> None:
        job.submit(raise_value_error, "bad input 42")
        done = job.run()
        assert done.returncode == EXIT_USER_ERROR, done.stderr
        failure = job.failure()
        assert type(failure.exception) is ValueError
        assert str(failure.exception) == "bad input 42"
        assert failure.type_name == "builtins.ValueError"
        assert "raise_value_error" in failure.traceback_text
        assert "ValueError: bad input 42" in failure.traceback_text
        assert (failure.stdout, failure.stderr) == ("about to fail\n", "")
        assert TaskObject.RESULT not in job.objects()

    def test_sys_exit_in_the_function_is_a_user_error(self, job: Job) -> None:
        job.submit(exit_zero)
        done = job.run()
        assert done.returncode == EXIT_USER_ERROR, done.stderr
        assert type(job.failure().exception) is SystemExit

    def test_unpicklable_result(self, job: Job) -> None:
        job.submit(return_generator)
        done = job.run()
        assert done.returncode == EXIT_USER_ERROR, done.stderr
        exc = job.failure().to_exception()
        assert isinstance(exc, ElectronResultError)
        assert "cannot be pickled" in str(exc)
        assert f"task 0 of job {job.layout.job_id}" in str(exc)

    def test_exception_that_cannot_be_rebuilt(self, job: Job) -> None:
        job.submit(raise_needs_two_args)
        done = job.run()
        assert done.returncode == EXIT_USER_ERROR, done.stderr
        failure = job.failure()
        assert failure.exception is None
        exc = failure.to_exception()
        assert isinstance(exc, RemoteTaskError)
        assert exc.type_name.endswith("NeedsTwoArgs")
        assert exc.message == "cannot rebuild me"
        assert "raise_needs_two_args" in exc.traceback_text

    def test_a_leftover_thread_does_not_hold_the_task(self, job: Job) -> None:
        job.submit(leave_a_thread_behind)
        done = job.run()  # without the runner's hard exit this waits 600 s, past the timeout
        assert done.returncode == EXIT_OK, done.stderr
        assert job.result() == "returned"

    def test_the_key_is_not_in_the_function_environment(self, job: Job) -> None:
        job.submit(read_key_from_environment)
        done = job.run()
        assert done.returncode == EXIT_OK, done.stderr
        assert job.result() is None
        assert job.key.hex() not in done.stdout + done.stderr


class TestOutputs:
    def test_fd_level_capture_with_live_echo(self, job: Job) -> None:
        job.submit(chatter)
        done = job.run()
        assert done.returncode == EXIT_OK, done.stderr
        stdout = job.output(TaskObject.STDOUT)
        stderr = job.output(TaskObject.STDERR)
        assert job.recorded() == TaskResult("done", stdout=stdout, stderr=stderr)
        for line in ("print to stdout", "raw fd 1", "child stdout"):
            assert line in stdout
            assert line in done.stdout  # still echoed for Cloud Logging
        for line in ("print to stderr", "child stderr"):
            assert line in stderr
            assert line in done.stderr
        assert "child stderr" not in stdout
        assert "cga-runner" not in stderr  # the runner's own log lines are not the task's


class TestSkips:
    def test_cancelled_before_start(self, job: Job, tmp_path: Path) -> None:
        ran = tmp_path / "ran"
        task = job.submit(touch, str(ran))
        job.store.write_cancelled(task)
        done = job.run()
        assert done.returncode == EXIT_OK, done.stderr
        assert not ran.exists()
        assert job.objects() == {TaskObject.INPUT, TaskObject.CANCELLED}

    def test_result_already_there(self, job: Job, tmp_path: Path) -> None:
        runs = tmp_path / "runs"
        task = job.submit(touch, str(runs))
        first = job.run()
        assert first.returncode == EXIT_OK, first.stderr
        stored = job.store.download(task, TaskObject.RESULT)
        again = job.run(BATCH_TASK_RETRY_ATTEMPT="1")
        assert again.returncode == EXIT_OK, again.stderr
        assert runs.read_text() == "ran\n"  # one run only
        assert job.store.download(task, TaskObject.RESULT) == stored

    def test_error_already_there(self, job: Job, tmp_path: Path) -> None:
        ran = tmp_path / "ran"
        task = job.submit(touch, str(ran))
        job.store.write_if_absent(
            task, TaskObject.ERROR, encode_error(ValueError("x"), key=job.key, task=task)
        )
        done = job.run()
        assert done.returncode == EXIT_USER_ERROR, done.stderr
        assert not ran.exists()


class TestRaces:
    def test_result_written_by_another_attempt_meanwhile(self, job: Job) -> None:
        task = job.task()
        other = encode_result("the other attempt's result", key=job.key, task=task)
        name = job.layout.object_name(task.index, TaskObject.RESULT)
        job.submit(finish_elsewhere_then, job.endpoint, job.store.bucket_name, name, other, False)
        done = job.run()
        assert done.returncode == EXIT_OK, done.stderr
        assert job.result() == "the other attempt's result"
        assert TaskObject.ERROR not in job.objects()

    def test_error_written_by_another_attempt_meanwhile(self, job: Job) -> None:
        task = job.task()
        other = encode_error(KeyError("the other attempt's error"), key=job.key, task=task)
        name = job.layout.object_name(task.index, TaskObject.ERROR)
        job.submit(finish_elsewhere_then, job.endpoint, job.store.bucket_name, name, other, True)
        done = job.run()
        assert done.returncode == EXIT_USER_ERROR, done.stderr
        assert type(job.failure().exception) is KeyError

    def test_failure_after_another_attempt_succeeded(self, job: Job) -> None:
        task = job.task()
        other = encode_result("first attempt", key=job.key, task=task)
        name = job.layout.object_name(task.index, TaskObject.RESULT)
        job.submit(finish_elsewhere_then, job.endpoint, job.store.bucket_name, name, other, True)
        done = job.run()
        assert done.returncode == EXIT_OK, done.stderr
        assert job.result() == "first attempt"
        assert TaskObject.ERROR not in job.objects()


class TestRefusedInputs:
    def test_version_mismatch(self, job: Job, tmp_path: Path) -> None:
        server = RuntimeVersions(python="3.99", covalent="0.1.0", cloudpickle="3.0.0")
        tripwire = tmp_path / "unpickled"
        job.submit(ignore, Tripwire(str(tripwire)), versions=server)
        done = job.run()
        assert done.returncode == EXIT_USER_ERROR, done.stderr
        exc = job.failure().to_exception()
        assert isinstance(exc, TaskEnvironmentError)
        here = RuntimeVersions.current()
        for text in ("3.99", "0.1.0", here.python, here.covalent, "runner_image/README.md"):
            assert text in str(exc)
        assert not tripwire.exists()

    @pytest.mark.parametrize("how", ["altered header", "another job's key"])
    def test_tampered_input_is_never_unpickled(self, job: Job, tmp_path: Path, how: str) -> None:
        tripwire = tmp_path / "unpickled"
        task = job.task()
        if how == "another job's key":
            data = encode_input(
                ignore, (Tripwire(str(tripwire)),), {}, key=new_job_key(), task=task, origin=ORIGIN
            )
        else:
            good = encode_input(
                ignore, (Tripwire(str(tripwire)),), {}, key=job.key, task=task, origin=ORIGIN
            )
            data = good.replace(ORIGIN.dispatch_id.encode(), b"dispatch-forged")
            assert data != good
        job.store.upload_input(task, data)
        done = job.run()
        assert done.returncode == EXIT_USER_ERROR, done.stderr
        exc = job.failure().to_exception()
        assert isinstance(exc, ResultIntegrityError)
        assert "not unpickled" in str(exc)
        assert not tripwire.exists()
        # The tripwire does fire when an intact input is unpickled.
        job.store.delete_tasks(task.job_id)
        job.submit(ignore, Tripwire(str(tripwire)))
        assert job.run().returncode == EXIT_OK
        assert tripwire.exists()


class TestInfrastructureFailures:
    def test_transient_storage_errors_are_retried(self, job: Job) -> None:
        job.submit(add, 1, 1, marker=os.devnull)
        with ScriptedProxy(job.endpoint, status=503, fail_first=4) as proxy:
            done = job.run(STORAGE_EMULATOR_HOST=proxy.endpoint)
        assert done.returncode == EXIT_OK, done.stderr
        assert proxy.failed == 4
        assert job.result() == 2

    def test_lost_answer_of_the_result_write(self, job: Job) -> None:
        job.submit(add, 2, 2, marker=os.devnull)
        with ScriptedProxy(
            job.endpoint, status=503, fail_first=1, lose_answers=True, only="ifGenerationMatch=0"
        ) as proxy:
            done = job.run(STORAGE_EMULATOR_HOST=proxy.endpoint)
        assert proxy.failed == 1
        assert done.returncode == EXIT_OK, done.stderr
        assert job.result() == 4

    def test_storage_refusal_is_an_infrastructure_failure(self, job: Job) -> None:
        job.submit(add, 1, 1, marker=os.devnull)
        with ScriptedProxy(job.endpoint, status=403, fail_first=1_000) as proxy:
            done = job.run(STORAGE_EMULATOR_HOST=proxy.endpoint)
        assert done.returncode == EXIT_INFRA_ERROR
        assert "storage.objects" in done.stderr
        assert proxy.requests == 1  # refused once, not retried, nothing else tried

    def test_missing_input(self, job: Job) -> None:
        done = job.run()
        # Not an infrastructure fault that another attempt could fix: never retried.
        assert done.returncode == EXIT_NO_INPUT
        assert done.returncode in NEVER_RETRIED_EXIT_CODES
        assert "no input at" in done.stderr
        assert job.objects() == frozenset()

    def test_missing_bucket(self, job: Job) -> None:
        done = job.run(**{contract.ENV_BUCKET: "no-such-bucket-cga"})
        assert done.returncode == EXIT_INFRA_ERROR
        assert "gs://no-such-bucket-cga does not exist" in done.stderr

    @pytest.mark.parametrize(
        ("name", "value", "problem"),
        [
            (contract.ENV_HMAC_KEY, "", "CGA_HMAC_KEY is not set"),
            (contract.ENV_HMAC_KEY, "secret-not-hex", "CGA_HMAC_KEY=(hidden) is invalid"),
            ("BATCH_TASK_INDEX", "-1", "BATCH_TASK_INDEX is invalid"),
            (contract.ENV_JOB_PREFIX, "../etc", "CGA_JOB_PREFIX='../etc' is invalid"),
            (contract.ENV_CANCEL_POLL, "0", "CGA_CANCEL_POLL_SECONDS='0' is invalid"),
        ],
    )
    def test_bad_environment(self, job: Job, name: str, value: str, problem: str) -> None:
        done = job.run(**{name: value})
        assert done.returncode == EXIT_INFRA_ERROR
        assert problem in done.stderr
        assert "secret-not-hex" not in done.stderr


class TestCancellation:
    def _start(
        self, job: Job, tmp_path: Path, *, swallow: bool, **extra: str
    ) -> tuple[subprocess.Popen[str], Path]:
        started, finished = tmp_path / "started", tmp_path / "finished"
        task = job.submit(sleep_until_cancelled, str(started), str(finished), swallow)
        process = job.start(**extra)
        _wait_for(started, process)
        job.store.write_cancelled(task)
        return process, finished

    def test_cancel_during_run(self, job: Job, tmp_path: Path) -> None:
        process, finished = self._start(job, tmp_path, swallow=False)
        _, stderr = process.communicate(timeout=_RUN_TIMEOUT)
        assert process.returncode == EXIT_OK, stderr
        assert not finished.exists()
        assert TaskObject.RESULT not in job.objects()
        assert TaskObject.ERROR not in job.objects()
        assert job.output(TaskObject.STDOUT) == "before the cancel\n"
        assert "cancel marker found" in stderr
        assert "did not stop within" not in stderr  # the signal stopped it, not the hard stop

    def test_function_that_swallows_the_cancel_is_ended(self, job: Job, tmp_path: Path) -> None:
        process, finished = self._start(
            job, tmp_path, swallow=True, **{contract.ENV_CANCEL_GRACE: "1"}
        )
        _, stderr = process.communicate(timeout=_RUN_TIMEOUT)
        assert process.returncode == EXIT_OK, stderr
        assert "did not stop within 1 s" in stderr
        assert not finished.exists()
        assert job.objects() == {
            TaskObject.INPUT,
            TaskObject.CANCELLED,
            TaskObject.STDOUT,
        }
        # What it printed up to the hard stop is kept (a loaded machine may cut the last line).
        assert job.output(TaskObject.STDOUT).startswith("before the cancel\n")


class TestOrphanedJob:
    """The job's lease: a task whose executor is gone stops, and never starts the function."""

    def test_no_lease_no_run(self, job: Job, tmp_path: Path) -> None:
        job.submit(sleep_until_cancelled, str(tmp_path / "started"), str(tmp_path / "f"), False)
        done = job.run(**{contract.ENV_ORPHAN_TIMEOUT: "60"})
        assert done.returncode == EXIT_ORPHANED, done.stderr
        assert EXIT_ORPHANED in NEVER_RETRIED_EXIT_CODES
        assert "has no lease" in done.stderr
        assert not (tmp_path / "started").exists()

    def test_a_fresh_lease_runs_and_a_disabled_timeout_ignores_the_lease(self, job: Job) -> None:
        job.submit(chatter)
        job.store.renew_lease(job.layout.job_id)
        assert job.run(**{contract.ENV_ORPHAN_TIMEOUT: "60"}).returncode == EXIT_OK
        job.submit(chatter, index=1)  # no lease at all, but orphan_timeout=0
        assert job.run(1, **{contract.ENV_ORPHAN_TIMEOUT: "0"}).returncode == EXIT_OK

    def test_a_lease_that_stops_being_renewed_stops_the_function(
        self, job: Job, tmp_path: Path
    ) -> None:
        started, finished = tmp_path / "started", tmp_path / "finished"
        job.submit(sleep_until_cancelled, str(started), str(finished), False)
        job.store.renew_lease(job.layout.job_id)
        process = job.start(**{contract.ENV_ORPHAN_TIMEOUT: "1"})
        _wait_for(started, process)  # then nobody renews the lease: its executor "died"
        _, stderr = process.communicate(timeout=_RUN_TIMEOUT)
        assert process.returncode == EXIT_ORPHANED, stderr
        assert "has a lease last renewed" in stderr
        assert not finished.exists()
        assert job.objects() == {TaskObject.INPUT, TaskObject.STDOUT}  # no outcome recorded


class TestAttemptOutputs:
    """Each attempt writes its own output objects and replaces none (issue 12): the tasks'
    service account needs no permission to delete or overwrite."""

    def test_each_attempt_keeps_its_own_output(
        self, job: Job, client: storage.Client, tmp_path: Path
    ) -> None:
        started, finished = tmp_path / "started", tmp_path / "finished"
        task = job.submit(sleep_until_cancelled, str(started), str(finished), False)
        for attempt in (0, 1):
            started.unlink(missing_ok=True)
            process = job.start(**{contract.ENV_TASK_ATTEMPT: str(attempt)})
            _wait_for(started, process)
            job.store.write_cancelled(task)
            _, stderr = process.communicate(timeout=_RUN_TIMEOUT)
            assert process.returncode == EXIT_OK, stderr
            job.store.delete(task, TaskObject.CANCELLED)  # lets the next attempt run
        folder = job.layout.task_folder(0)
        blobs = client.list_blobs(job.store.bucket_name, prefix=folder)
        names = {blob.name[len(folder) :] for blob in blobs}
        assert names == {"input.pkl", "stdout.0", "stdout.1"}
        assert job.output(TaskObject.STDOUT) == "before the cancel\n"  # the last attempt's


class TestUnderTheBatchEmulator:
    """The job the executor builds, run by the local cloud's Batch emulator (fork server)."""

    def test_outcomes_retries_and_cancel(
        self,
        local_cloud: LocalCloud,
        batch_client: batch_v1.BatchServiceClient,
        storage_client: storage.Client,
        tmp_path: Path,
    ) -> None:
        config = ExecutorConfig.from_values({**local_cloud.executor_config(), "retries": 2})
        store = TaskStore(storage_client, config.bucket_name, config.bucket_prefix)
        job_id = new_job_id()
        job = Job(local_cloud.storage_endpoint, store, store.layout(job_id))
        started, finished = tmp_path / "started", tmp_path / "finished"
        job.submit(add, 20, 22, marker=os.devnull, index=0)
        job.submit(raise_value_error, "electron 1 failed", index=1)
        cancelled = job.submit(sleep_until_cancelled, str(started), str(finished), False, index=2)
        definition = build_job(
            config.shape, task_count=3, job_prefix=job.layout.folder, hmac_key=job.key.hex()
        )
        parent = f"projects/{config.project_id}/locations/{config.region}"
        store.renew_lease(job_id)  # as the executor does: without a lease the tasks stop
        batch_client.create_job(parent=parent, job=definition, job_id=job_id)

        wait_until(started.exists, what="task 2 to start", timeout=_RUN_TIMEOUT)
        store.write_cancelled(cancelled)
        job_reached(batch_client, f"{parent}/jobs/{job_id}", timeout=_RUN_TIMEOUT)

        tasks = batch_client.list_tasks(parent=f"{parent}/jobs/{job_id}/taskGroups/group0")
        states = {int(task.name.rsplit("/", 1)[1]): task.status.state.name for task in tasks}
        assert states == {0: "SUCCEEDED", 1: "FAILED", 2: "SUCCEEDED"}
        assert job.result(0) == 42
        assert str(job.failure(1).exception) == "electron 1 failed"
        assert job.objects(2) == {
            TaskObject.INPUT,
            TaskObject.CANCELLED,
            TaskObject.STDOUT,
        }
        assert not finished.exists()
        # The user error ran once: exit code 3 is FAIL_TASK, never retried.
        assert local_cloud.task_output(job_id, 1, attempt=0, stream="stderr") != ""
        with pytest.raises(LocalCloudError, match=r"refused GET .*/1/1/stderr: 404"):
            local_cloud.task_output(job_id, 1, attempt=1, stream="stderr")


class TestCovalentWrapper:
    @pytest.mark.slow
    def test_runs_covalent_wrapper_fn(self, job: Job) -> None:
        import functools

        from covalent._workflow.transport import TransportableObject
        from covalent.executor.utils.wrappers import wrapper_fn

        def multiply(a: int, b: int) -> int:
            print("multiplying")
            return a * b

        fn = functools.partial(wrapper_fn, TransportableObject(multiply), [], [])
        job.submit(fn, TransportableObject(6), b=TransportableObject(7))
        done = job.run()
        assert done.returncode == EXIT_OK, done.stderr
        assert job.result().get_deserialized() == 42
        assert job.output(TaskObject.STDOUT) == "multiplying\n"
