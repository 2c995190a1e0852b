"""LocalCloud: both emulators together, driven through the real Google clients."""

from __future__ import annotations

import json
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from google.api_core import exceptions as api_exceptions
from google.cloud import batch_v1
from google.protobuf import duration_pb2

from covalent_gcpbatch_array.config import ExecutorConfig
from covalent_gcpbatch_array.exceptions import GCPBatchArrayError
from covalent_gcpbatch_array.local import LocalCloud, LocalCloudError
from covalent_gcpbatch_array.local.process import free_port
from tests.polling import job_reached, wait_until

# What each task of the object-writing job runs: the real storage client, reaching the local
# GCS only through STORAGE_EMULATOR_HOST, which the emulator sets as a VM's environment would.
WRITE_OBJECT = textwrap.dedent(
    """
    import os
    from google.cloud import storage
    index, count = os.environ["BATCH_TASK_INDEX"], os.environ["BATCH_TASK_COUNT"]
    blob = storage.Client().bucket(os.environ["BUCKET"]).blob(f"{os.environ['PREFIX']}/{index}.txt")
    blob.upload_from_string(f"task {index} of {count}", if_generation_match=0)
    """
)


def parent_of(cloud: LocalCloud) -> str:
    return f"projects/{cloud.project_id}/locations/{cloud.region}"


def script_job(
    script: str,
    task_count: int,
    env: dict[str, str] | None = None,
    max_retry_count: int = 0,
) -> batch_v1.Job:
    runnable = batch_v1.Runnable(script=batch_v1.Runnable.Script(text=script))
    task_spec = batch_v1.TaskSpec(
        runnables=[runnable],
        environment=batch_v1.Environment(variables=env or {}),
        max_retry_count=max_retry_count,
        max_run_duration=duration_pb2.Duration(seconds=120),
    )
    group = batch_v1.TaskGroup(task_spec=task_spec, task_count=task_count)
    return batch_v1.Job(task_groups=[group])


def run_job(
    client: batch_v1.BatchServiceClient, cloud: LocalCloud, job: batch_v1.Job, timeout: float = 120
) -> batch_v1.Job:
    """Create ``job`` and poll it until it ends; return its last state."""
    created = client.create_job(
        parent=parent_of(cloud), job=job, job_id=f"t-{uuid.uuid4().hex[:12]}"
    )
    return job_reached(client, created.name, {"SUCCEEDED", "FAILED"}, timeout=timeout)


def our_children() -> set[int]:
    """Pids of this process's live children (zombies excluded)."""
    pids: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        children = (task / "children").read_text().split()
        pids.update(int(pid) for pid in children)
    return {pid for pid in pids if not _zombie(pid)}


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except FileNotFoundError:
        return True


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True  # it answered, with an error status
    except OSError:
        return False


class TestScriptJob:
    @pytest.mark.slow
    def test_each_task_writes_its_own_object(
        self, local_cloud: LocalCloud, batch_client: batch_v1.BatchServiceClient
    ) -> None:
        prefix = f"script-{uuid.uuid4().hex[:8]}"
        script = f"{shlex.quote(sys.executable)} -c {shlex.quote(WRITE_OBJECT)}"
        env = {"BUCKET": local_cloud.bucket_name, "PREFIX": prefix}
        job = run_job(batch_client, local_cloud, script_job(script, 5, env))

        assert job.status.state == batch_v1.JobStatus.State.SUCCEEDED, job.status
        blobs = local_cloud.storage_client().list_blobs(local_cloud.bucket_name, prefix=prefix)
        contents = {blob.name: blob.download_as_text() for blob in blobs}
        assert contents == {f"{prefix}/{i}.txt": f"task {i} of 5" for i in range(5)}

    def test_injected_preemption_is_retried(
        self, local_cloud: LocalCloud, batch_client: batch_v1.BatchServiceClient
    ) -> None:
        before = local_cloud.stats()["task_attempts"]
        local_cloud.fail_task(index=1, attempt=0, exit_code=50001)
        job = run_job(batch_client, local_cloud, script_job("true", 3, max_retry_count=1))

        assert job.status.state == batch_v1.JobStatus.State.SUCCEEDED, job.status
        assert local_cloud.stats()["task_attempts"] - before == 4
        task = batch_client.get_task(name=f"{job.name}/taskGroups/group0/tasks/1")
        assert any(event.task_execution.exit_code == 50001 for event in task.status.status_events)

    def test_task_output_is_readable(
        self, local_cloud: LocalCloud, batch_client: batch_v1.BatchServiceClient
    ) -> None:
        job = run_job(batch_client, local_cloud, script_job('echo "hi from $BATCH_TASK_INDEX"', 2))
        job_id = job.name.rsplit("/", 1)[1]
        assert local_cloud.task_output(job_id, 1).strip() == "hi from 1"
        with pytest.raises(LocalCloudError, match="404"):
            local_cloud.task_output("no-such-job", 0)


