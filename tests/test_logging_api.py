"""Cloud Logging in the local cloud: ``entries:list`` through google-cloud-logging's real client."""

from __future__ import annotations

import json
import urllib.request
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from google.api_core import exceptions as api_exceptions
from google.cloud import batch_v1, logging_v2

from covalent_gcpbatch_array._core.clients import make_logging_client
from covalent_gcpbatch_array.local import LocalCloud
from covalent_gcpbatch_array.local.logging.api import TaskLogIndex
from covalent_gcpbatch_array.local.logging.query import FilterError, parse_filter
from covalent_gcpbatch_array.local.logging.resources import (
    GENERIC_TASK,
    JOB_RESOURCE,
    monitored_resource,
)
from tests.polling import job_reached

FINAL = ("SUCCEEDED", "FAILED")


def _entry(**fields: object) -> dict[str, object]:
    entry: dict[str, object] = {
        "logName": "projects/p/logs/batch_task_logs",
        "resource": {"type": "generic_task", "labels": {"location": "us-east1"}},
        "labels": {"job_uid": "j-1", "task_id": "j-1-group0-3"},
        "severity": "INFO",
        "textPayload": "hello world",
        "timestamp": "2024-05-01T12:00:00.000000Z",
    }
    entry.update(fields)
    return entry


class TestMonitoredResource:
    def test_the_job_resource_and_the_older_generic_task(self) -> None:
        task_id = "j-1-group0-3"
        job = monitored_resource(JOB_RESOURCE, "p", "us-east1", "j-1", task_id)
        assert job == {
            "type": "batch.googleapis.com/Job",
            "labels": {"resource_container": "p", "location": "us-east1", "job_id": "j-1"},
        }
        older = monitored_resource(GENERIC_TASK, "p", "us-east1", "j-1", task_id)
        assert older == {
            "type": "generic_task",
            "labels": {
                "project_id": "p",
                "location": "us-east1",
                "namespace": "",
                "job": "j-1",
                "task_id": "task/j-1-group0-3/0/0",
            },
        }

    def test_an_unknown_resource_type_is_refused(self) -> None:
        with pytest.raises(ValueError, match="generic_task"):
            TaskLogIndex(resource_type="gce_instance")


class TestFilter:
    def test_the_filter_batch_users_write(self) -> None:
        match = parse_filter(
            'logName="projects/p/logs/batch_task_logs" AND labels.job_uid="j-1" '
            'AND labels.task_id="j-1-group0-3"'
        )
        assert match(_entry())
        assert not match(_entry(labels={"job_uid": "j-1", "task_id": "j-1-group0-4"}))
        assert not match(_entry(logName="projects/p/logs/batch_agent_logs"))

    def test_juxtaposition_is_and(self) -> None:
        assert parse_filter('labels.job_uid="j-1" severity=INFO')(_entry())
        assert not parse_filter('labels.job_uid="j-1" severity=ERROR')(_entry())

    def test_a_resource_type_with_a_slash_needs_no_quotes(self) -> None:
        job_resource = {"type": "batch.googleapis.com/Job", "labels": {}}
        assert parse_filter("resource.type=batch.googleapis.com/Job")(_entry(resource=job_resource))

    def test_severity_compares_by_level(self) -> None:
        warning_or_worse = parse_filter("severity>=WARNING")
        assert warning_or_worse(_entry(severity="ERROR"))
        assert not warning_or_worse(_entry(severity="INFO"))
        assert parse_filter("severity<error")(_entry(severity="DEBUG"))

    def test_timestamp_compares_by_time_across_formats(self) -> None:
        after = parse_filter('timestamp>="2024-05-01T13:00:00+01:00"')
        assert after(_entry())  # 12:00Z is 13:00+01:00
        assert not parse_filter('timestamp>"2024-05-01T12:00:00.000000001Z"')(_entry())

    def test_equality_is_exact(self) -> None:
        assert parse_filter('textPayload="hello world"')(_entry())
        assert not parse_filter("textPayload=hello")(_entry())
        assert not parse_filter('textPayload="Hello world"')(_entry())

    def test_missing_fields_match_only_not_equal(self) -> None:
        assert not parse_filter("labels.hostname=x")(_entry())
        assert parse_filter("labels.hostname!=x")(_entry())

    def test_empty_filter_matches_everything(self) -> None:
        assert parse_filter("  ")(_entry())

    @pytest.mark.parametrize(
        ("text", "named"),
        [
            ('textPayload=~"hel+o"', "regular expressions"),
            ('textPayload!~"hel+o"', "regular expressions"),
            ("textPayload:WORLD", "has operator"),
            ('"Hello"', "global restriction"),
            ("hello", "global restriction"),
            ("labels.job_uid=j-*", "wildcards"),
            ("severity=INFO OR severity=ERROR", "OR operator"),
            ("NOT severity=INFO", "NOT operator"),
            ("-severity=INFO", "NOT operator"),
            ("(severity=ERROR OR severity=INFO) labels.job_uid=j-1", "parenthesised"),
            ("labels.job_uid>j-1", "orders only severity and timestamps"),
            ("severity=INFO AND", "AND needs a comparison"),
            ("AND severity=INFO", "AND needs a comparison"),
        ],
    )
    def test_what_the_emulator_does_not_answer_is_refused_by_name(
        self, text: str, named: str
    ) -> None:
        with pytest.raises(FilterError, match=named):
            parse_filter(text)

    @pytest.mark.parametrize(
        "text", ["severity>=LOUD", 'timestamp>="yesterday"', "severity=INFO)", "severity="]
    )
    def test_malformed_filters_are_refused(self, text: str) -> None:
        with pytest.raises(FilterError):
            parse_filter(text)


