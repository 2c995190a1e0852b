"""GCPBatchArrayExecutor against the local cloud, through the real Google clients.

Each electron gets a fresh executor, as Covalent does, and all of them run concurrently on one
event loop, as in the Covalent server.
"""

from __future__ import annotations

import functools
import os
import pickle
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import cloudpickle
import covalent  # noqa: F401  (import covalent before the plugin module, as the server does)
import pytest
from covalent._shared_files.exceptions import TaskCancelledError, TaskRuntimeError
from google.api_core.exceptions import NotFound
from google.cloud import batch_v1

from covalent_gcpbatch_array import gcpbatch_array
from covalent_gcpbatch_array._core.clients import make_storage_client
from covalent_gcpbatch_array._core.compat import give_task_streams
from covalent_gcpbatch_array._core.contract import TaskRef
from covalent_gcpbatch_array._core.runtime import ExecutorRuntime
from covalent_gcpbatch_array._core.storage import INPUT_SLOTS, AsyncTaskStore, TaskStore
from covalent_gcpbatch_array.exceptions import (
    BatchApiError,
    ConfigError,
    ElectronInputError,
    ElectronResultError,
    RemoteTaskError,
    StorageError,
    TaskInfrastructureError,
    TimeLimitExceeded,
)
from covalent_gcpbatch_array.gcpbatch_array import GCPBatchArrayExecutor
from covalent_gcpbatch_array.local import LocalCloud
from tests.polling import wait_until

pytestmark = pytest.mark.slow

# The tasks cannot import this test module: send its functions by value, as for __main__.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

FAST = {"poll_freq": 0.2, "batch_window": 0.5, "batch_idle_gap": 0.0, "retries": 0}


@pytest.fixture(scope="module")
def cloud() -> Iterator[LocalCloud]:
    with LocalCloud() as local_cloud:
        yield local_cloud


def executor(cloud: LocalCloud, **overrides: Any) -> GCPBatchArrayExecutor:
    return GCPBatchArrayExecutor(**(cloud.executor_config() | FAST | overrides))


async def run_electron(
    ex: GCPBatchArrayExecutor,
    fn: Callable[..., Any],
    *args: Any,
    node_id: int = 0,
    dispatch_id: str = "dispatch-1",
) -> Any:
    return await ex.run(fn, list(args), {}, {"dispatch_id": dispatch_id, "node_id": node_id})


async def fan_out(
    cloud: LocalCloud, fn: Callable[..., Any], inputs: list[Any], **overrides: Any
) -> dict[int, Any]:
    """Run fn on every input concurrently; each electron's result or exception by index."""
    outcomes: dict[int, Any] = {}

    async def one(index: int, value: Any) -> None:
        try:
            outcomes[index] = await run_electron(
                executor(cloud, **overrides), fn, value, node_id=index
            )
        except Exception as exc:
            outcomes[index] = exc

    async with anyio.create_task_group() as tg:
        for index, value in enumerate(inputs):
            tg.start_soon(one, index, value)
    return outcomes


class Delta:
    """Changes in the emulator's counters over a block."""

    def __init__(self, cloud: LocalCloud) -> None:
        self.cloud = cloud
        self.before = cloud.stats()

    def __getitem__(self, name: str) -> int:
        after = self.cloud.stats()
        if name in after["api_calls"] or name in self.before["api_calls"]:
            return int(after["api_calls"].get(name, 0) - self.before["api_calls"].get(name, 0))
        return int(after[name] - self.before[name])


def square(x: int) -> int:
    print(f"squaring {x}")
    return x * x


def fail_on_odd(x: int) -> int:
    if x % 2:
        raise KeyError(f"odd input {x}")
    return x