class TestAdmin:
    def test_stats_count_calls_by_method(
        self, local_cloud: LocalCloud, batch_client: batch_v1.BatchServiceClient
    ) -> None:
        before = local_cloud.stats()
        job = run_job(batch_client, local_cloud, script_job("true", 2))
        gets_in_run_job = local_cloud.stats()["api_calls"]["GetJob"] - before["api_calls"].get(
            "GetJob", 0
        )
        list(batch_client.list_tasks(parent=f"{job.name}/taskGroups/group0"))
        batch_client.get_job(name=job.name)
        after = local_cloud.stats()

        def delta(method: str) -> int:
            return int(after["api_calls"].get(method, 0) - before["api_calls"].get(method, 0))

        assert delta("CreateJob") == 1
        assert delta("GetJob") == gets_in_run_job + 1
        assert gets_in_run_job >= 1
        assert delta("ListTasks") == 1
        assert after["jobs_created"] - before["jobs_created"] == 1
        assert after["task_attempts"] - before["task_attempts"] == 2

    def test_failed_calls_reach_the_client(
        self, local_cloud: LocalCloud, batch_client: batch_v1.BatchServiceClient
    ) -> None:
        parent = parent_of(local_cloud)
        local_cloud.fail_calls("ListJobs", status=503, count=1)
        with pytest.raises(api_exceptions.ServiceUnavailable):
            list(batch_client.list_jobs(parent=parent, retry=None))
        local_cloud.fail_calls("CreateJob", status=429, count=1)
        with pytest.raises(api_exceptions.TooManyRequests):
            batch_client.create_job(
                parent=parent, job=script_job("true", 1), job_id=f"t-{uuid.uuid4().hex[:12]}"
            )
        # Used up: the next calls succeed.
        list(batch_client.list_jobs(parent=parent, retry=None))

    def test_the_clients_own_retry_hides_one_503(
        self, local_cloud: LocalCloud, batch_client: batch_v1.BatchServiceClient
    ) -> None:
        job = run_job(batch_client, local_cloud, script_job("true", 1))
        before = local_cloud.stats()["api_calls"]["GetJob"]
        local_cloud.fail_calls("GetJob", status=503, count=1)
        assert batch_client.get_job(name=job.name).name == job.name
        assert local_cloud.stats()["api_calls"]["GetJob"] - before == 2

    def test_configure_changes_only_what_is_given(self, local_cloud: LocalCloud) -> None:
        original = local_cloud.settings()
        try:
            now = local_cloud.configure(max_running_tasks=3, jobs_per_minute=100)
            assert now["max_running_tasks"] == 3
            assert now["jobs_per_minute"] == 100
            assert now["provisioning_delay"] == original["provisioning_delay"]
            assert local_cloud.settings() == now
        finally:
            local_cloud.configure(
                max_running_tasks=original["max_running_tasks"],
                jobs_per_minute=original["jobs_per_minute"],
            )
        assert local_cloud.settings() == original

    def test_the_quota_window_is_a_knob_and_jobs_per_minute_goes_alone(
        self, local_cloud: LocalCloud
    ) -> None:
        original = local_cloud.settings()
        try:
            now = local_cloud.configure(jobs_per_window=2, quota_window_seconds=5)
            assert (now["jobs_per_window"], now["quota_window_seconds"]) == (2, 5.0)
            with pytest.raises(LocalCloudError, match="jobs_per_minute sets the quota and its"):
                local_cloud.configure(jobs_per_minute=1, quota_window_seconds=5)
            assert local_cloud.settings() == now
        finally:
            local_cloud.configure(
                jobs_per_window=original["jobs_per_window"],
                quota_window_seconds=original["quota_window_seconds"],
            )
        assert local_cloud.settings() == original

    def test_bad_admin_request_is_a_clear_error(self, local_cloud: LocalCloud) -> None:
        with pytest.raises(LocalCloudError, match="refused POST /_emulator/fail_calls: 400"):
            local_cloud.fail_calls("CreateJob", status=503, count="two")  # type: ignore[arg-type]


