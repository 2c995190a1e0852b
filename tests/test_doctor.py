"""``gcpbatch-array doctor`` against the local cloud, and against a fake of the REST APIs the
local cloud lacks (Service Usage, Compute, Cloud Quotas, IAM, Resource Manager, Artifact
Registry): each answer, pass, warn, fail and skip, and that nothing unanswered passes."""

from __future__ import annotations

import argparse
import io
import json
import re
from collections.abc import Callable
from contextlib import redirect_stdout
from typing import Any

import pytest
import requests
import requests.adapters

from covalent_gcpbatch_array.cli.doctor import add_doctor_command, run_checks
from covalent_gcpbatch_array.cli.doctor_checks import bucket_covers
from covalent_gcpbatch_array.cli.doctor_iam import IMAGE_LABELS
from covalent_gcpbatch_array.config import resolve_config
from covalent_gcpbatch_array.local import LocalCloud

#: Checks only Google (or the fake) can answer: on the local cloud alone they must be SKIPPED.
GOOGLE_ONLY = ("apis", "cpu-quota", "job-quota", "act-as", "account-roles", "image", "image-pull")
IMAGE = "us-east1-docker.pkg.dev/local-project/covalent/runner:1"
SA = "tasks@local-project.iam.gserviceaccount.com"


def doctor(argv: list[str], config_file: dict[str, Any] | None = None) -> tuple[int, str]:
    """Run ``gcpbatch-array doctor ARGV`` with ``config_file`` as [executors.gcpbatch_array]."""
    parser = argparse.ArgumentParser()
    add_doctor_command(parser.add_subparsers(), read_config_file=(config_file or {}).__getitem__)
    args = parser.parse_args(["doctor", *argv])
    out = io.StringIO()
    with redirect_stdout(out):
        status = args.handler(args)
    return status, out.getvalue()


def by_name(output: str) -> dict[str, dict[str, Any]]:
    return {check["name"]: check for check in json.loads(output)["checks"]}


class TestOnTheLocalCloud:
    def test_answers_what_it_can_and_skips_the_rest(self, local_cloud: LocalCloud) -> None:
        # The file gives everything; the flag wins over it, as with the executor.
        file = local_cloud.executor_config() | {"bucket_name": "not-this-one"}
        status, output = doctor(["--json", "--bucket", local_cloud.bucket_name], file)
        checks = by_name(output)
        assert status == 0, output
        assert json.loads(output)["ok"] is True
        for name in ("config", "batch", "region", "objects"):
            assert checks[name]["status"] == "pass", checks[name]
        for name in (*GOOGLE_ONLY, "credentials", "versions", "machine"):
            assert checks[name]["status"] == "skipped", checks[name]
        # fake-gcs-server puts every bucket it makes without a location in US-CENTRAL1.
        assert checks["bucket"]["status"] == "warn"
        assert "us-east1" in checks["bucket"]["fix"]
        probes = local_cloud.storage_client().list_blobs(local_cloud.bucket_name)
        assert not [blob.name for blob in probes if "doctor-probe" in blob.name]

    @pytest.mark.parametrize(
        ("location", "data_locations", "region", "covered"),
        [
            ("US-EAST1", [], "us-east1", True),
            ("US", [], "us-east1", True),
            ("US", [], "northamerica-northeast1", True),
            ("EU", [], "us-east1", False),
            ("NAM4", [], "us-east1", True),
            ("NAM4", [], "us-west1", False),
            ("US", ["US-EAST1", "US-EAST4"], "us-east4", True),
            ("US-CENTRAL1", [], "us-east1", False),
        ],
    )
    def test_which_bucket_locations_cover_the_region(
        self, location: str, data_locations: list[str], region: str, covered: bool
    ) -> None:
        # fake-gcs-server gives every bucket US-CENTRAL1, so the pass path is checked here.
        assert bucket_covers(location, data_locations, region) is covered

    def test_a_missing_bucket_fails_with_the_fix(self, local_cloud: LocalCloud) -> None:
        status, output = doctor(["--bucket", "no-such-bucket"], local_cloud.executor_config())
        assert status == 1
        assert re.search(r"^FAIL  bucket +gs://no-such-bucket does not exist$", output, re.M)
        assert (
            "fix: gcloud storage buckets create gs://no-such-bucket --location=us-east1" in output
        )
        assert re.search(r"^FAIL  objects ", output, re.M)
        assert output.splitlines()[-1].startswith("15 checks: ")

    def test_a_bad_region_fails_the_config_and_skips_the_rest(
        self, local_cloud: LocalCloud
    ) -> None:
        status, output = doctor(["--json", "--region", "mars-west1"], local_cloud.executor_config())
        checks = by_name(output)
        assert status == 1
        assert checks["config"]["status"] == "fail"
        assert "region" in checks["config"]["summary"]
        assert {c["status"] for name, c in checks.items() if name != "config"} == {"skipped"}

    def test_a_machine_type_is_checked_against_the_catalogue(self, local_cloud: LocalCloud) -> None:
        _, output = doctor(
            ["--json", "--machine-type", "e2-standard-2"], local_cloud.executor_config()
        )
        machine = by_name(output)["machine"]
        assert machine["status"] == "pass"
        assert "compute catalogue" in machine["summary"]