class TestPacking:
    @pytest.mark.anyio
    async def test_a_burst_holds_a_few_dozen_encoded_inputs_not_all(
        self, cloud: LocalCloud, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        held = most = 0
        encode, upload = gcpbatch_array.encode_input, AsyncTaskStore.upload_input

        def counting_encode(*args: Any, **kwargs: Any) -> bytes:
            nonlocal held, most
            held += 1
            most = max(most, held)
            return encode(*args, **kwargs)

        async def counting_upload(store: AsyncTaskStore, ref: TaskRef, data: bytes) -> None:
            nonlocal held
            try:
                await upload(store, ref, data)
            finally:
                held -= 1

        monkeypatch.setattr(gcpbatch_array, "encode_input", counting_encode)
        monkeypatch.setattr(AsyncTaskStore, "upload_input", counting_upload)
        outcomes = await fan_out(cloud, square, list(range(100)))
        assert outcomes == {index: index * index for index in range(100)}
        assert 0 < most <= INPUT_SLOTS < 100

    @pytest.mark.anyio
    async def test_fifty_electrons_of_one_shape_make_one_job(self, cloud: LocalCloud) -> None:
        delta = Delta(cloud)
        outcomes = await fan_out(cloud, square, list(range(50)))
        assert outcomes == {i: i * i for i in range(50)}
        assert delta["jobs_created"] == 1
        assert delta["task_attempts"] == 50

    @pytest.mark.anyio
    async def test_two_shapes_make_two_jobs(self, cloud: LocalCloud) -> None:
        delta = Delta(cloud)
        outcomes: dict[str, Any] = {}

        async def one(name: str, value: int, memory: int) -> None:
            ex = executor(cloud, memory=memory)
            outcomes[name] = await run_electron(ex, square, value)

        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(one, f"small-{i}", i, 256)
                tg.start_soon(one, f"large-{i}", 10 + i, 1024)
        assert outcomes == {**{f"small-{i}": i * i for i in range(4)}} | {
            f"large-{i}": (10 + i) ** 2 for i in range(4)
        }
        assert delta["jobs_created"] == 2

    @pytest.mark.anyio
    async def test_max_tasks_per_job_splits_a_fan_out(self, cloud: LocalCloud) -> None:
        delta = Delta(cloud)
        outcomes = await fan_out(cloud, square, list(range(25)), max_tasks_per_job=10)
        assert outcomes == {i: i * i for i in range(25)}
        assert delta["jobs_created"] == 3

    @pytest.mark.anyio
    async def test_zero_window_is_one_job_per_electron(self, cloud: LocalCloud) -> None:
        delta = Delta(cloud)
        outcomes = await fan_out(cloud, square, list(range(5)), batch_window=0)
        assert outcomes == {i: i * i for i in range(5)}
        assert delta["jobs_created"] == 5

    @pytest.mark.anyio
    async def test_polling_lists_tasks_at_most_once_per_poll(self, cloud: LocalCloud) -> None:
        # A poll is one GetJob, plus one ListTasks when the finished count moved (or the job
        # ended). When it polls is the job monitor's MockClock tests' business (exact times),
        # never wall-clock time's.
        delta = Delta(cloud)
        outcomes = await fan_out(cloud, square, list(range(40)))
        assert outcomes == {i: i * i for i in range(40)}
        assert 1 <= delta["ListTasks"] <= delta["GetJob"]


class TestOutcomes:
    @pytest.mark.anyio
    async def test_each_electron_gets_its_own_result_or_exception(self, cloud: LocalCloud) -> None:
        delta = Delta(cloud)
        outcomes = await fan_out(cloud, fail_on_odd, list(range(10)), retries=3)
        for i in range(10):
            if i % 2:
                error = outcomes[i]
                assert isinstance(error, TaskRuntimeError)
                assert type(error.__cause__) is KeyError
                assert error.__cause__.args == (f"odd input {i}",)
                assert "fail_on_odd" in str(error)  # the remote traceback
            else:
                assert outcomes[i] == i
        # User errors exit 3, which the job's lifecycle policy never retries.
        assert delta["task_attempts"] == 10

    @pytest.mark.anyio
    async def test_stdout_and_stderr_reach_the_executor(self, cloud: LocalCloud) -> None:
        def noisy() -> str:
            import subprocess
            import sys

            print("to stdout")
            print("to stderr", file=sys.stderr)
            subprocess.run(["echo", "from a child process"], check=True)
            return "ok"

        ex = executor(cloud)
        stdout, stderr = give_task_streams(ex)
        assert await run_electron(ex, noisy) == "ok"
        assert "to stdout" in stdout.getvalue()
        assert "from a child process" in stdout.getvalue()
        assert "to stderr" in stderr.getvalue()

    @pytest.mark.anyio
    async def test_a_quiet_electron_has_empty_streams(self, cloud: LocalCloud) -> None:
        ex = executor(cloud, batch_window=0)
        stdout, stderr = give_task_streams(ex)
        assert await run_electron(ex, pow, 2, 10) == 1024
        assert stdout.getvalue() == ""
        assert stderr.getvalue() == ""  # no warnings from the runner or the launcher

    @pytest.mark.anyio
    async def test_a_preempted_task_is_retried_and_succeeds(self, cloud: LocalCloud) -> None:
        delta = Delta(cloud)
        cloud.fail_task(index=0, attempt=0, exit_code=50001)
        assert await run_electron(executor(cloud, retries=2, batch_window=0), square, 7) == 49
        assert delta["task_attempts"] == 2

    @pytest.mark.anyio
    async def test_retries_exhausted_is_an_infrastructure_error(self, cloud: LocalCloud) -> None:
        cloud.fail_task(index=0, attempt=0, exit_code=50001)
        cloud.fail_task(index=0, attempt=1, exit_code=50001)
        with pytest.raises(TaskRuntimeError) as info:
            await run_electron(executor(cloud, retries=1, batch_window=0), square, 7)
        cause = info.value.__cause__
        assert isinstance(cause, TaskInfrastructureError)
        assert cause.exit_code == 50001
        assert "preempted" in str(cause)
        assert "retries=1" in str(cause)

    @pytest.mark.anyio
    async def test_time_limit_fails_only_the_slow_task(self, cloud: LocalCloud) -> None:
        def maybe_slow(x: int) -> int:
            if x == 0:
                time.sleep(60)
            return x

        outcomes = await fan_out(cloud, maybe_slow, [0, 1, 2], time_limit=2)
        assert outcomes[1] == 1 and outcomes[2] == 2
        assert isinstance(outcomes[0], TaskRuntimeError)
        cause = outcomes[0].__cause__
        assert isinstance(cause, TimeLimitExceeded)
        assert "time_limit=2s" in str(cause)

    @pytest.mark.anyio
    async def test_results_arrive_as_tasks_finish(self, cloud: LocalCloud) -> None:
        finished: set[int] = set()
        release = anyio.Event()

        def wait_for_file(x: int) -> int:
            if x == 0:
                while not os.path.exists(marker):
                    time.sleep(0.05)
            return x

        marker = str(cloud.workdir / f"release-{time.monotonic_ns()}")

        async def one(index: int) -> None:
            await run_electron(executor(cloud), wait_for_file, index, node_id=index)
            finished.add(index)
            if len(finished) == 3:
                release.set()

        async with anyio.create_task_group() as tg:
            for index in range(4):
                tg.start_soon(one, index)
            await release.wait()  # three results came back while task 0 still runs
            assert 0 not in finished
            await anyio.Path(marker).touch()
        assert finished == {0, 1, 2, 3}


class TestTasksNotListedYet:
    @pytest.mark.anyio
    async def test_a_job_that_lists_no_tasks_until_provisioned_runs_its_electrons(self) -> None:
        # As Google's may: a just-created job counts and lists no tasks (GetJob has no
        # status.taskGroups, ListTasks is empty, GetTask 404) until its VMs are provisioned.
        async with LocalCloud(provisioning_delay=2.0, tasks_hidden_until_provisioned=True) as cloud:
            delta = Delta(cloud)
            outcomes = await fan_out(cloud, square, list(range(6)))
            assert outcomes == {i: i * i for i in range(6)}
            assert (delta["jobs_created"], delta["task_attempts"]) == (1, 6)


class TestCancel:
    @pytest.mark.anyio
    async def test_cancel_one_electron_of_a_running_job(self, cloud: LocalCloud) -> None:
        def sleepy(x: int) -> int:
            if x == 0:
                time.sleep(60)
            time.sleep(1)
            return x

        outcomes: dict[int, Any] = {}

        async def one(index: int) -> None:
            try:
                outcomes[index] = await run_electron(
                    executor(cloud), sleepy, index, node_id=index, dispatch_id="cancel-one"
                )
            except Exception as exc:
                outcomes[index] = exc

        async with anyio.create_task_group() as tg:
            for index in range(3):
                tg.start_soon(one, index)
            ref = await wait_for_running_task(cloud, "cancel-one", 0)
            ok = await executor(cloud).cancel(
                {"dispatch_id": "cancel-one", "node_id": 0},
                {"job_id": ref.job_id, "task_index": ref.index},
            )
            assert ok is True
        assert isinstance(outcomes[0], TaskCancelledError)
        assert outcomes[1] == 1 and outcomes[2] == 2

    @pytest.mark.anyio
    async def test_cancelling_every_electron_deletes_the_job(self, cloud: LocalCloud) -> None:
        def forever(x: int) -> int:
            time.sleep(120)
            return x

        async def one(index: int) -> None:
            with pytest.raises(TaskCancelledError):
                await run_electron(
                    executor(cloud), forever, index, node_id=index, dispatch_id="cancel-all"
                )

        async with anyio.create_task_group() as tg:
            for index in range(2):
                tg.start_soon(one, index)
            job_id = (await wait_for_running_task(cloud, "cancel-all", 0)).job_id
            for index in range(2):
                await executor(cloud).cancel({}, {"job_id": job_id, "task_index": index})
        client = cloud.batch_client()
        name = f"projects/{cloud.project_id}/locations/{cloud.region}/jobs/{job_id}"

        def job_is_gone() -> bool:
            try:
                client.get_job(name=name)
            except NotFound:
                return True
            return False

        await anyio.to_thread.run_sync(
            functools.partial(wait_until, job_is_gone, what=f"{name} to be deleted")
        )

    @pytest.mark.anyio
    async def test_cancel_without_a_handle_returns_false(self, cloud: LocalCloud) -> None:
        assert await executor(cloud).cancel({}, None) is False


async def wait_for_running_task(cloud: LocalCloud, dispatch_id: str, node_id: int) -> TaskRef:
    """The task that runs electron ``node_id`` of ``dispatch_id``, once it is RUNNING.

    Found the way `gcpbatch-array tasks` finds it: through the jobs' manifests.
    """
    client = cloud.batch_client()
    store = cloud_store(cloud, "covalent-gcpbatch-array")
    parent = f"projects/{cloud.project_id}/locations/{cloud.region}"

    def running() -> TaskRef | None:
        for job in client.list_jobs(parent=parent):
            job_id = job.name.rsplit("/", 1)[-1]
            for index, entry in (store.read_manifest(job_id) or {}).items():
                if (entry.dispatch_id, entry.node_id) != (dispatch_id, node_id):
                    continue
                task = client.get_task(name=f"{job.name}/taskGroups/group0/tasks/{index}")
                if task.status.state == batch_v1.TaskStatus.State.RUNNING:
                    return TaskRef(job_id, index)
        return None

    what = f"electron {node_id} of {dispatch_id} to run"
    return await anyio.to_thread.run_sync(functools.partial(wait_until, running, what=what))


def cloud_store(cloud: LocalCloud, prefix: str) -> TaskStore:
    client = make_storage_client(cloud.project_id, cloud.storage_endpoint)
    return TaskStore(client, cloud.bucket_name, prefix)


class Unpicklable:
    def __reduce__(self) -> Any:
        raise TypeError("this object refuses to be pickled")


class UnpicklableError(Exception):
    def __init__(self) -> None:
        super().__init__("carries a lock")
        self.lock = threading.Lock()


class TestBadInput:
    @pytest.mark.anyio
    async def test_unpicklable_argument_fails_before_any_vm(self, cloud: LocalCloud) -> None:
        delta = Delta(cloud)
        outcomes = await fan_out(cloud, square, [Unpicklable(), 3])
        assert outcomes[1] == 9
        error = outcomes[0]
        assert isinstance(error, TaskRuntimeError)
        assert isinstance(error.__cause__, ElectronInputError)
        assert "electron 0 of dispatch dispatch-1" in str(error.__cause__)
        assert "refuses to be pickled" in str(error.__cause__)
        assert delta["task_attempts"] == 2  # the bad slot's task skipped without running it

    @pytest.mark.anyio
    async def test_unpicklable_result_is_a_clear_error(self, cloud: LocalCloud) -> None:
        def returns_lock() -> Any:
            return threading.Lock()

        with pytest.raises(TaskRuntimeError) as info:
            await run_electron(executor(cloud, batch_window=0), returns_lock)
        cause = info.value.__cause__
        assert isinstance(cause, ElectronResultError)
        assert "pickle" in str(cause)

    @pytest.mark.anyio
    async def test_unpicklable_exception_keeps_type_message_and_traceback(
        self, cloud: LocalCloud
    ) -> None:
        def raises_unpicklable() -> None:
            raise UnpicklableError()

        with pytest.raises(TaskRuntimeError) as info:
            await run_electron(executor(cloud, batch_window=0), raises_unpicklable)
        cause = info.value.__cause__
        assert isinstance(cause, RemoteTaskError)
        assert cause.type_name.endswith("UnpicklableError")
        assert cause.message == "carries a lock"
        assert "raises_unpicklable" in cause.traceback_text
        pickle.loads(pickle.dumps(cause))

    @pytest.mark.anyio
    async def test_missing_module_in_the_image_is_the_electrons_error(
        self, cloud: LocalCloud
    ) -> None:
        def imports_missing() -> None:
            import a_module_the_image_does_not_have  # type: ignore[import-not-found]  # noqa: F401

        with pytest.raises(TaskRuntimeError) as info:
            await run_electron(executor(cloud, batch_window=0), imports_missing)
        assert isinstance(info.value.__cause__, ModuleNotFoundError)
        assert "a_module_the_image_does_not_have" in str(info.value.__cause__)

    @pytest.mark.anyio
    async def test_missing_bucket_names_the_bucket(self, cloud: LocalCloud) -> None:
        delta = Delta(cloud)
        with pytest.raises(TaskRuntimeError) as info:
            await run_electron(executor(cloud, bucket_name="no-such-bucket"), square, 2)
        assert isinstance(info.value.__cause__, StorageError)
        assert "no-such-bucket" in str(info.value.__cause__)
        assert delta["jobs_created"] == 0

    @pytest.mark.anyio
    async def test_batch_403_fails_the_batch_with_advice(self, cloud: LocalCloud) -> None:
        cloud.fail_calls("CreateJob", status=403, count=1)
        outcomes = await fan_out(cloud, square, [1, 2])
        for error in outcomes.values():
            assert isinstance(error, TaskRuntimeError)
            assert isinstance(error.__cause__, BatchApiError)
            assert "roles/batch.jobsEditor" in str(error.__cause__)

    @pytest.mark.anyio
    async def test_transient_create_errors_are_retried_without_a_second_job(
        self, cloud: LocalCloud
    ) -> None:
        delta = Delta(cloud)
        cloud.fail_calls("CreateJob", status=503, count=2)
        assert await run_electron(executor(cloud, batch_window=0), square, 5) == 25
        assert delta["jobs_created"] == 1
        assert delta["CreateJob"] == 3

    def test_bad_config_fails_at_construction(self, cloud: LocalCloud) -> None:
        with pytest.raises(ConfigError, match="'vcpus'"):
            executor(cloud, vcpus=-1)

    @pytest.mark.anyio
    async def test_objects_are_cleaned_up_unless_kept(self, cloud: LocalCloud) -> None:
        client = cloud.storage_client()

        def names(prefix: str) -> list[str]:
            return [blob.name for blob in client.list_blobs(cloud.bucket_name, prefix=prefix)]

        await ExecutorRuntime.wait_idle()  # no service in this loop yet: returns at once
        await fan_out(cloud, square, [1, 2], bucket_prefix="cleanup-test")
        # Cleanup runs after the results are handed back, as the job's monitor ends; the
        # manifest stays so that `gcpbatch-array tasks` can still name the electrons.
        await ExecutorRuntime.wait_idle()
        (left,) = names("cleanup-test/")
        assert left.endswith("manifest.json")
        await fan_out(cloud, square, [1, 2], bucket_prefix="kept-test", keep_objects=True)
        kept = names("kept-test/")
        assert sum(name.endswith("result.pkl") for name in kept) == 2
        assert any(name.endswith("manifest.json") for name in kept)
