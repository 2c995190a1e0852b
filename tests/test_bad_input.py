"""Bad input: every bad configuration value and every bad electron input gives one clear error
that names the key or the electron and the fix, and costs no VM; 100 MB in and out work.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import hashlib
import resource
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from covalent._shared_files import config as covalent_config
from covalent._shared_files.exceptions import TaskRuntimeError
from electrons import (
    Delta,
    Spec,
    check_exactly_one_outcome,
    check_value,
    executor_for,
    expected_value,
    fan_out,
    new_token,
)

from covalent_gcpbatch_array.config import DEFAULTS, REQUIRED_KEYS
from covalent_gcpbatch_array.exceptions import (
    BatchApiError,
    ConfigError,
    ElectronInputError,
    ElectronResultError,
    RemoteTaskError,
    StorageError,
    TaskEnvironmentError,
)
from covalent_gcpbatch_array.gcpbatch_array import GCPBatchArrayExecutor
from covalent_gcpbatch_array.local import LocalCloud

pytestmark = [
    pytest.mark.slow,
    # google-cloud-storage leaves failed downloads' responses to the garbage collector.
    pytest.mark.filterwarnings(
        "ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning"
    ),
]

cloudpickle.register_pickle_by_value(sys.modules[__name__])

GOOD = {
    "project_id": "my-project",
    "bucket_name": "my-bucket",
    "container_image_uri": "us-docker.pkg.dev/my-project/covalent/runner:0.240.0",
}

#: A bad value for every key, and what the error must say about it.
BAD_VALUES: list[tuple[str, Any, str]] = [
    ("project_id", "My_Project", "not a valid Google Cloud project id"),
    ("region", "us east", "not a valid Google Cloud region"),
    ("bucket_name", "Bad Bucket!", "not a valid Cloud Storage bucket name"),
    ("container_image_uri", 42, "must be a string"),
    ("service_account_email", "nobody", "not a valid service account email"),
    ("vcpus", 0, "greater than 0"),
    ("memory", 0.5, "whole number"),
    ("retries", 11, "at most 10"),
    ("time_limit", -5, "greater than 0"),
    ("poll_freq", float("nan"), "finite"),
    ("cache_dir", "", "is required"),
    ("batch_window", -1, "at least 0"),
    ("batch_idle_gap", "2s", "must be a number"),
    ("max_tasks_per_job", 100_001, "at most 100000"),
    ("batch_api_endpoint", "batch.googleapis.com", "must start with http://"),
    ("storage_api_endpoint", "ftp://storage", "must start with http://"),
    ("machine_type", 4, "must be a string"),
    ("provisioning_model", "free", "not one of STANDARD, SPOT, PREEMPTIBLE"),
    ("accelerator_type", ["t4"], "must be a string"),
    ("accelerator_count", -1, "at least 0"),
    ("boot_disk_size_gb", 10.5, "whole number"),
    ("network", 0, "must be a string"),
    ("subnetwork", None, "must be a string"),
    ("labels", {"Owner": "me"}, "label name 'Owner'"),
    ("task_count_per_node", True, "must be a number"),
    ("parallelism", 5001, "at most 5000"),
    ("bucket_prefix", "a/../b", "not a valid object prefix"),
    ("keep_objects", "no", "true or false"),
    ("queue_timeout", -1, "at least 0"),
    ("graph_aware", "yes", "true or false"),
    ("orphan_timeout", -1, "at least 0"),
    ("upload_timeout", -1, "at least 0"),
]


def check_config_error(error: ConfigError, key: str, problem: str) -> None:
    message = str(error)
    assert error.key == key
    assert repr(key) in message and problem in message
    assert "fix:" in message


class TestBadConfiguration:
    def test_every_key_has_a_bad_value_case(self) -> None:
        assert {key for key, _, _ in BAD_VALUES} == set(DEFAULTS)

    @pytest.mark.parametrize(("key", "value", "problem"), BAD_VALUES)
    def test_constructor_value(self, key: str, value: Any, problem: str) -> None:
        if value is None:  # None means "not given" to the constructor: set it afterwards
            executor = GCPBatchArrayExecutor(**GOOD)
            setattr(executor, key, value)
            with pytest.raises(ConfigError) as info:
                executor.config  # noqa: B018  (run() reads it first thing)
        else:
            with pytest.raises(ConfigError) as info:
                GCPBatchArrayExecutor(**(GOOD | {key: value}))
        check_config_error(info.value, key, problem)
        assert f"pass {key}=... to GCPBatchArrayExecutor(...)" in str(info.value)
        assert "[executors.gcpbatch_array]" in str(info.value)

    @pytest.mark.parametrize(("key", "value", "problem"), BAD_VALUES)
    def test_config_file_value(
        self, key: str, value: Any, problem: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # [executors.gcpbatch_array] as Covalent's config manager holds it after reading the file.
        data = copy.deepcopy(covalent_config._config_manager.config_data)
        data.setdefault("executors", {})["gcpbatch_array"] = GOOD | {key: value}
        monkeypatch.setattr(covalent_config._config_manager, "config_data", data)
        with pytest.raises(ConfigError) as info:
            GCPBatchArrayExecutor().config  # noqa: B018
        check_config_error(info.value, key, problem)

    @pytest.mark.parametrize("key", REQUIRED_KEYS)
    def test_missing_required_key_is_refused_where_the_user_constructs_the_executor(
        self, key: str, cloud: LocalCloud
    ) -> None:
        config = cloud.executor_config() | {key: ""}
        with pytest.raises(ConfigError, match=f"'{key}': is required"):
            GCPBatchArrayExecutor(**config)

    @pytest.mark.parametrize("key", REQUIRED_KEYS)
    def test_covalents_server_builds_from_its_config_file_then_copies_the_attributes_in(
        self, key: str, cloud: LocalCloud, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import covalent.executor
        from covalent_dispatcher._core import dispatcher

        # In the server, whose startup gives the dispatcher its status queue; its config file
        # lacks the key, the user's executor has it.
        monkeypatch.setattr(dispatcher, "_global_status_queue", asyncio.Queue())
        data = copy.deepcopy(covalent_config._config_manager.config_data)
        section = data.setdefault("executors", {}).setdefault("gcpbatch_array", {})
        section.update({**DEFAULTS, **cloud.executor_config(), key: ""})
        monkeypatch.setattr(covalent_config._config_manager, "config_data", data)
        # It would merge the real file back in first.
        monkeypatch.setattr(covalent.executor, "update_config", lambda: None)
        users = GCPBatchArrayExecutor(**cloud.executor_config())
        server_side = covalent.executor._executor_manager.get_executor("gcpbatch_array")
        assert getattr(server_side, key) == ""  # no error yet
        server_side.from_dict(users.to_dict())
        assert server_side.config == users.config
        # Had the user's executor lacked it too, the electron fails before any VM.
        setattr(server_side, key, "")
        with pytest.raises(ConfigError, match=f"'{key}': is required"):
            server_side.config  # noqa: B018

    def test_a_bad_combination_names_both_keys(self) -> None:
        with pytest.raises(ConfigError, match="accelerator_type") as info:
            GCPBatchArrayExecutor(**GOOD, accelerator_count=2)
        assert "accelerator_count" in str(info.value)


@pytest.fixture(scope="module")
def cloud() -> Iterator[LocalCloud]:
    with LocalCloud(gcs_faults=True) as local_cloud:
        yield local_cloud


@pytest.fixture(autouse=True)
def collect_leaks() -> Iterator[None]:
    yield
    gc.collect()


class Unpicklable:
    def __reduce__(self) -> Any:
        raise TypeError("this object refuses to be pickled")


def lock_holder(spec: Spec) -> str:
    with LOCK:
        return expected_value(spec)


LOCK = threading.Lock()


def returns_a_lock(spec: Spec) -> Any:
    return threading.Lock()


class UnpicklableError(Exception):
    def __init__(self) -> None:
        super().__init__("this error carries a lock")
        self.lock = threading.Lock()


def raises_unpicklable(spec: Spec) -> None:
    raise UnpicklableError()


async def one_bad_electron(
    cloud: LocalCloud, fn: Any, args: Any, kwargs: Any, node_id: int = 7
) -> BaseException:
    executor = executor_for(cloud)
    with pytest.raises(TaskRuntimeError) as info:
        await executor.run(fn, args, kwargs, {"dispatch_id": "bad-input", "node_id": node_id})
    assert f"electron {node_id} of dispatch bad-input" in str(info.value)
    cause = info.value.__cause__
    assert cause is not None
    return cause


class TestBadElectronInput:
    @pytest.mark.anyio
    @pytest.mark.parametrize(
        ("args", "kwargs", "part"),
        [
            ([Unpicklable()], {}, "positional argument 0"),
            ([1], {"gen": (i for i in range(3))}, "keyword argument 'gen'"),
        ],
    )
    async def test_unpicklable_arguments_cost_no_vm(
        self, cloud: LocalCloud, args: Any, kwargs: Any, part: str
    ) -> None:
        delta = Delta(cloud)
        cause = await one_bad_electron(cloud, lambda *a, **k: None, args, kwargs)
        assert isinstance(cause, ElectronInputError)
        assert part in str(cause) and "cannot be pickled" in str(cause)
        assert "pass picklable values" in str(cause)  # the fix
        assert (delta["jobs_created"], delta["task_attempts"]) == (0, 0)

    @pytest.mark.anyio
    @pytest.mark.parametrize(
        ("fn", "args", "kwargs", "problem"),
        [
            (42, [], {}, "its function is a int, which cannot be called"),
            (len, "abc", {}, "positional arguments must be a list or tuple, not a str"),
            (len, [], [("k", 1)], "keyword arguments must be a mapping"),
            (len, [], {1: "one"}, "keyword arguments must be a mapping of argument names"),
        ],
    )
    async def test_calls_that_cannot_run_anywhere_cost_no_vm(
        self, cloud: LocalCloud, fn: Any, args: Any, kwargs: Any, problem: str
    ) -> None:
        delta = Delta(cloud)
        uploads = cloud.storage_stats()["requests"].get("POST", 0)
        cause = await one_bad_electron(cloud, fn, args, kwargs)
        assert isinstance(cause, ElectronInputError)
        assert problem in str(cause)
        assert (delta["jobs_created"], delta["task_attempts"]) == (0, 0)
        assert cloud.storage_stats()["requests"].get("POST", 0) == uploads  # nothing uploaded

    @pytest.mark.anyio
    async def test_a_function_that_cannot_be_pickled_costs_no_vm(self, cloud: LocalCloud) -> None:
        delta = Delta(cloud)
        lock = threading.Lock()
        cause = await one_bad_electron(cloud, lambda: lock.locked(), [], {})
        assert isinstance(cause, ElectronInputError)
        assert "the function cannot be pickled" in str(cause)
        assert (delta["jobs_created"], delta["task_attempts"]) == (0, 0)

    @pytest.mark.anyio
    async def test_a_bad_electron_does_not_hurt_its_batch(self, cloud: LocalCloud) -> None:
        # Its slot in the job is already taken when the input fails: that task skips at once.
        delta = Delta(cloud)
        token = new_token()
        specs = [Spec(i, token) for i in range(4)]

        def maybe_bad(spec: Spec) -> str:
            return expected_value(spec)

        bad = {2: Unpicklable()}
        outcomes: dict[int, Any] = {}

        async def one(spec: Spec) -> None:
            executor = executor_for(cloud)
            args = [bad.get(spec.index, spec)]
            try:
                outcomes[spec.index] = await executor.run(
                    maybe_bad, args, {}, {"dispatch_id": "mixed", "node_id": spec.index}
                )
            except TaskRuntimeError as exc:
                outcomes[spec.index] = exc

        import anyio

        async with anyio.create_task_group() as tg:
            for spec in specs:
                tg.start_soon(one, spec)
        assert isinstance(outcomes[2], TaskRuntimeError)
        assert isinstance(outcomes[2].__cause__, ElectronInputError)
        for index in (0, 1, 3):
            assert outcomes[index] == expected_value(specs[index])
        assert delta["jobs_created"] == 1

    @pytest.mark.anyio
    async def test_a_function_the_image_cannot_import(
        self, cloud: LocalCloud, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # A function pickled by reference to a module that exists only on the server.
        (tmp_path / "only_on_the_server.py").write_text("def f(spec):\n    return 'unreachable'\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        import only_on_the_server  # type: ignore[import-not-found]

        delta = Delta(cloud)
        fan = await fan_out(cloud, [Spec(0, new_token())], fn=only_on_the_server.f, retries=2)
        check_exactly_one_outcome(fan)
        cause = fan[0].cause
        assert isinstance(cause, TaskEnvironmentError)
        assert "only_on_the_server" in str(cause)
        assert "install the modules it needs in the image" in str(cause)
        assert delta["task_attempts"] == 1  # not retried: it cannot work on another VM either

    @pytest.mark.anyio
    async def test_a_result_that_cannot_be_pickled(self, cloud: LocalCloud) -> None:
        fan = await fan_out(cloud, [Spec(0, new_token())], fn=returns_a_lock, retries=2)
        check_exactly_one_outcome(fan)
        cause = fan[0].cause
        assert isinstance(cause, ElectronResultError), repr(cause)
        assert "cannot be pickled" in str(cause) and "return picklable values" in str(cause)

    @pytest.mark.anyio
    async def test_an_exception_that_cannot_be_pickled(self, cloud: LocalCloud) -> None:
        fan = await fan_out(cloud, [Spec(0, new_token())], fn=raises_unpicklable)
        cause = fan[0].cause
        assert isinstance(cause, RemoteTaskError)
        assert cause.type_name.endswith("UnpicklableError")
        assert cause.message == "this error carries a lock"
        assert "raises_unpicklable" in cause.traceback_text


class TestRefusedByTheCloud:
    @pytest.mark.anyio
    async def test_a_missing_bucket_costs_no_vm(self, cloud: LocalCloud) -> None:
        delta = Delta(cloud)
        fan = await fan_out(cloud, [Spec(0, new_token())], bucket_name="no-such-bucket")
        cause = fan[0].cause
        assert isinstance(cause, StorageError)
        assert "gs://no-such-bucket does not exist" in str(cause)
        assert "set bucket_name" in str(cause)
        assert delta["jobs_created"] == 0

    @pytest.mark.anyio
    async def test_storage_403_names_the_role_and_costs_no_vm(self, cloud: LocalCloud) -> None:
        delta = Delta(cloud)
        cloud.fail_storage("POST", 403, count=1, path="input.pkl")
        fan = await fan_out(cloud, [Spec(0, new_token())])
        cause = fan[0].cause
        assert isinstance(cause, StorageError)
        assert "roles/storage.objectAdmin" in str(cause)
        assert delta["jobs_created"] == 0

    @pytest.mark.anyio
    @pytest.mark.parametrize(
        ("status", "advice"),
        [(403, "roles/batch.jobsEditor"), (404, "Check project_id and region"), (400, "job-shape")],
    )
    async def test_batch_refusing_the_job(
        self, cloud: LocalCloud, status: int, advice: str
    ) -> None:
        delta = Delta(cloud)
        cloud.fail_calls("CreateJob", status, 1)
        token = new_token()
        fan = await fan_out(cloud, [Spec(i, token) for i in range(3)])
        check_exactly_one_outcome(fan)
        for outcome in fan:
            assert isinstance(outcome.cause, BatchApiError)
            assert advice in str(outcome.cause)
        assert (delta["jobs_created"], delta["CreateJob"]) == (0, 1)  # not retried


def checksum_and_reverse(data: bytes) -> tuple[str, bytes]:
    return hashlib.sha256(data).hexdigest(), data[::-1]


class TestLargeValues:
    @pytest.mark.anyio
    async def test_100_mb_in_and_100_mb_out(self, cloud: LocalCloud) -> None:
        import os

        data = os.urandom(100 * 1024 * 1024)
        digest = hashlib.sha256(data).hexdigest()
        executor = executor_for(cloud)
        value = await executor.run(
            checksum_and_reverse, [data], {}, {"dispatch_id": "large", "node_id": 0}
        )
        assert value[0] == digest  # the task got every byte
        assert value[1] == data[::-1]  # and we got every byte of its 100 MB back
        # Uploads and downloads of that size use several requests (resumable upload chunks).
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"executor process peak RSS after 100 MB in/out: {peak_mb:.0f} MB")

    @pytest.mark.anyio
    async def test_large_values_survive_dropped_chunks(self, cloud: LocalCloud) -> None:
        # The executor sends an input in one request (POST, uploadType=media); over 8 MB the
        # task uploads its result in resumable chunks (PUT): drop one request on each side.
        cloud.fail_storage("POST", drop=True, count=1, path="input.pkl")
        cloud.fail_storage("PUT", 503, count=1, path="result.pkl")
        cloud.fail_storage("GET", drop=True, lose_answer=True, count=1, path="result.pkl?alt=media")
        spec = Spec(0, new_token(), "echo", b"x" * (20 * 1024 * 1024))
        fan = await fan_out(cloud, [spec])
        check_value(fan[0], spec.param)
        assert cloud.storage_stats()["pending"] == 0


class TestBadTaskMetadata:
    """Whatever run() is given, what comes out is a TaskRuntimeError with its cause (issue 12)."""

    @pytest.mark.anyio
    @pytest.mark.parametrize("node_id", ["1/2", "..", None, True, 1.5])
    async def test_a_node_id_that_is_not_an_integer(self, cloud: LocalCloud, node_id: Any) -> None:
        delta = Delta(cloud)
        executor = executor_for(cloud)
        with pytest.raises(TaskRuntimeError, match="integer node_id") as info:
            await executor.run(len, [[1]], {}, {"dispatch_id": "bad-input", "node_id": node_id})
        assert isinstance(info.value.__cause__, TypeError | ValueError)
        assert (delta["jobs_created"], delta["task_attempts"]) == (0, 0)

    @pytest.mark.anyio
    async def test_a_bad_value_set_after_construction(self, cloud: LocalCloud) -> None:
        executor = executor_for(cloud)
        executor.bucket_prefix = "p\n"
        with pytest.raises(TaskRuntimeError, match="bucket_prefix") as info:
            await executor.run(len, [[1]], {}, {"dispatch_id": "bad-input", "node_id": 1})
        assert isinstance(info.value.__cause__, ConfigError)