class FakeGoogle(requests.adapters.BaseAdapter):
    """Google's control-plane REST APIs, as their references describe the answers, in process.

    Each URL is ``http://google.test/{api}/...``; the attributes are the project's state.
    """

    def __init__(self) -> None:
        super().__init__()
        self.enabled = {"batch", "compute", "storage", "logging", "artifactregistry"}
        self.region_quotas = {"CPUS": (24, 2), "PREEMPTIBLE_CPUS": (0, 0), "E2_CPUS": (8, 0)}
        self.batch_quota = "6000"
        self.act_as = True
        self.project_roles = {
            "roles/batch.agentReporter": [f"serviceAccount:{SA}"],
            "roles/logging.logWriter": [f"serviceAccount:{SA}"],
        }
        self.repository_roles = {"roles/artifactregistry.reader": [f"serviceAccount:{SA}"]}
        self.image_labels = dict.fromkeys(IMAGE_LABELS.values(), "")
        self.image_env = ["PYTHON_VERSION=3.11.7"]
        self.image_exists = True
        self.routes: list[tuple[str, str, Callable[..., Any]]] = [
            ("GET", r"/serviceusage/v1/projects/[^/]+/services:batchGet", self._services),
            ("GET", r"/compute/compute/v1/projects/[^/]+/regions/(?P<r>[^/]+)", self._region),
            ("GET", r"/compute/compute/v1/projects/[^/]+/aggregated/machineTypes", self._machines),
            ("GET", r"/cloudquotas/v1/projects/.+/quotaInfos", self._quotas),
            ("GET", r"/cloudresourcemanager/v1/projects/(?P<p>[^/:]+)", self._project),
            ("POST", r"/cloudresourcemanager/v1/projects/[^/]+:getIamPolicy", self._policy),
            ("POST", r"/iam/v1/projects/-/serviceAccounts/[^/]+:testIamPermissions", self._act),
            ("GET", r"/artifactregistry/v1/projects/.+:getIamPolicy", self._repository),
            ("GET", r"/registry/v2/.+/manifests/[^/]+", self._manifest),
            ("GET", r"/registry/v2/.+/blobs/[^/]+", self._blob),
        ]

    def overrides(self) -> dict[str, str]:
        apis = ["serviceusage", "compute", "cloudquotas", "iam", "cloudresourcemanager"]
        return {api: f"http://google.test/{api}" for api in [*apis, "artifactregistry", "registry"]}

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        path = requests.utils.urlparse(request.url).path
        for method, pattern, handler in self.routes:
            match = re.fullmatch(pattern, path)
            if method == request.method and match:
                status, body = handler(request, **match.groupdict())
                break
        else:
            status, body = 404, {"error": {"code": 404, "message": f"no route {path}"}}
        response = requests.Response()
        response.status_code, response.url, response.request = status, request.url, request
        response.raw = io.BytesIO(json.dumps(body).encode())
        return response

    def close(self) -> None:
        pass

    def _services(self, request: requests.PreparedRequest) -> tuple[int, Any]:
        names = requests.utils.urlparse(request.url).query.split("&")
        services = [name.rsplit("%2F", 1)[-1] for name in names]
        return 200, {
            "services": [
                {
                    "name": f"projects/123/services/{s}",
                    "state": "ENABLED" if s.split(".")[0] in self.enabled else "DISABLED",
                }
                for s in services
            ]
        }

    def _region(self, request: requests.PreparedRequest, r: str) -> tuple[int, Any]:
        if r != "us-east1":
            return 404, {"error": {"code": 404, "message": f"region {r} not found"}}
        quotas = [
            {"metric": m, "limit": lim, "usage": use}
            for m, (lim, use) in self.region_quotas.items()
        ]
        zones = [
            f"https://compute.googleapis.com/compute/v1/projects/p/zones/us-east1-{z}"
            for z in "bcd"
        ]
        return 200, {"name": r, "status": "UP", "zones": zones, "quotas": quotas}

    def _machines(self, request: requests.PreparedRequest) -> tuple[int, Any]:
        machine = {"name": "e2-standard-2", "guestCpus": 2, "memoryMb": 8192}
        return 200, {
            "items": {
                "zones/us-east1-b": {"machineTypes": [machine]},
                "zones/europe-west1-b": {"machineTypes": [machine]},
                "zones/us-east1-c": {"warning": {"code": "NO_RESULTS_ON_PAGE"}},
            }
        }

    def _quotas(self, request: requests.PreparedRequest) -> tuple[int, Any]:
        info = {
            "quotaId": "MutationRequestsPerMinutePerProjectPerRegion",
            "dimensionsInfos": [
                {
                    "dimensions": {"region": "us-east1"},
                    "details": {"value": self.batch_quota},
                    "applicableLocations": ["us-east1"],
                }
            ],
        }
        return 200, {"quotaInfos": [info]}

    def _project(self, request: requests.PreparedRequest, p: str) -> tuple[int, Any]:
        return 200, {"projectId": p, "projectNumber": "123"}

    def _policy(self, request: requests.PreparedRequest) -> tuple[int, Any]:
        return 200, {"bindings": [{"role": r, "members": m} for r, m in self.project_roles.items()]}

    def _act(self, request: requests.PreparedRequest) -> tuple[int, Any]:
        return 200, {"permissions": ["iam.serviceAccounts.actAs"]} if self.act_as else {}

    def _repository(self, request: requests.PreparedRequest) -> tuple[int, Any]:
        return 200, {
            "bindings": [{"role": r, "members": m} for r, m in self.repository_roles.items()]
        }

    def _manifest(self, request: requests.PreparedRequest) -> tuple[int, Any]:
        if not self.image_exists:
            return 404, {
                "errors": [{"code": "MANIFEST_UNKNOWN"}],
                "error": {"message": "manifest unknown"},
            }
        return 200, {"schemaVersion": 2, "config": {"digest": "sha256:abc"}}

    def _blob(self, request: requests.PreparedRequest) -> tuple[int, Any]:
        return 200, {"config": {"Env": self.image_env, "Labels": self.image_labels}}


