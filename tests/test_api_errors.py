"""Google's API errors: status names beside HTTP statuses, over REST and over gRPC."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import grpc
import pytest
from google.api_core import exceptions as api_exceptions
from google.cloud import batch_v1

from covalent_gcpbatch_array.local import LocalCloud
from covalent_gcpbatch_array.local.api_errors import ApiError


class TestStatusNames:
    def test_an_http_status_has_its_usual_name(self) -> None:
        assert ApiError(400, "bad").status == "INVALID_ARGUMENT"
        assert ApiError(404, "gone").status == "NOT_FOUND"

    def test_a_400_may_be_a_failed_precondition(self) -> None:
        error = ApiError.failed_precondition("Job j is SUCCEEDED")
        assert (error.code, error.status) == (400, "FAILED_PRECONDITION")
        assert error.to_json() == {
            "error": {"code": 400, "message": "Job j is SUCCEEDED", "status": "FAILED_PRECONDITION"}
        }

    def test_a_name_google_never_pairs_with_the_status_is_refused(self) -> None:
        with pytest.raises(
            ValueError, match=r"with 409 use one of \['ABORTED', 'ALREADY_EXISTS'\]"
        ):
            ApiError(409, "x", status="FAILED_PRECONDITION")
        with pytest.raises(ValueError, match="'NO_SUCH_CODE'"):
            ApiError(400, "x", status="NO_SUCH_CODE")


@pytest.fixture(scope="module")
def cloud() -> Iterator[LocalCloud]:
    with LocalCloud(preload=(), cancellation_delay=0, deletion_delay=600) as running:
        yield running


def ended_and_deleting_jobs(cloud: LocalCloud) -> tuple[str, str]:
    """A CANCELLED job and one DELETION_IN_PROGRESS: neither can be cancelled."""
    client = cloud.batch_client()
    parent = f"projects/{cloud.project_id}/locations/{cloud.region}"
    spec = batch_v1.TaskSpec(runnables=[batch_v1.Runnable(script={"text": "sleep 60"})])
    job = batch_v1.Job(task_groups=[batch_v1.TaskGroup(task_spec=spec)])
    ended, deleting = (
        client.create_job(parent=parent, job=job, job_id=f"e-{uuid.uuid4().hex[:12]}").name
        for _ in range(2)
    )
    client.cancel_job(name=ended).result(timeout=60)  # polls GetOperation
    client.delete_job(name=deleting)
    return ended, deleting


class TestCancellingAJobThatCannotBe:
    def test_answers_failed_precondition_over_rest(self, cloud: LocalCloud) -> None:
        client = cloud.batch_client()
        for name in ended_and_deleting_jobs(cloud):
            with pytest.raises(api_exceptions.BadRequest) as refused:
                client.cancel_job(name=name)
            assert refused.value.code == 400
            assert refused.value.response is not None
            assert refused.value.response.json()["error"]["status"] == "FAILED_PRECONDITION"

    def test_answers_failed_precondition_over_grpc(self, cloud: LocalCloud) -> None:
        with cloud.batch_grpc_client() as client:
            for name in ended_and_deleting_jobs(cloud):
                with pytest.raises(
                    api_exceptions.FailedPrecondition, match="can be cancelled"
                ) as refused:
                    client.cancel_job(name=name)
                assert refused.value.grpc_status_code == grpc.StatusCode.FAILED_PRECONDITION  # 9
