"""ops: durations and the Inspector's edge cases on the local cloud."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from google.cloud import batch_v1

from covalent_gcpbatch_array._core.clients import make_logging_client
from covalent_gcpbatch_array._core.jobs import JobsApi
from covalent_gcpbatch_array._core.storage import TaskStore
from covalent_gcpbatch_array.cli.ops import Inspector, parse_duration
from covalent_gcpbatch_array.exceptions import GCPBatchArrayError
from covalent_gcpbatch_array.local import LocalCloud
from tests.polling import job_reached


class TestParseDuration:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("7d", timedelta(days=7)),
            ("12h", timedelta(hours=12)),
            ("1d12h", timedelta(days=1, hours=12)),
            ("90s", timedelta(seconds=90)),
            ("2w", timedelta(weeks=2)),
            ("0s", timedelta(0)),
            ("1.5h", timedelta(minutes=90)),
            (" 30M ", timedelta(minutes=30)),
        ],
    )
    def test_durations(self, text: str, expected: timedelta) -> None:
        assert parse_duration(text) == expected

    @pytest.mark.parametrize("text", ["", "7", "d", "7 days", "7x", "-1d", "1d-2h"])
    def test_what_is_not_a_duration(self, text: str) -> None:
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(text)


def _inspector(cloud: LocalCloud) -> Inspector:
    storage_client = cloud.storage_client()
    return Inspector(
        JobsApi(cloud.batch_client(), cloud.project_id, cloud.region),
        TaskStore(storage_client, cloud.bucket_name, "covalent-gcpbatch-array"),
        storage_client,
        lambda: make_logging_client(cloud.project_id, cloud.batch_endpoint),
    )


def _finished_job(cloud: LocalCloud, script: str) -> batch_v1.Job:
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
        logs_policy=batch_v1.LogsPolicy(destination=batch_v1.LogsPolicy.Destination.CLOUD_LOGGING),
    )
    made = client.create_job(
        parent=f"projects/{cloud.project_id}/locations/{cloud.region}",
        job=job,
        job_id=f"cga-ops-{uuid.uuid4().hex[:10]}",
    )
    job_reached(client, made.name, {"SUCCEEDED", "FAILED"}, timeout=30)
    return made


class TestLogs:
    @pytest.mark.anyio
    async def test_a_task_that_printed_nothing(self, local_cloud: LocalCloud) -> None:
        job = _finished_job(local_cloud, "true")
        with pytest.raises(GCPBatchArrayError, match="none in Cloud Logging"):
            await _inspector(local_cloud).logs(job.name.rsplit("/", 1)[1], 0)

    @pytest.mark.anyio
    async def test_a_job_gone_from_batch_and_the_bucket(self, local_cloud: LocalCloud) -> None:
        job = _finished_job(local_cloud, "echo lost")
        local_cloud.batch_client().delete_job(name=job.name).result()
        with pytest.raises(GCPBatchArrayError, match="gone from Batch"):
            await _inspector(local_cloud).logs(job.name.rsplit("/", 1)[1], 0)

    @pytest.mark.anyio
    async def test_every_attempt_comes_from_cloud_logging(self, local_cloud: LocalCloud) -> None:
        job = _finished_job(local_cloud, "echo out; echo err >&2")
        logs = await _inspector(local_cloud).logs(job.name.rsplit("/", 1)[1], 0)
        assert (logs.stdout, logs.stderr, logs.source) == ("out\n", "err\n", "cloud-logging")