@pytest.fixture
def google() -> FakeGoogle:
    return FakeGoogle()


def checks_with(cloud: LocalCloud, google: FakeGoogle, **settings: Any) -> dict[str, Any]:
    """Run every check: Batch and Cloud Storage on ``cloud``, the other APIs on ``google``."""
    values = cloud.executor_config() | {"container_image_uri": IMAGE, "service_account_email": SA}
    session = requests.Session()
    session.mount("http://google.test/", google)
    results = run_checks(
        resolve_config(values | settings, {}.__getitem__),
        overrides=google.overrides(),
        session=session,
    )
    return {result.name: result for result in results}


class TestGoogleOnlyChecks:
    def test_a_healthy_project(self, local_cloud: LocalCloud, google: FakeGoogle) -> None:
        from covalent_gcpbatch_array._core.envelopes import RuntimeVersions

        here = RuntimeVersions.current()
        google.image_labels = {
            IMAGE_LABELS["python"]: here.python,
            IMAGE_LABELS["covalent"]: here.covalent,
        }
        found = checks_with(local_cloud, google, machine_type="e2-standard-2")
        for name in ("apis", "region", "machine", "cpu-quota", "job-quota", "act-as", "image"):
            assert found[name].status.value == "pass", found[name]
        assert found["image-pull"].status.value == "pass", found["image-pull"]
        assert found["versions"].status.value == "pass", found["versions"]
        assert "us-east1-b" in found["machine"].summary
        assert "europe" not in found["machine"].summary
        # fake-gcs-server has no bucket IAM: the roles are checked on the project only.
        assert found["account-roles"].status.value == "skipped"
        assert "holds the project roles" in found["account-roles"].summary

    def test_each_problem_fails_with_its_fix(
        self, local_cloud: LocalCloud, google: FakeGoogle
    ) -> None:
        google.enabled.discard("batch")
        google.region_quotas["CPUS"] = (24, 23)
        google.act_as = False
        google.repository_roles = {}
        google.image_env = ["PYTHON_VERSION=3.99.1"]
        found = checks_with(local_cloud, google, vcpus=2)
        assert found["apis"].status.value == "fail"
        assert found["apis"].fix.startswith("gcloud services enable batch.googleapis.com")
        assert found["cpu-quota"].status.value == "fail"
        assert "CPUS 1 of 24 free" in found["cpu-quota"].summary
        assert found["act-as"].status.value == "fail"
        assert "roles/iam.serviceAccountUser" in found["act-as"].fix
        assert found["image-pull"].status.value == "fail"
        assert "roles/artifactregistry.reader" in found["image-pull"].fix
        assert found["versions"].status.value == "fail"
        assert "3.99 in the image" in found["versions"].summary

    def test_a_missing_image_and_a_zero_quota_fail(
        self, local_cloud: LocalCloud, google: FakeGoogle
    ) -> None:
        google.image_exists = False
        google.batch_quota = "0"
        found = checks_with(local_cloud, google)
        assert found["image"].status.value == "fail"
        assert "make -C runner_image cloud-build" in found["image"].fix
        assert found["job-quota"].status.value == "fail"
        assert found["versions"].status.value == "fail"  # it cannot read a missing image

    def test_broader_roles_warn_and_missing_ones_fail(
        self, local_cloud: LocalCloud, google: FakeGoogle
    ) -> None:
        google.project_roles["roles/editor"] = [f"serviceAccount:{SA}"]
        assert checks_with(local_cloud, google)["account-roles"].status.value == "warn"
        del google.project_roles["roles/logging.logWriter"]
        roles = checks_with(local_cloud, google)["account-roles"]
        assert roles.status.value == "fail"
        assert "roles/logging.logWriter" in roles.summary

    def test_an_unknown_region_fails(self, local_cloud: LocalCloud, google: FakeGoogle) -> None:
        # us-west1 is in the catalogue, so the configuration is valid; Compute says no.
        found = checks_with(local_cloud, google, region="us-west1")
        assert found["region"].status.value == "fail"
        assert found["cpu-quota"].status.value == "fail"  # the region's quotas are unknown

    def test_an_image_without_its_versions_warns(
        self, local_cloud: LocalCloud, google: FakeGoogle
    ) -> None:
        from covalent_gcpbatch_array._core.envelopes import RuntimeVersions

        google.image_env = [f"PYTHON_VERSION={RuntimeVersions.current().python}.1"]
        versions = checks_with(local_cloud, google)["versions"]
        assert versions.status.value == "warn"
        assert IMAGE_LABELS["covalent"] in versions.summary