@pytest.fixture(scope="module")
def logging_client(local_cloud: LocalCloud) -> logging_v2.Client:
    """google-cloud-logging's real client, over HTTP, pointed at the Batch emulator."""
    return make_logging_client(local_cloud.project_id, local_cloud.batch_endpoint)


def _run_job(
    cloud: LocalCloud,
    client: batch_v1.BatchServiceClient,
    script: str,
    *,
    tasks: int = 2,
    retries: int = 0,
    cloud_logging: bool = True,
) -> batch_v1.Job:
    job = batch_v1.Job(
        task_groups=[
            batch_v1.TaskGroup(
                task_count=tasks,
                task_spec=batch_v1.TaskSpec(
                    runnables=[batch_v1.Runnable(script=batch_v1.Runnable.Script(text=script))],
                    max_retry_count=retries,
                ),
            )
        ],
        labels={"team": "science"},
    )
    if cloud_logging:
        job.logs_policy = batch_v1.LogsPolicy(
            destination=batch_v1.LogsPolicy.Destination.CLOUD_LOGGING
        )
    made = client.create_job(
        parent=f"projects/{cloud.project_id}/locations/{cloud.region}",
        job=job,
        job_id=f"logs-{uuid.uuid4().hex[:12]}",
    )
    job_reached(client, made.name, FINAL)
    return made


def _post_json(url: str, body: dict[str, object]) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return answer


def _task_filter(cloud: LocalCloud, job: batch_v1.Job, index: int) -> str:
    return (
        f'logName="projects/{cloud.project_id}/logs/batch_task_logs" '
        f'AND labels.job_uid="{job.uid}" AND labels.task_id="{job.uid}-group0-{index}"'
    )


