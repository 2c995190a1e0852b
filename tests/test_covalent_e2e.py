"""Workflows dispatched to a real Covalent server whose electrons run on the local cloud.

One private Covalent server for the session (``covalent_server`` in conftest.py); its config
file points ``[executors.gcpbatch_array]`` at the session's local cloud, as ``gcpbatch-array
local up`` does for a user.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import covalent as ct
import pytest
from covalent._results_manager.result import Result
from google.api_core.exceptions import NotFound

from covalent_gcpbatch_array.cli.covalent_server import CovalentServer
from covalent_gcpbatch_array.config import DEFAULTS
from covalent_gcpbatch_array.local import LocalCloud
from tests.conftest import COVALENT_SERVER_SETTINGS
from tests.polling import wait_until

pytestmark = pytest.mark.slow

# Tasks cannot import this test module: its functions travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

_FINISHED = ("COMPLETED", "FAILED", "CANCELLED")
_DISPATCH_TIMEOUT = 240.0  # seconds a test's dispatch may take before the test fails


# -- helpers ------------------------------------------------------------------------------------


def dispatch(server: CovalentServer, lattice: Any, *args: Any) -> str:
    return str(ct.dispatch(lattice, dispatcher_addr=server.address)(*args))


def status_of(server: CovalentServer, dispatch_id: str) -> str:
    answer: Any = ct.get_result(dispatch_id, status_only=True, dispatcher_addr=server.address)
    return str(answer["status"])


def wait_result(server: CovalentServer, dispatch_id: str) -> Result:
    """The dispatch's result once it has finished (a hung dispatch fails the test)."""
    wait_until(
        lambda: status_of(server, dispatch_id) in _FINISHED,
        what=lambda: f"{dispatch_id}, still {status_of(server, dispatch_id)}; {server.log_tail()}",
        timeout=_DISPATCH_TIMEOUT,
        interval=0.3,
    )
    return server.result(dispatch_id)


def nodes_named(result: Result, name: str) -> list[dict[str, Any]]:
    """Status, output, stdout, stderr and error of every node called ``name``, by node id."""
    graph = result.lattice.transport_graph
    found = []
    for node_id in sorted(graph.get_internal_graph_copy().nodes):
        if graph.get_node_value(node_id, "name") != name:
            continue
        output = graph.get_node_value(node_id, "output")
        found.append(
            {
                "status": str(graph.get_node_value(node_id, "status")),
                "output": output.get_deserialized() if output is not None else None,
                "stdout": graph.get_node_value(node_id, "stdout") or "",
                "stderr": graph.get_node_value(node_id, "stderr") or "",
                "error": graph.get_node_value(node_id, "error"),
                "sub_result": graph.get_node_value(node_id, "sublattice_result"),
            }
        )
    return found


def explicit_executor(cloud: LocalCloud, **overrides: Any) -> Any:
    """``ct.executor.GCPBatchArrayExecutor`` with every setting given, none from a config file."""
    settings = cloud.executor_config() | COVALENT_SERVER_SETTINGS | overrides
    return ct.executor.GCPBatchArrayExecutor(**settings)


class Delta:
    """Changes in the emulator's counters since construction."""

    def __init__(self, cloud: LocalCloud) -> None:
        self.cloud = cloud
        self.before = cloud.stats()

    def __getitem__(self, name: str) -> int:
        return int(self.cloud.stats()[name] - self.before[name])


@pytest.fixture
def cloud(local_cloud: LocalCloud) -> Iterator[LocalCloud]:
    """The session's cloud; its knobs are put back after the test."""
    knobs = local_cloud.settings()
    yield local_cloud
    local_cloud.configure(
        provisioning_delay=knobs["provisioning_delay"],
        max_running_tasks=knobs["max_running_tasks"],
        jobs_per_window=knobs["jobs_per_window"],
        quota_window_seconds=knobs["quota_window_seconds"],
    )


# -- electron bodies (they run in the tasks) ------------------------------------------------------


def square_or_fail(x: int) -> int:
    print(f"squaring {x}")
    print(f"a warning about {x}", file=sys.stderr)
    if x in (2, 5):
        raise ValueError(f"bad input {x}")
    return x * x


def task_identity(tag: str, x: int, *, before: str = "") -> dict[str, Any]:
    return {
        "tag": tag,
        "x": x,
        "before": before,
        "task_index": os.environ.get("BATCH_TASK_INDEX"),
        "pid": os.getpid(),
    }


def environment_marker() -> str:
    """A call_before: the job and task it runs in, which only a task's environment has."""
    return f"{os.environ['CGA_JOB_PREFIX']}#{os.environ['BATCH_TASK_INDEX']}"


def write_marker(path: str) -> None:
    """A call_after: leave a file naming the task it ran in."""
    Path(path).write_text(environment_marker())


def sleep_forever(path: str, x: int) -> int:
    Path(path, f"started-{x}").write_text(str(os.getpid()))
    time.sleep(600)
    return x


def double(x: int) -> int:
    return 2 * x


