"""The Batch emulator against Google's own contract, through the real REST client and LocalCloud.

The contract is the Batch v1 discovery document shipped in google-api-python-client (read at
test time, never copied here): the emulator serves exactly its methods (those it does not
reproduce answer 501), parses the same fields, ignores the output-only ones on create, and
returns every field the client reads. The behaviours Google documents (allocation failures,
/bin/sh scripts, delete and cancel operations, labels, priority, ListJobs' filter and order,
taskEnvironments, requireHostsFile) are each driven through ``batch_v1.BatchServiceClient``.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import googleapiclient
import pytest
from google.api_core import exceptions as api_exceptions
from google.cloud import batch_v1

from covalent_gcpbatch_array.local import LocalCloud
from tests.polling import job_reached

JobState = batch_v1.JobStatus.State
_DISCOVERY = Path(googleapiclient.__file__).parent / "discovery_cache/documents/batch.v1.json"
# The methods the emulator serves, by the discovery document's ids.
SERVED = {
    "batch.projects.locations.jobs.create",
    "batch.projects.locations.jobs.get",
    "batch.projects.locations.jobs.list",
    "batch.projects.locations.jobs.delete",
    "batch.projects.locations.jobs.cancel",
    "batch.projects.locations.jobs.taskGroups.tasks.get",
    "batch.projects.locations.jobs.taskGroups.tasks.list",
    "batch.projects.locations.operations.get",
}

# Fields the discovery document has that the installed client's protos lack (so the emulator,
# which parses with them, refuses them with 400).
NEWER_THAN_THE_CLIENT = {"AllocationPolicy": {"instanceFlexibilityPolicy"}}


def discovery() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(_DISCOVERY.read_text())
    return document


def methods(resources: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for resource in resources.values():
        yield from resource.get("methods", {}).values()
        yield from methods(resource.get("resources", {}))


@pytest.fixture(scope="module")
def cloud() -> Iterator[LocalCloud]:
    with LocalCloud(preload=()) as running:
        running.configure(deletion_delay=1.0, cancellation_delay=1.0)
        yield running


@pytest.fixture(scope="module")
def client(cloud: LocalCloud) -> batch_v1.BatchServiceClient:
    return cloud.batch_client()


def parent(cloud: LocalCloud) -> str:
    return f"projects/{cloud.project_id}/locations/{cloud.region}"


def script_job(text: str, **group: Any) -> batch_v1.Job:
    spec = batch_v1.TaskSpec(runnables=[batch_v1.Runnable(script={"text": text})])
    return batch_v1.Job(task_groups=[batch_v1.TaskGroup(task_spec=spec, **group)])


def create(client: batch_v1.BatchServiceClient, cloud: LocalCloud, job: Any) -> batch_v1.Job:
    job_id = f"c-{uuid.uuid4().hex[:12]}"
    return client.create_job(parent=parent(cloud), job=job, job_id=job_id)


def http(cloud: LocalCloud, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(cloud.batch_endpoint + path, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class TestDiscoveryContract:
    def test_every_method_google_documents_is_served_or_refused_with_501(
        self, cloud: LocalCloud
    ) -> None:
        seen = set()
        for method in methods(discovery()["resources"]):
            seen.add(method["id"])
            path = "/" + method["flatPath"].replace("{projectsId}", cloud.project_id)
            path = path.replace("{locationsId}", cloud.region)
            path = path.replace("{jobsId}", "no-such-job").replace("{taskGroupsId}", "group0")
            path = path.replace("{tasksId}", "0").replace("{operationsId}", "no-such-op")
            body = {} if method["httpMethod"] in ("POST", "PATCH") else None
            status, answer = http(cloud, method["httpMethod"], path, body)
            if method["id"] in SERVED:
                assert status != 501, (method["id"], answer)
            else:
                assert status == 501, (method["id"], status, answer)
                assert "not implemented" in answer["error"]["message"]
        assert seen >= SERVED

    def test_the_job_fields_are_exactly_googles(self) -> None:
        # The emulator parses bodies with the client's protobuf: its fields must be the
        # discovery document's, schema by schema, so an unknown field is refused as Google does.
        schemas = discovery()["schemas"]
        messages = {
            "Job": batch_v1.Job,
            "TaskGroup": batch_v1.TaskGroup,
            "TaskSpec": batch_v1.TaskSpec,
            "Runnable": batch_v1.Runnable,
            "AllocationPolicy": batch_v1.AllocationPolicy,
            "InstancePolicy": batch_v1.AllocationPolicy.InstancePolicy,
            "LogsPolicy": batch_v1.LogsPolicy,
            "Environment": batch_v1.Environment,
            "Task": batch_v1.Task,
            "JobStatus": batch_v1.JobStatus,
        }
        for schema, message in messages.items():
            documented = set(schemas[schema]["properties"])
            parsed = {field.json_name for field in message.pb().DESCRIPTOR.fields}
            # Newer than the client's protos: refused with 400 (docs/local-cloud.md's table).
            missing = documented - parsed - NEWER_THAN_THE_CLIENT.get(schema, set())
            assert parsed <= documented and not missing, (schema, missing)

    def test_an_unknown_field_is_refused_with_400(self, cloud: LocalCloud) -> None:
        job = {"taskGroups": [{"taskSpec": {"runnables": [{"script": {"text": "true"}}]}}]}
        status, answer = http(
            cloud, "POST", f"/v1/{parent(cloud)}/jobs?jobId=c-unknown", {**job, "colour": "red"}
        )
        assert status == 400 and "colour" in answer["error"]["message"]

    def test_output_only_fields_are_ignored_on_create_and_filled_in(
        self, client: batch_v1.BatchServiceClient, cloud: LocalCloud
    ) -> None:
        read_only = {
            name
            for name, field in discovery()["schemas"]["Job"]["properties"].items()
            if field.get("readOnly")
        }
        assert read_only == {"name", "uid", "status", "createTime", "updateTime"}
        job = script_job("true")
        job.uid = "mine"
        job.status.state = JobState.FAILED
        done = job_reached(client, create(client, cloud, job).name)
        assert done.uid != "mine" and done.status.state == JobState.SUCCEEDED
        # Every field the client (and the executor) reads comes back.
        assert done.name and done.create_time and done.update_time and done.status.status_events
        assert done.task_groups[0].name == done.name + "/taskGroups/group0"
        task = client.get_task(name=done.task_groups[0].name + "/tasks/0")
        assert task.status.state == batch_v1.TaskStatus.State.SUCCEEDED and task.name


class TestAllocationPolicy:
    @pytest.mark.parametrize(
        ("policy", "field"),
        [
            ({"machine_type": "n9-standard-4"}, "policy.machine_type"),
            (
                {"accelerators": [{"type_": "nvidia-tesla-k9000", "count": 1}]},
                "policy.accelerators[0].type",
            ),
            (
                {"accelerators": [{"type_": "nvidia-tesla-t4", "count": 3}]},
                "policy.accelerators[0].count",
            ),
        ],
    )
    def test_a_shape_google_lacks_is_accepted_then_fails_naming_the_field(
        self,
        client: batch_v1.BatchServiceClient,
        cloud: LocalCloud,
        policy: dict[str, Any],
        field: str,
    ) -> None:
        job = script_job("true")
        job.allocation_policy = batch_v1.AllocationPolicy(instances=[{"policy": policy}])
        created = create(client, cloud, job)  # accepted, as Google accepts it
        done = job_reached(client, created.name)
        assert done.status.state == JobState.FAILED
        assert field in done.status.status_events[-1].description

    def test_a_zone_of_another_region_and_an_instance_template_fail(
        self, client: batch_v1.BatchServiceClient, cloud: LocalCloud
    ) -> None:
        job = script_job("true")
        job.allocation_policy.location.allowed_locations = ["zones/us-central1-a"]
        assert (
            "allowed_locations"
            in job_reached(client, create(client, cloud, job).name)
            .status.status_events[-1]
            .description
        )
        job = script_job("true")
        job.allocation_policy.instances = [{"instance_template": "my-template"}]
        done = job_reached(client, create(client, cloud, job).name)
        assert "instance_template" in done.status.status_events[-1].description

    def test_a_real_shape_runs(
        self, client: batch_v1.BatchServiceClient, cloud: LocalCloud
    ) -> None:
        job = script_job("true")
        job.allocation_policy.instances = [
            {
                "policy": {
                    "machine_type": "n1-standard-4",
                    "accelerators": [{"type_": "nvidia-tesla-t4", "count": 1}],
                }
            }
        ]
        assert (
            job_reached(client, create(client, cloud, job).name).status.state == JobState.SUCCEEDED
        )

    def test_a_feature_the_local_cloud_lacks_fails_loudly(
        self, client: batch_v1.BatchServiceClient, cloud: LocalCloud
    ) -> None:
        job = script_job("true")
        job.task_groups[0].task_spec.volumes = [{"gcs": {"remote_path": "b"}, "mount_path": "/m"}]
        done = job_reached(client, create(client, cloud, job).name)
        assert done.status.state == JobState.FAILED
        assert "not supported by the local cloud" in done.status.status_events[-1].description


class TestScripts:
    def test_a_shebang_line_is_honoured(
        self, client: batch_v1.BatchServiceClient, cloud: LocalCloud
    ) -> None:
        job = script_job("#!/usr/bin/env python3\nimport sys\nsys.exit(0 if sys.version else 1)\n")
        assert (
            job_reached(client, create(client, cloud, job).name).status.state == JobState.SUCCEEDED
        )

    def test_without_one_the_text_runs_under_bin_sh(
        self, client: batch_v1.BatchServiceClient, cloud: LocalCloud
    ) -> None:
        # [[ ]] is bash: under dash (Debian's /bin/sh) it is "not found", exit 127.
        job = script_job('[[ -n "$HOME" ]]')
        assert job_reached(client, create(client, cloud, job).name).status.state == JobState.FAILED


class TestDeleteAndCancel:
    def test_delete_returns_an_operation_that_is_done_once_the_job_is_gone(
        self, client: batch_v1.BatchServiceClient, cloud: LocalCloud
    ) -> None:
        created = create(client, cloud, script_job("sleep 60"))
        operation = client.delete_job(name=created.name)
        assert not operation.done()
        assert client.get_job(name=created.name).status.state == JobState.DELETION_IN_PROGRESS
        with pytest.raises(api_exceptions.Conflict):
            client.create_job(
                parent=parent(cloud), job=script_job("true"), job_id=created.name.split("/")[-1]
            )
        operation.result(timeout=60)  # polls GetOperation
        with pytest.raises(api_exceptions.NotFound):
            client.get_job(name=created.name)

    def test_cancel_stops_the_tasks_and_keeps_the_job(
        self, client: batch_v1.BatchServiceClient, cloud: LocalCloud
    ) -> None:
        created = create(client, cloud, script_job("sleep 60", task_count=2, parallelism=1))
        operation = client.cancel_job(name=created.name)
        assert client.get_job(name=created.name).status.state in (
            JobState.CANCELLATION_IN_PROGRESS,
            JobState.CANCELLED,
        )
        operation.result(timeout=60)
        job = client.get_job(name=created.name)
        assert job.status.state == JobState.CANCELLED
        states = {task.status.state for task in client.list_tasks(parent=job.task_groups[0].name)}
        assert batch_v1.TaskStatus.State.RUNNING not in states


class TestLabelsAndPriority:
    def test_batch_adds_batch_job_id(
        self, client: batch_v1.BatchServiceClient, cloud: LocalCloud
    ) -> None:
        job = script_job("true")
        job.labels = {"team": "science"}
        created = create(client, cloud, job)
        assert created.labels == {"team": "science", "batch-job-id": created.name.split("/")[-1]}

    @pytest.mark.parametrize(
        "labels",
        [{"goog-x": "1"}, {"google-y": "1"}, {f"l{k}": "v" for k in range(65)}],
        ids=["goog-", "google-", "65 labels"],
    )
    def test_reserved_or_too_many_labels_are_refused(
        self, client: batch_v1.BatchServiceClient, cloud: LocalCloud, labels: dict[str, str]
    ) -> None:
        job = script_job("true")
        job.labels = labels
        with pytest.raises(api_exceptions.BadRequest):
            create(client, cloud, job)

    @pytest.mark.parametrize("priority", [-1, 100])
    def test_priority_outside_0_to_99_is_refused(
        self, client: batch_v1.BatchServiceClient, cloud: LocalCloud, priority: int
    ) -> None:
        job = script_job("true")
        job.priority = priority
        with pytest.raises(api_exceptions.BadRequest, match="priority"):
            create(client, cloud, job)


class TestListJobs:
    def test_filters_on_labels_name_and_create_time_with_order(
        self, client: batch_v1.BatchServiceClient, cloud: LocalCloud
    ) -> None:
        mark = uuid.uuid4().hex[:8]
        names = []
        for _ in range(3):
            job = script_job("true")
            job.labels = {"mark": mark}
            names.append(create(client, cloud, job).name)
        listed = client.list_jobs(
            request={
                "parent": parent(cloud),
                "filter": f'labels.mark="{mark}"',
                "order_by": "create_time desc",
            }
        )
        assert [job.name for job in listed] == names[::-1]
        by_name = client.list_jobs(
            request={"parent": parent(cloud), "filter": f'name="{names[1]}"'}
        )
        assert [job.name for job in by_name] == [names[1]]
        first = client.get_job(name=names[0])
        later = client.list_jobs(
            request={
                "parent": parent(cloud),
                "filter": f'labels.mark="{mark}" AND create_time>"{first.create_time.isoformat()}"',
                "order_by": "name",
            }
        )
        assert [job.name for job in later] == sorted(names[1:])
        every = client.list_jobs(parent=f"projects/{cloud.project_id}/locations/-")
        assert set(names) <= {job.name for job in every}

    def test_an_unknown_filter_field_or_order_is_refused(
        self, client: batch_v1.BatchServiceClient, cloud: LocalCloud
    ) -> None:
        with pytest.raises(api_exceptions.BadRequest):
            list(client.list_jobs(request={"parent": parent(cloud), "filter": "colour=red"}))
        with pytest.raises(api_exceptions.BadRequest):
            list(client.list_jobs(request={"parent": parent(cloud), "order_by": "uid"}))


class TestTaskGroup:
    def test_task_environments_set_the_task_count_and_each_tasks_variables(
        self, client: batch_v1.BatchServiceClient, cloud: LocalCloud
    ) -> None:
        job = script_job('test "$WORD" = "w$BATCH_TASK_INDEX" && test -f "$BATCH_HOSTS_FILE"')
        job.task_groups[0].task_count = 7  # ignored: the environments give the count
        job.task_groups[0].require_hosts_file = True
        job.task_groups[0].task_environments = [{"variables": {"WORD": f"w{k}"}} for k in range(3)]
        done = job_reached(client, create(client, cloud, job).name)
        assert done.status.state == JobState.SUCCEEDED
        assert done.task_groups[0].task_count == 3

    def test_tasks_can_be_unlisted_until_the_job_is_provisioned(
        self, client: batch_v1.BatchServiceClient, cloud: LocalCloud
    ) -> None:
        cloud.configure(tasks_hidden_until_provisioned=True, provisioning_delay=2.0)
        try:
            created = create(client, cloud, script_job("true"))
            assert list(client.list_tasks(parent=created.task_groups[0].name)) == []
            with pytest.raises(api_exceptions.NotFound):
                client.get_task(name=created.task_groups[0].name + "/tasks/0")
            assert job_reached(client, created.name).status.state == JobState.SUCCEEDED
            assert len(list(client.list_tasks(parent=created.task_groups[0].name))) == 1
        finally:
            cloud.configure(tasks_hidden_until_provisioned=False, provisioning_delay=0.0)