class TestEntriesList:
    def test_a_tasks_lines_with_batchs_labels(
        self,
        local_cloud: LocalCloud,
        batch_client: batch_v1.BatchServiceClient,
        logging_client: logging_v2.Client,
    ) -> None:
        job = _run_job(
            local_cloud,
            batch_client,
            'echo "out $BATCH_TASK_INDEX"; echo "err $BATCH_TASK_INDEX" >&2; echo "more"',
        )
        entries = list(logging_client.list_entries(filter_=_task_filter(local_cloud, job, 1)))

        assert sorted((e.severity, e.payload) for e in entries) == [
            ("ERROR", "err 1"),
            ("INFO", "more"),
            ("INFO", "out 1"),
        ]
        stdout = [e.payload for e in entries if e.severity == "INFO"]
        assert stdout == ["out 1", "more"]  # in the order printed
        assert all(isinstance(entry, logging_v2.TextEntry) for entry in entries)
        first: Any = entries[0]  # TextEntry's fields are invisible to type checkers
        assert first.log_name == f"projects/{local_cloud.project_id}/logs/batch_task_logs"
        assert first.labels["team"] == "science"  # the job's labels are copied
        assert first.labels["job_uid"] == job.uid
        assert first.labels["task_id"] == f"{job.uid}-group0-1"
        assert first.labels["task_group_name"] == f"{job.name}/taskGroups/group0"
        assert first.resource.type == "batch.googleapis.com/Job"
        assert first.resource.labels == {
            "resource_container": local_cloud.project_id,
            "location": local_cloud.region,
            "job_id": job.uid,
        }
        assert datetime.now(timezone.utc) - first.timestamp < timedelta(minutes=5)

    def test_the_resource_labels_answer_queries(
        self,
        local_cloud: LocalCloud,
        batch_client: batch_v1.BatchServiceClient,
        logging_client: logging_v2.Client,
    ) -> None:
        job = _run_job(local_cloud, batch_client, "echo found", tasks=1)
        query = f"resource.type=batch.googleapis.com/Job AND resource.labels.job_id={job.uid}"
        assert [e.payload for e in logging_client.list_entries(filter_=query)] == ["found"]
        older = f'resource.type=generic_task AND labels.job_uid="{job.uid}"'
        assert list(logging_client.list_entries(filter_=older)) == []

    def test_a_cloud_logging_on_the_older_generic_task_resource(self) -> None:
        with LocalCloud(log_resource_type=GENERIC_TASK, preload=()) as cloud:
            job = _run_job(cloud, cloud.batch_client(), "echo older", tasks=1)
            client = make_logging_client(cloud.project_id, cloud.batch_endpoint)
            query = f'resource.type=generic_task AND resource.labels.job="{job.uid}"'
            entries: list[Any] = list(client.list_entries(filter_=query))
        assert [e.payload for e in entries] == ["older"]
        assert entries[0].resource.labels["task_id"] == f"task/{job.uid}-group0-0/0/0"

    def test_an_unknown_log_resource_type_is_refused_by_local_cloud(self) -> None:
        with pytest.raises(ValueError, match="generic_task"):
            LocalCloud(log_resource_type="gce_instance")

    def test_every_attempt_of_a_retried_task_is_logged(
        self,
        local_cloud: LocalCloud,
        batch_client: batch_v1.BatchServiceClient,
        logging_client: logging_v2.Client,
    ) -> None:
        job = _run_job(
            local_cloud,
            batch_client,
            'echo "attempt $BATCH_TASK_RETRY_ATTEMPT"; [ "$BATCH_TASK_RETRY_ATTEMPT" = 1 ]',
            tasks=1,
            retries=1,
        )
        entries = logging_client.list_entries(filter_=_task_filter(local_cloud, job, 0))
        assert [e.payload for e in entries] == ["attempt 0", "attempt 1"]

    def test_logs_outlive_a_deleted_job(
        self,
        local_cloud: LocalCloud,
        batch_client: batch_v1.BatchServiceClient,
        logging_client: logging_v2.Client,
    ) -> None:
        job = _run_job(local_cloud, batch_client, "echo kept", tasks=1)
        batch_client.delete_job(name=job.name).result()
        with pytest.raises(api_exceptions.NotFound):
            batch_client.get_job(name=job.name)
        entries = logging_client.list_entries(filter_=_task_filter(local_cloud, job, 0))
        assert [e.payload for e in entries] == ["kept"]

    def test_jobs_without_cloud_logging_write_no_entries(
        self,
        local_cloud: LocalCloud,
        batch_client: batch_v1.BatchServiceClient,
        logging_client: logging_v2.Client,
    ) -> None:
        job = _run_job(local_cloud, batch_client, "echo silent", tasks=1, cloud_logging=False)
        assert local_cloud.task_output(job.name.rsplit("/", 1)[1], 0) == "silent\n"
        assert list(logging_client.list_entries(filter_=f'labels.job_uid="{job.uid}"')) == []

    def test_pages_and_order(
        self,
        local_cloud: LocalCloud,
        batch_client: batch_v1.BatchServiceClient,
        logging_client: logging_v2.Client,
    ) -> None:
        job = _run_job(
            local_cloud, batch_client, "for i in 1 2 3 4 5; do echo line$i; done", tasks=1
        )
        task = _task_filter(local_cloud, job, 0)
        ascending = logging_client.list_entries(filter_=task, page_size=2)
        assert [e.payload for e in ascending] == [f"line{i}" for i in range(1, 6)]
        # The client hides its pages: check them on the wire.
        sizes, token = [], ""
        while True:
            answer = _post_json(
                f"{local_cloud.batch_endpoint}/v2/entries:list",
                {
                    "resourceNames": [f"projects/{local_cloud.project_id}"],
                    "filter": task,
                    "pageSize": 2,
                    "pageToken": token,
                },
            )
            sizes.append(len(answer.get("entries", [])))
            token = answer.get("nextPageToken", "")
            if not token:
                break
        assert sizes == [2, 2, 1]
        descending = logging_client.list_entries(filter_=task, order_by=logging_v2.DESCENDING)
        assert [e.payload for e in descending] == [f"line{i}" for i in range(5, 0, -1)]

    def test_other_projects_see_nothing(
        self,
        local_cloud: LocalCloud,
        batch_client: batch_v1.BatchServiceClient,
        logging_client: logging_v2.Client,
    ) -> None:
        job = _run_job(local_cloud, batch_client, "echo mine", tasks=1)
        entries = logging_client.list_entries(
            resource_names=["projects/someone-else"], filter_=f'labels.job_uid="{job.uid}"'
        )
        assert list(entries) == []

    def test_a_bad_filter_is_a_bad_request(self, logging_client: logging_v2.Client) -> None:
        with pytest.raises(api_exceptions.BadRequest, match="Unparseable filter"):
            list(logging_client.list_entries(filter_='textPayload=~"x+"'))

    def test_a_query_the_emulator_cannot_answer_is_400_not_an_empty_list(
        self, logging_client: logging_v2.Client
    ) -> None:
        with pytest.raises(api_exceptions.BadRequest, match="OR operator is not supported"):
            list(logging_client.list_entries(filter_="severity=INFO OR severity=ERROR"))

    def test_other_parents_are_refused(self, logging_client: logging_v2.Client) -> None:
        with pytest.raises(api_exceptions.BadRequest, match="project logs only"):
            list(logging_client.list_entries(resource_names=["folders/123"]))