# -- tests ----------------------------------------------------------------------------------------


class TestPluginConfig:
    def test_plugin_defaults_and_written_settings_are_in_the_server_config(
        self, covalent_server: CovalentServer, local_cloud: LocalCloud
    ) -> None:
        section = covalent_server.read_executor_config()
        assert section is not None
        assert set(section) == set(DEFAULTS)
        written = local_cloud.executor_config() | COVALENT_SERVER_SETTINGS
        for key, default in DEFAULTS.items():
            assert section[key] == written.get(key, default), key


class TestFanOut:
    def test_short_name_fan_out_with_failures_stdout_and_stderr(
        self, covalent_server: CovalentServer, cloud: LocalCloud
    ) -> None:
        electron = ct.electron(square_or_fail, executor="gcpbatch_array")

        @ct.lattice(executor="local", workflow_executor="local")
        def fan_out(n: int) -> list[int]:
            return [electron(x) for x in range(n)]

        delta = Delta(cloud)
        result = wait_result(covalent_server, dispatch(covalent_server, fan_out, 8))

        assert str(result.status) == "FAILED"
        nodes = nodes_named(result, "square_or_fail")
        assert len(nodes) == 8
        for x, node in enumerate(nodes):
            assert f"squaring {x}\n" in node["stdout"]
            assert f"a warning about {x}" in node["stderr"]
            if x in (2, 5):
                assert node["status"] == "FAILED"
                assert "Traceback (most recent call last)" in node["stderr"]
                assert "in square_or_fail" in node["stderr"]
                assert f"ValueError: bad input {x}" in node["stderr"]
            else:
                assert node["status"] == "COMPLETED", node
                assert node["output"] == x * x
        assert delta["task_attempts"] == 8  # a user error is not retried
        assert delta["jobs_created"] < 8, "Covalent's electrons were not coalesced at all"

    def test_executor_object_with_call_before_call_after_and_deps_bash(
        self, covalent_server: CovalentServer, cloud: LocalCloud, tmp_path: Path
    ) -> None:
        bash_marker, after_marker = tmp_path / "bash", tmp_path / "after"
        electron = ct.electron(
            task_identity,
            executor=explicit_executor(cloud, vcpus=1),
            deps_bash=ct.DepsBash([f'echo "$CGA_JOB_PREFIX#$BATCH_TASK_INDEX" > {bash_marker}']),
            call_before=[ct.DepsCall(environment_marker, retval_keyword="before")],
            call_after=[ct.DepsCall(write_marker, args=[str(after_marker)])],
        )

        @ct.lattice(executor="local", workflow_executor="local")
        def one(tag: str) -> dict[str, Any]:
            return electron(tag, 7)

        result = wait_result(covalent_server, dispatch(covalent_server, one, "deps"))

        assert str(result.status) == "COMPLETED", result.error
        output: Any = result.result
        assert (output["tag"], output["x"], output["task_index"]) == ("deps", 7, "0")
        assert output["pid"] != os.getpid()
        # Each hook saw the task's own environment: the job's prefix and the task index.
        job_prefix, index = output["before"].split("#")
        assert (job_prefix.split("/")[0], index) == (DEFAULTS["bucket_prefix"], "0")
        assert bash_marker.read_text().strip() == output["before"]
        assert after_marker.read_text() == output["before"]

    def test_sublattice_electrons_run_on_the_executor(
        self, covalent_server: CovalentServer, cloud: LocalCloud
    ) -> None:
        electron = ct.electron(double, executor="gcpbatch_array")

        @ct.lattice(executor="local", workflow_executor="local")
        def doubles(n: int) -> list[int]:
            return [electron(x) for x in range(n)]

        inner = ct.electron(doubles)

        # Covalent builds a sublattice's graph on the parent's workflow_executor: here, a task.
        @ct.lattice(executor="local", workflow_executor="gcpbatch_array")
        def outer(n: int) -> list[int]:
            return inner(n)

        delta = Delta(cloud)
        result = wait_result(covalent_server, dispatch(covalent_server, outer, 3))

        assert str(result.status) == "COMPLETED", result.error
        assert result.result == [0, 2, 4]
        (sub_node,) = nodes_named(result, ":sublattice:doubles")
        sub_result = sub_node["sub_result"]
        assert sub_result is not None and str(sub_result.status) == "COMPLETED"
        assert [n["output"] for n in nodes_named(sub_result, "double")] == [0, 2, 4]
        # The task that built the graph could not reach the server (tasks do not know it), so
        # it handed the graph back through its result, as Covalent does then.
        assert "Packing staging directory for server-side import" in sub_node["stdout"]
        # The three electrons and the graph builder ran in tasks (postprocessing may too).
        assert delta["task_attempts"] >= 4


