"""``gcpbatch-array jobs | tasks | logs | gc`` against the local cloud, through the real clients.

The jobs are made by the executor itself (electrons run by the task image's runner in the
Batch emulator), so the commands read exactly what a real run leaves behind.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import cloudpickle
import covalent  # noqa: F401  (import covalent before the plugin module, as the server does)
import pytest
from covalent._workflow.transport import TransportableObject
from covalent.executor.utils.wrappers import wrapper_fn
from google.cloud import batch_v1

from covalent_gcpbatch_array._core.storage import TaskStore
from covalent_gcpbatch_array.cli.covalent_config import write_executor_config
from covalent_gcpbatch_array.cli.jobs import (
    InspectSettings,
    add_inspect_commands,
    render_jobs,
    render_tasks,
)
from covalent_gcpbatch_array.cli.ops import Inspector, JobSummary
from covalent_gcpbatch_array.exceptions import BatchApiError, ConfigError, GCPBatchArrayError
from covalent_gcpbatch_array.gcpbatch_array import GCPBatchArrayExecutor
from covalent_gcpbatch_array.local import LocalCloud
from tests.polling import job_reached

pytestmark = pytest.mark.slow

# The tasks cannot import this test module: send its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

FAST = {"poll_freq": 0.2, "batch_window": 0.5, "batch_idle_gap": 0.0, "retries": 0}
DISPATCH = "dispatch-inspect"


def greet(x: int) -> int:
    print(f"hello {x}")
    print(f"careful {x}", file=sys.stderr)
    if x == 2:
        raise ValueError("two is not allowed")
    return x


def no_config(key: str) -> Any:
    raise KeyError(key)


@pytest.fixture(scope="module")
def cloud() -> Iterator[LocalCloud]:
    with LocalCloud() as local_cloud:
        yield local_cloud


def _job_ids(cloud: LocalCloud) -> set[str]:
    client = cloud.batch_client()
    parent = f"projects/{cloud.project_id}/locations/{cloud.region}"
    return {job.name.rsplit("/", 1)[1] for job in client.list_jobs(parent=parent)}


def _fan_out(
    cloud: LocalCloud, inputs: list[int], *, as_covalent: bool = False, **overrides: Any
) -> str:
    """Run ``greet`` on every input as one batch; the id of the job it made.

    :param as_covalent: call it as Covalent's runner does (its wrapper over serialized objects)
    """
    before = _job_ids(cloud)
    function: Any = greet
    if as_covalent:
        function = functools.partial(wrapper_fn, TransportableObject(greet), [], [])

    async def main() -> None:
        async def one(node_id: int, value: int) -> None:
            executor = GCPBatchArrayExecutor(**(cloud.executor_config() | FAST | overrides))
            metadata = {"dispatch_id": DISPATCH, "node_id": node_id}
            arg: Any = TransportableObject(value) if as_covalent else value
            with contextlib.suppress(Exception):  # greet(2) fails on purpose
                await executor.run(function, [arg], {}, metadata)

        async with anyio.create_task_group() as tg:
            for node_id, value in enumerate(inputs):
                tg.start_soon(one, 10 + node_id, value)

    anyio.run(main)
    (job_id,) = _job_ids(cloud) - before
    return job_id


@pytest.fixture(scope="module")
def kept_job(cloud: LocalCloud) -> str:
    """Three electrons (the last fails) with keep_objects: manifest and outputs stay."""
    return _fan_out(cloud, [0, 1, 2], as_covalent=True, keep_objects=True)


@pytest.fixture(scope="module")
def cleaned_job(cloud: LocalCloud, kept_job: str) -> str:
    """Two electrons (the second fails) without keep_objects: the job's folder is deleted."""
    job_id = _fan_out(cloud, [0, 2])
    # The executor deletes each task's objects as its electron finishes, and the job's folder
    # (its manifest) when the job's monitor ends. In the Covalent server that happens soon
    # after; here the event loop ends with the electrons, so delete what the monitor would.
    store = TaskStore(cloud.storage_client(), cloud.bucket_name, "covalent-gcpbatch-array")
    store.delete_job(job_id)
    return job_id


def cloud_flags(cloud: LocalCloud) -> list[str]:
    """The flags that point the commands at ``cloud`` (what `local up` prints)."""
    config = cloud.executor_config()
    return [
        *("--project", config["project_id"], "--region", config["region"]),
        *("--bucket", config["bucket_name"]),
        *("--batch-endpoint", config["batch_api_endpoint"]),
        *("--storage-endpoint", config["storage_api_endpoint"]),
    ]