class TestConfiguration:
    def test_executor_config_points_at_both_emulators(self, local_cloud: LocalCloud) -> None:
        config = local_cloud.executor_config()
        assert config == {
            "project_id": "local-project",
            "region": "us-east1",
            "bucket_name": "covalent-local",
            "container_image_uri": "local/covalent-gcpbatch-array-runner:latest",
            "batch_api_endpoint": local_cloud.batch_endpoint,
            "storage_api_endpoint": local_cloud.storage_endpoint,
        }
        assert local_cloud.batch_endpoint.startswith("http://127.0.0.1:")
        assert local_cloud.storage_endpoint.startswith("http://127.0.0.1:")
        assert local_cloud.batch_endpoint != local_cloud.storage_endpoint

    def test_executor_config_passes_the_executors_validation(self, local_cloud: LocalCloud) -> None:
        from covalent_gcpbatch_array.config import DEFAULTS

        validated = ExecutorConfig.from_values({**DEFAULTS, **local_cloud.executor_config()})
        assert validated.batch_api_endpoint == local_cloud.batch_endpoint
        assert validated.storage_api_endpoint == local_cloud.storage_endpoint

    def test_jobs_per_minute_is_the_quota_over_a_minute(self) -> None:
        cloud = LocalCloud(jobs_per_minute=20)
        assert (cloud.jobs_per_window, cloud.quota_window_seconds) == (20, 60.0)
        short = LocalCloud(jobs_per_window=1, quota_window_seconds=5)
        assert (short.jobs_per_window, short.quota_window_seconds) == (1, 5)
        with pytest.raises(ValueError, match="jobs_per_minute is the quota over a 60 s window"):
            LocalCloud(jobs_per_minute=1, quota_window_seconds=5)

    def test_every_emulator_knob_is_a_constructor_argument(self) -> None:
        with LocalCloud(
            provisioning_delay=600,
            deletion_delay=600,
            cancellation_delay=0,
            tasks_hidden_until_provisioned=True,
            preload=(),
        ) as cloud:
            knobs = {"deletion_delay": 600, "cancellation_delay": 0}
            assert (
                cloud.settings().items()
                >= {**knobs, "tasks_hidden_until_provisioned": True}.items()
            )
            client = cloud.batch_client()
            cancelled = client.create_job(
                parent=parent_of(cloud), job=script_job("true", 2), job_id="hidden-tasks"
            )
            group = f"{cancelled.name}/taskGroups/group0"
            assert list(client.list_tasks(parent=group)) == []  # not provisioned yet
            assert not client.get_job(name=cancelled.name).status.task_groups  # nor counted
            client.cancel_job(name=cancelled.name)
            job_reached(client, cancelled.name, {"CANCELLED"}, timeout=30)
            deleted = client.create_job(
                parent=parent_of(cloud), job=script_job("true", 1), job_id="slow-delete"
            )
            operation = client.delete_job(name=deleted.name)
            assert not operation.done()
            state = client.get_job(name=deleted.name).status.state
            assert state == batch_v1.JobStatus.State.DELETION_IN_PROGRESS

    def test_bucket_exists(self, local_cloud: LocalCloud) -> None:
        client = local_cloud.storage_client()
        assert client.get_bucket(local_cloud.bucket_name).name == "covalent-local"
        assert local_cloud.environment() == {"STORAGE_EMULATOR_HOST": local_cloud.storage_endpoint}

    def test_importing_the_package_imports_neither_covalent_nor_google(self) -> None:
        # The package docstring's promise: LocalCloud's import is cheap (covalent and the Google
        # libraries, google-auth included, take seconds); they load when a client is made.
        code = (
            "import sys, covalent_gcpbatch_array.local; "
            "import json; print(json.dumps(sorted("
            "m for m in sys.modules if m == 'covalent' or m.startswith(('covalent.', 'google'))"
            ")))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        assert json.loads(out.stdout) == []


def server_pids(cloud: LocalCloud) -> tuple[int, int, int]:
    """The process ids of the cloud's three servers: Batch, fake-gcs-server, the GCS proxy."""
    assert cloud.gcs_proxy_pid is not None, "the GCS proxy runs by default"
    return cloud.batch_pid, cloud.storage_pid, cloud.gcs_proxy_pid


class TestLifecycle:
    def test_sync_context_manager_starts_and_stops_both(
        self, wait_process_gone: Callable[[int], bool]
    ) -> None:
        children_before = our_children()
        with LocalCloud(preload=(), project_id="p-sync", bucket_name="b-sync") as cloud:
            pids = server_pids(cloud)
            assert cloud.is_running()
            assert cloud.storage_client().get_bucket("b-sync").name == "b-sync"
            jobs = cloud.batch_client().list_jobs(parent="projects/p-sync/locations/us-east1")
            assert list(jobs) == []
            workdir = cloud.workdir
            assert (workdir / "batch-server.log").exists()
        assert not cloud.is_running()
        assert all(wait_process_gone(pid) for pid in pids)
        assert our_children() <= children_before
        assert not workdir.exists()  # our temporary folder is removed
        with pytest.raises(LocalCloudError, match="not running"):
            _ = cloud.batch_endpoint
        with pytest.raises(LocalCloudError, match="starts once"):
            cloud.start()

    def test_processes_are_gone_when_the_body_raises(
        self, tmp_path: Path, wait_process_gone: Callable[[int], bool]
    ) -> None:
        with (
            pytest.raises(RuntimeError, match="boom"),
            LocalCloud(preload=(), workdir=tmp_path) as cloud,
        ):
            pids = server_pids(cloud)
            raise RuntimeError("boom")
        assert all(wait_process_gone(pid) for pid in pids)
        # A workdir we were given is kept, logs included.
        assert (tmp_path / "batch-server.log").exists()
        assert (tmp_path / "fake-gcs-server.log").exists()

    @pytest.mark.anyio
    async def test_async_context_manager_does_not_block_the_loop(
        self, wait_process_gone: Callable[[int], bool]
    ) -> None:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await anyio.sleep(0.01)

        async with anyio.create_task_group() as tg:
            tg.start_soon(tick)
            async with LocalCloud(preload=()) as cloud:
                ticks_during_start = ticks
                pids = server_pids(cloud)
                endpoint = cloud.batch_endpoint
                assert cloud.is_running()
                stats = await anyio.to_thread.run_sync(cloud.stats)
                assert stats["jobs_created"] == 0
            tg.cancel_scope.cancel()
        # The loop kept running while the servers started (readiness waits in a thread).
        assert ticks_during_start > 0
        assert all(wait_process_gone(pid) for pid in pids)
        assert not answers(f"{endpoint}/_emulator/stats")

    @pytest.mark.anyio
    async def test_async_servers_are_forked_by_the_loops_thread(self) -> None:
        # Children die with the thread that forked them, and anyio retires idle worker threads
        # after 10 s: the servers must be children of the loop's thread, not of the worker
        # that waited for them to be ready.
        async with LocalCloud(preload=()) as cloud:
            loop_thread = threading.get_native_id()
            children = await anyio.Path(f"/proc/self/task/{loop_thread}/children").read_text()
            assert {str(pid) for pid in server_pids(cloud)} <= set(children.split())

    def test_a_server_that_cannot_start_leaves_nothing_behind(self, tmp_path: Path) -> None:
        storage_port = free_port()
        children_before = our_children()
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            busy = taken.getsockname()[1]
            cloud = LocalCloud(
                preload=(), workdir=tmp_path, batch_port=busy, storage_port=storage_port
            )
            with pytest.raises(LocalCloudError, match="Batch emulator exited"):
                cloud.start()
        wait_until(lambda: our_children() <= children_before, what="our children to end")
        assert not answers(f"http://127.0.0.1:{storage_port}/storage/v1/b")

    def test_no_orphans_when_the_owner_is_killed(
        self, tmp_path: Path, wait_process_gone: Callable[[int], bool]
    ) -> None:
        script = textwrap.dedent(
            """
            import sys, threading
            from covalent_gcpbatch_array.local import LocalCloud
            # A killed owner cannot remove a temporary workdir: give it one pytest removes.
            cloud = LocalCloud(preload=(), workdir=sys.argv[1]).start()
            print(cloud.batch_pid, cloud.storage_pid, cloud.gcs_proxy_pid, flush=True)
            threading.Event().wait()
            """
        )
        owner = subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert owner.stdout is not None
            pids = [int(pid) for pid in owner.stdout.readline().split()]
            assert len(pids) == 3
            owner.send_signal(signal.SIGKILL)
            owner.wait()
            assert all(wait_process_gone(pid) for pid in pids)
        finally:
            owner.kill()
            owner.wait()
            if owner.stdout is not None:
                owner.stdout.close()


class TestPublicApi:
    def test_exported_members(self) -> None:
        import covalent_gcpbatch_array.local as local

        assert local.__all__ == ["LocalCloud", "LocalCloudError"]
        assert local.LocalCloud.__module__ == "covalent_gcpbatch_array.local.cloud"
        # One exception hierarchy, in one module.
        assert local.LocalCloudError.__module__ == "covalent_gcpbatch_array.exceptions"
        assert issubclass(LocalCloudError, GCPBatchArrayError)