class TestConcurrentDispatches:
    def test_two_dispatches_share_a_job_and_each_gets_its_own_results(
        self, covalent_server: CovalentServer, cloud: LocalCloud
    ) -> None:
        prefix = f"shared-{time.time_ns()}"
        # One batch of exactly the 4 + 4 electrons: it flushes the moment it is full, not on
        # a timer (the window and idle gap only stop it flushing before the second dispatch's
        # electrons join); objects are kept to read the manifests. On the timers alone: with
        # the graph, the first dispatch's wave is complete (and flushed) before the second
        # one's electrons arrive (tests/test_waves.py has two dispatches sharing a wave batch).
        executor = explicit_executor(
            cloud,
            bucket_prefix=prefix,
            keep_objects=True,
            graph_aware=False,
            max_tasks_per_job=8,
            batch_window=120.0,
            batch_idle_gap=120.0,
        )
        electron = ct.electron(task_identity, executor=executor)

        @ct.lattice(executor="local", workflow_executor="local")
        def tagged(tag: str, n: int) -> list[dict[str, Any]]:
            return [electron(tag, x) for x in range(n)]

        first = dispatch(covalent_server, tagged, "first", 4)
        second = dispatch(covalent_server, tagged, "second", 4)
        results = {first: wait_result(covalent_server, first)}
        results[second] = wait_result(covalent_server, second)

        for dispatch_id, tag in ((first, "first"), (second, "second")):
            output: Any = results[dispatch_id].result
            assert [(o["tag"], o["x"]) for o in output] == [(tag, x) for x in range(4)]
        blobs = cloud.storage_client().list_blobs(cloud.bucket_name, prefix=f"{prefix}/")
        manifests = [
            json.loads(blob.download_as_bytes())
            for blob in blobs
            if blob.name.endswith("/manifest.json")
        ]
        dispatches_per_job = [
            {entry["dispatch_id"] for entry in manifest["tasks"].values()} for manifest in manifests
        ]
        assert sum(len(ids) for ids in dispatches_per_job) >= 2
        assert {first, second} in dispatches_per_job, dispatches_per_job


class TestCancel:
    def test_cancel_stops_running_and_pending_tasks_and_deletes_the_job(
        self,
        covalent_server: CovalentServer,
        cloud: LocalCloud,
        batch_client: Any,
        tmp_path: Path,
        wait_process_gone: Callable[[int], bool],
    ) -> None:
        cloud.configure(max_running_tasks=2)  # two tasks run, two stay pending
        electron = ct.electron(sleep_forever, executor="gcpbatch_array")

        @ct.lattice(executor="local", workflow_executor="local")
        def forever(path: str) -> list[int]:
            return [electron(path, x) for x in range(4)]

        delta = Delta(cloud)
        dispatch_id = dispatch(covalent_server, forever, str(tmp_path))
        started = lambda: sorted(tmp_path.glob("started-*"))  # noqa: E731
        wait_until(
            lambda: len(started()) == 2, what=lambda: server_log(covalent_server), timeout=120
        )
        assert delta["jobs_created"] == 1
        (job,) = [
            j
            for j in batch_client.list_jobs(parent=parent_of(cloud))
            if j.task_groups[0].task_count == 4 and j.status.state.name == "RUNNING"
        ]
        pids = [int(path.read_text()) for path in started()]

        ct.cancel(dispatch_id, dispatcher_addr=covalent_server.address)
        result = wait_result(covalent_server, dispatch_id)

        assert str(result.status) == "CANCELLED"
        assert [n["status"] for n in nodes_named(result, "sleep_forever")] == ["CANCELLED"] * 4
        assert all(wait_process_gone(pid) for pid in pids)
        assert wait_until(lambda: job_gone(batch_client, job.name), timeout=60)
        assert len(started()) == 2  # the pending tasks never ran their electron

    def test_cancel_right_after_dispatch_cancels_every_electron(
        self, covalent_server: CovalentServer, tmp_path: Path
    ) -> None:
        # Electrons are flagged at any point of their start: before run(), before their job
        # handle is stored, or after; each must end CANCELLED (or the dispatch never ends).
        electron = ct.electron(sleep_forever, executor="gcpbatch_array")

        @ct.lattice(executor="local", workflow_executor="local")
        def forever(path: str) -> list[int]:
            return [electron(path, x) for x in range(6)]

        dispatch_id = dispatch(covalent_server, forever, str(tmp_path))
        wait_until(lambda: status_of(covalent_server, dispatch_id) == "RUNNING", timeout=60)
        ct.cancel(dispatch_id, dispatcher_addr=covalent_server.address)
        result = wait_result(covalent_server, dispatch_id)

        nodes = nodes_named(result, "sleep_forever")
        why = [(n["status"], n["error"], n["stderr"][-500:]) for n in nodes]
        assert str(result.status) == "CANCELLED", why
        assert [n["status"] for n in nodes] == ["CANCELLED"] * 6, why


def parent_of(cloud: LocalCloud) -> str:
    return f"projects/{cloud.project_id}/locations/{cloud.region}"


def job_gone(batch_client: Any, name: str) -> bool:
    try:
        batch_client.get_job(name=name)
    except NotFound:
        return True
    return False


def server_log(server: CovalentServer) -> str:
    return f"server log:\n{server.log_tail()}"