def run_cli(cloud: LocalCloud, *argv: str) -> int:
    """Run one command against ``cloud``, with no Covalent config file; its exit status."""
    parser = argparse.ArgumentParser(prog="gcpbatch-array")
    add_inspect_commands(parser.add_subparsers(required=True), read_config_file=no_config)
    args = parser.parse_args([*argv, *cloud_flags(cloud)])
    status: int = args.handler(args)
    return status


def run_json(cloud: LocalCloud, capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    """Run one command with --json; its output, parsed."""
    assert run_cli(cloud, *argv, "--json") == 0
    return json.loads(capsys.readouterr().out)


def test_registering_the_commands_imports_no_google_client() -> None:
    # `gcpbatch-array --help` must stay fast: the clients load when a command runs.
    script = (
        "import argparse, sys\n"
        "from covalent_gcpbatch_array.cli.jobs import add_inspect_commands\n"
        "add_inspect_commands(argparse.ArgumentParser().add_subparsers())\n"
        "print(sorted(m for m in sys.modules if m.startswith(('google', 'covalent.'))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"


class TestSettings:
    def parse(self, *argv: str) -> argparse.Namespace:
        parser = argparse.ArgumentParser()
        add_inspect_commands(parser.add_subparsers(required=True))
        return parser.parse_args(["jobs", *argv])

    def test_flags_win_over_the_config_file_which_wins_over_defaults(self) -> None:
        config_file = {"project_id": "from-config", "bucket_name": "config-bucket"}

        def read(key: str) -> Any:
            return config_file[key]

        settings = InspectSettings.from_args(self.parse("--project", "from-flags"), read)
        assert settings.project_id == "from-flags"
        assert settings.bucket_name == "config-bucket"
        assert settings.region == "us-east1"
        assert settings.bucket_prefix == "covalent-gcpbatch-array"

    def test_a_missing_bucket_names_the_flag(self) -> None:
        with pytest.raises(ConfigError, match="--bucket"):
            InspectSettings.from_args(self.parse("--project", "my-project"), no_config)

    def test_an_invalid_value_is_refused_as_the_executor_would(self) -> None:
        args = self.parse("--project", "my-project", "--bucket", "b-1", "--region", "Mars")
        with pytest.raises(ConfigError, match="region"):
            InspectSettings.from_args(args, no_config)

    @pytest.mark.parametrize(
        ("batch", "logging", "expected"),
        [
            ("http://127.0.0.1:9", None, "http://127.0.0.1:9"),  # the local cloud serves both
            ("https://batch.example.com", None, ""),  # a real endpoint: Google's Logging
            ("", None, ""),
            ("http://127.0.0.1:9", "http://127.0.0.1:7", "http://127.0.0.1:7"),
        ],
    )
    def test_the_logging_endpoint(self, batch: str, logging: str | None, expected: str) -> None:
        argv = ["--project", "my-project", "--bucket", "b-1", "--batch-endpoint", batch]
        if logging is not None:
            argv += ["--logging-endpoint", logging]
        settings = InspectSettings.from_args(self.parse(*argv), no_config)
        assert settings.logging_api_endpoint == expected


class TestCovalentConfig:
    def test_with_the_settings_local_up_writes_no_flag_is_needed(
        self, cloud: LocalCloud, kept_job: str, tmp_path: Path
    ) -> None:
        # `gcpbatch-array local up` writes these into the user's Covalent config file.
        write_executor_config(tmp_path / "covalent.conf", cloud.executor_config())
        script = (
            "import argparse, sys\n"
            "from covalent_gcpbatch_array.cli.jobs import add_inspect_commands\n"
            "parser = argparse.ArgumentParser()\n"
            "add_inspect_commands(parser.add_subparsers(required=True))\n"
            "args = parser.parse_args(['jobs', '--json'])\n"
            "sys.exit(args.handler(args))\n"
        )
        env = {**os.environ, "COVALENT_CONFIG_DIR": str(tmp_path), "HOME": str(tmp_path)}
        result = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert kept_job in {job["job_id"] for job in json.loads(result.stdout)}


class TestJobs:
    def test_lists_the_executors_jobs_with_states_and_counts(
        self,
        cloud: LocalCloud,
        kept_job: str,
        cleaned_job: str,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        jobs = {job["job_id"]: job for job in run_json(cloud, capsys, "jobs")}
        assert jobs[kept_job]["state"] == "FAILED"  # one of its tasks failed
        assert jobs[kept_job]["task_count"] == 3
        assert jobs[kept_job]["task_states"] == {"SUCCEEDED": 2, "FAILED": 1}
        # FAST's zero idle gap does not flush; the 0.5 s window does.
        assert jobs[kept_job]["flush_reason"] == "window cap"
        assert jobs[cleaned_job]["task_states"] == {"SUCCEEDED": 1, "FAILED": 1}
        order = [job["job_id"] for job in run_json(cloud, capsys, "jobs")]
        assert order.index(cleaned_job) < order.index(kept_job)  # newest first

    def test_jobs_made_by_others_are_not_listed(
        self, cloud: LocalCloud, capsys: pytest.CaptureFixture[str]
    ) -> None:
        client = cloud.batch_client()
        job = batch_v1.Job(
            task_groups=[
                batch_v1.TaskGroup(
                    task_spec=batch_v1.TaskSpec(
                        runnables=[batch_v1.Runnable(script=batch_v1.Runnable.Script(text="true"))]
                    )
                )
            ]
        )
        other = client.create_job(
            parent=f"projects/{cloud.project_id}/locations/{cloud.region}",
            job=job,
            job_id=f"someone-else-{uuid.uuid4().hex[:8]}",
        )
        listed = {job["job_id"] for job in run_json(cloud, capsys, "jobs")}
        assert other.name.rsplit("/", 1)[1] not in listed

    def test_the_table(
        self, cloud: LocalCloud, kept_job: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert run_cli(cloud, "jobs") == 0
        out = capsys.readouterr().out
        row = next(line for line in out.splitlines() if kept_job in line)
        assert row.replace("│", " ").split()[1:6] == ["FAILED", "3", "2", "1", "0"]
        assert "AGE" in out


class TestTasks:
    def test_each_task_with_its_electron(
        self, cloud: LocalCloud, kept_job: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        tasks = run_json(cloud, capsys, "tasks", kept_job)
        assert [task["index"] for task in tasks] == [0, 1, 2]
        by_node = {task["node_id"]: task for task in tasks}
        assert set(by_node) == {10, 11, 12}
        assert {task["dispatch_id"] for task in tasks} == {DISPATCH}
        assert {task["electron"] for task in tasks} == {"greet"}  # through Covalent's wrapper
        assert by_node[10]["state"] == by_node[11]["state"] == "SUCCEEDED"
        assert by_node[12]["state"] == "FAILED"
        assert by_node[12]["exit_code"] == 3  # the runner's "user function raised"
        assert by_node[10]["exit_code"] == 0
        assert all(task["attempts"] == 1 for task in tasks)
        assert "RUNNING" in " ".join(event["description"] for event in by_node[12]["events"])

    def test_without_the_manifest_the_electron_is_unknown(
        self, cloud: LocalCloud, cleaned_job: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        tasks = run_json(cloud, capsys, "tasks", cleaned_job)
        assert [(task["state"], task["dispatch_id"]) for task in tasks] == [
            ("SUCCEEDED", None),
            ("FAILED", None),
        ]

    def test_the_table_says_why_electrons_are_unknown(
        self, cloud: LocalCloud, cleaned_job: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert run_cli(cloud, "tasks", cleaned_job) == 0
        out = capsys.readouterr().out
        assert "manifest is gone" in out
        assert "keep_objects" in out

    def test_an_unknown_job(self, cloud: LocalCloud) -> None:
        with pytest.raises(BatchApiError, match="cga-nope"):
            run_cli(cloud, "tasks", "cga-nope")


class TestTables:
    """Each listing at 80 and at 200 columns, and piped: essential values are never cut."""

    NOW = datetime(2030, 1, 1, tzinfo=timezone.utc)

    @pytest.fixture
    def inspector(self, cloud: LocalCloud) -> Inspector:
        parser = argparse.ArgumentParser()
        add_inspect_commands(parser.add_subparsers(required=True))
        args = parser.parse_args(["jobs", *cloud_flags(cloud)])
        return InspectSettings.from_args(args, no_config).inspector()

    @staticmethod
    def row(text: str, first: str) -> list[str]:
        return next(line.split() for line in text.splitlines() if line.split()[:1] == [first])

    @pytest.mark.parametrize("width", [80, 200])
    def test_jobs(self, inspector: Inspector, kept_job: str, cleaned_job: str, width: int) -> None:
        jobs = anyio.run(inspector.jobs)
        text = render_jobs(jobs, wide=False, width=width, now=self.NOW)
        assert max(len(line) for line in text.splitlines()) <= width
        for job in jobs:
            counts = [str(job.task_states.get(s, 0)) for s in ("SUCCEEDED", "FAILED")]
            age = render_jobs([job], wide=False, width=None, now=self.NOW).split()[-1]
            expected = [job.job_id, job.state, str(job.task_count), *counts, "0", "0", age]
            assert self.row(text, job.job_id) == expected

    @pytest.mark.parametrize("width", [80, 200])
    def test_tasks(self, inspector: Inspector, kept_job: str, width: int) -> None:
        tasks = anyio.run(inspector.tasks, kept_job)
        text = render_tasks(kept_job, tasks, wide=False, width=width)
        lines = text.splitlines()
        assert max(len(line) for line in lines) <= width
        assert lines[1] == f"dispatch {DISPATCH}"  # whole, once, above the table
        for task in tasks:
            row = self.row(text, str(task.index))
            index, node, exit_code = str(task.index), str(task.node_id), str(task.exit_code)
            assert row[:6] == [index, node, "greet", task.state, "1", exit_code]
            assert row[6:9] == ["RUNNING", "->", task.state]  # the last event, shortened
        if width == 200:
            assert "…" not in text

    def test_values_too_long_for_the_width_stay_whole(self) -> None:
        when = self.NOW - timedelta(hours=30)
        job = JobSummary(
            "cga-20300101-000000-0123456789",
            "u",
            "DELETION_IN_PROGRESS",
            100_000,
            {"SUCCEEDED": 99_999, "FAILED": 1},
            when,
            when,
            "full",
        )
        row = self.row(render_jobs([job], wide=False, width=80, now=self.NOW), job.job_id)
        assert row == [job.job_id, "DELETING", "100000", "99999", "1", "0", "0", "1d6h"]
        wide = self.row(render_jobs([job], wide=True, width=80, now=self.NOW), job.job_id)
        assert wide[1] == "DELETION_IN_PROGRESS"
        assert wide[8] == "full"

    @pytest.mark.parametrize("command", ["jobs", "tasks"])
    def test_piped_output_is_neither_cut_nor_padded(
        self,
        cloud: LocalCloud,
        kept_job: str,
        command: str,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        monkeypatch.delenv("COLUMNS", raising=False)
        argv = [command] if command == "jobs" else [command, kept_job]
        for output in ("table", "wide"):
            assert run_cli(cloud, *argv, "-o", output) == 0
            out = capsys.readouterr().out
            assert kept_job in out
            assert "…" not in out
            assert all(line == line.rstrip() for line in out.splitlines())
        if command == "tasks":  # the wide view has Batch's words
            assert "Task state is updated from RUNNING to FAILED on zones/" in out


class TestLogs:
    def test_from_the_bucket_copy(
        self, cloud: LocalCloud, kept_job: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        tasks = run_json(cloud, capsys, "tasks", kept_job)
        index = next(task["index"] for task in tasks if task["node_id"] == 12)
        logs = run_json(cloud, capsys, "logs", kept_job, str(index))
        assert logs["source"] == "bucket"
        assert logs["stdout"] == "hello 2\n"
        assert "careful 2" in logs["stderr"]
        # The remote traceback, from the task's error.pkl (verified with the job's key).
        assert "in greet" in logs["traceback"]
        assert logs["traceback"].rstrip().endswith("ValueError: two is not allowed")

    def test_the_text_output_of_a_failed_task_ends_with_its_traceback(
        self, cloud: LocalCloud, kept_job: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        index = next(
            t["index"] for t in run_json(cloud, capsys, "tasks", kept_job) if t["node_id"] == 12
        )
        assert run_cli(cloud, "logs", kept_job, str(index)) == 0
        out = capsys.readouterr().out
        assert f"===== traceback of task {index} of job {kept_job}" in out
        assert out.rstrip().endswith("ValueError: two is not allowed")

    def test_from_cloud_logging_once_the_bucket_copy_is_gone(
        self, cloud: LocalCloud, cleaned_job: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        both = [run_json(cloud, capsys, "logs", cleaned_job, str(i)) for i in (0, 1)]
        assert {logs["source"] for logs in both} == {"cloud-logging"}
        assert sorted(logs["stdout"] for logs in both) == ["hello 0\n", "hello 2\n"]
        assert all("careful" in logs["stderr"] for logs in both)
        # error.pkl went with the folder: the runner logged the traceback for this.
        failed = next(logs for logs in both if "hello 2" in logs["stdout"])
        assert "in greet" in failed["stderr"]
        assert "ValueError: two is not allowed" in failed["stderr"]

    def test_the_text_output(
        self, cloud: LocalCloud, cleaned_job: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert run_cli(cloud, "logs", cleaned_job, "0") == 0
        out = capsys.readouterr().out
        assert "===== stdout of task 0" in out
        assert "(Cloud Logging)" in out
        assert "===== stderr of task 0" in out

    def test_a_task_index_the_job_does_not_have(self, cloud: LocalCloud, cleaned_job: str) -> None:
        with pytest.raises(GCPBatchArrayError, match="tasks 0 to 1, not 5"):
            run_cli(cloud, "logs", cleaned_job, "5")


def _labelled_job(cloud: LocalCloud, script: str) -> batch_v1.Job:
    """A job that carries the executor's label (as if it had made it), running ``script``."""
    client = cloud.batch_client()
    job = batch_v1.Job(
        task_groups=[
            batch_v1.TaskGroup(
                task_spec=batch_v1.TaskSpec(
                    runnables=[batch_v1.Runnable(script=batch_v1.Runnable.Script(text=script))]
                )
            )
        ],
        labels={"created-by": "covalent-gcpbatch-array"},
    )
    return client.create_job(
        parent=f"projects/{cloud.project_id}/locations/{cloud.region}",
        job=job,
        job_id=f"cga-test-{uuid.uuid4().hex[:10]}",
    )


class TestGc:
    """On a cloud of its own: gc deletes every old finished job in the project."""

    @pytest.fixture
    def gc_cloud(self) -> Iterator[LocalCloud]:
        with LocalCloud(preload=()) as local_cloud:
            yield local_cloud

    def _folder(self, cloud: LocalCloud, job_id: str) -> list[str]:
        bucket = cloud.storage_client().bucket(cloud.bucket_name)
        prefix = f"covalent-gcpbatch-array/{job_id}/"
        return sorted(blob.name for blob in bucket.list_blobs(prefix=prefix))

    def _write(self, cloud: LocalCloud, job_id: str) -> None:
        bucket = cloud.storage_client().bucket(cloud.bucket_name)
        for name in ("manifest.json", "tasks/0/stdout"):
            bucket.blob(f"covalent-gcpbatch-array/{job_id}/{name}").upload_from_string(b"x")

    def test_finished_jobs_and_orphan_folders_go_running_jobs_stay(
        self, gc_cloud: LocalCloud, capsys: pytest.CaptureFixture[str]
    ) -> None:
        client = gc_cloud.batch_client()
        done = _labelled_job(gc_cloud, "echo done")
        running = _labelled_job(gc_cloud, "sleep 600")
        done_id, running_id = (job.name.rsplit("/", 1)[1] for job in (done, running))
        orphan_id = f"cga-orphan-{uuid.uuid4().hex[:8]}"
        for job_id in (done_id, running_id, orphan_id):
            self._write(gc_cloud, job_id)
        job_reached(client, done.name, {"SUCCEEDED"}, timeout=30)
        job_reached(client, running.name, {"RUNNING"}, timeout=30)

        young = run_json(gc_cloud, capsys, "gc", "--older-than", "1h")
        assert young["deleted_jobs"] == young["deleted_folders"] == []

        dry = run_json(gc_cloud, capsys, "gc", "--older-than", "0s", "--dry-run")
        assert dry["deleted_jobs"] == [done_id]
        assert dry["deleted_folders"] == []  # the orphan is younger than the 1h grace
        assert dry["kept_unfinished"] == [running_id]
        assert self._folder(gc_cloud, done_id)  # nothing deleted

        report = run_json(gc_cloud, capsys, "gc", "--older-than", "0s", "--orphan-grace", "0s")
        assert report["deleted_jobs"] == [done_id]
        assert report["deleted_folders"] == [orphan_id]
        assert report["kept_unfinished"] == [running_id]
        assert report["deleted_objects"] == 4
        assert self._folder(gc_cloud, done_id) == self._folder(gc_cloud, orphan_id) == []
        assert len(self._folder(gc_cloud, running_id)) == 2
        remaining = {job.name for job in client.list_jobs(parent=done.name.rsplit("/", 2)[0])}
        assert remaining == {running.name}
        client.delete_job(name=running.name).result()

    def test_the_age_must_be_a_duration(self) -> None:
        parser = argparse.ArgumentParser()
        add_inspect_commands(parser.add_subparsers(required=True))
        with pytest.raises(SystemExit):
            parser.parse_args(["gc", "--older-than", "a week"])
