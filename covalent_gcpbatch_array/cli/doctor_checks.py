"""The checks of ``gcpbatch-array doctor``: can this configuration run jobs in this project?

Each check asks Google (or the emulator the configuration points at) one question through the
clients the executor uses (google-cloud-batch, google-cloud-storage) or, for the APIs the
executor never calls (Service Usage, Compute, IAM, Resource Manager, Artifact Registry, Cloud
Quotas), through plain REST on a ``requests`` session (google-auth's ``AuthorizedSession``).
It answers :class:`Status` PASS, WARN or FAIL with the fix, or SKIP when nothing here can
answer it: an emulator such as the local cloud has no Service Usage or IAM, and a question it
cannot answer is never reported as passed.

The IAM and image checks are in :mod:`covalent_gcpbatch_array.cli.doctor_iam`.
"""

from __future__ import annotations

import enum
import functools
import math
import secrets
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import requests
from google.api_core import exceptions as api_exceptions

from covalent_gcpbatch_array._core.catalogue import catalogue
from covalent_gcpbatch_array.config import ExecutorConfig

if TYPE_CHECKING:
    import google.cloud.storage as storage
    from google.cloud import batch_v1

__all__ = [
    "GOOGLE_ENDPOINTS",
    "CheckResult",
    "Probe",
    "Skip",
    "Status",
    "bucket_covers",
    "platform_checks",
]

#: The REST APIs the doctor asks beyond Batch and Cloud Storage, and Google's base URLs.
GOOGLE_ENDPOINTS: dict[str, str] = {
    "serviceusage": "https://serviceusage.googleapis.com",
    "compute": "https://compute.googleapis.com",
    "cloudquotas": "https://cloudquotas.googleapis.com",
    "iam": "https://iam.googleapis.com",
    "cloudresourcemanager": "https://cloudresourcemanager.googleapis.com",
    "artifactregistry": "https://artifactregistry.googleapis.com",
}
#: The services a job needs enabled in the project.
REQUIRED_SERVICES = (
    "batch.googleapis.com",
    "compute.googleapis.com",
    "storage.googleapis.com",
    "logging.googleapis.com",
    "artifactregistry.googleapis.com",
)
#: What the executor's identity does with task objects: upload, read, list and delete them.
OBJECT_PERMISSIONS = (
    "storage.objects.create",
    "storage.objects.get",
    "storage.objects.list",
    "storage.objects.delete",
)
#: Multi- and predefined dual-regions of Cloud Storage, by the region prefixes they cover.
_MULTI_REGIONS = {"US": ("us-", "northamerica-"), "EU": ("europe-",), "ASIA": ("asia-",)}
_DUAL_REGIONS = {
    "NAM4": ("us-central1", "us-east1"),
    "EUR4": ("europe-north1", "europe-west4"),
    "ASIA1": ("asia-northeast1", "asia-northeast2"),
}


class Status(enum.Enum):
    """What a check found."""

    PASS = "pass"  # checked: fine
    WARN = "warn"  # works, but costs more or grants more than it should
    FAIL = "fail"  # jobs will fail until this is fixed
    SKIP = "skipped"  # nothing here could answer it: not checked, not passed


@dataclass(frozen=True)
class CheckResult:
    """One check's answer."""

    name: str  # short, stable id, e.g. "bucket"
    status: Status  # what it found
    summary: str  # one line: what was checked and found
    fix: str = ""  # what to do, for WARN and FAIL (and SKIP when it can be made to run)


class Skip(Exception):
    """Raised inside a check that cannot be answered here; the message says why."""


class Probe:
    """What the checks share: the config, the clients, and lookups made once.

    :param config: the executor configuration, validated
    :param session: the session for the REST APIs (an ``AuthorizedSession`` for Google);
        ``None`` when no credentials were found
    :param endpoints: base URL per REST API name (see :data:`GOOGLE_ENDPOINTS`) for the APIs
        that can be asked; an API not here is reported as skipped
    :param batch_client: the Batch client the executor would make
    :param storage_client: the Cloud Storage client the executor would make
    :param no_session_reason: why ``session`` is None, for the skipped checks
    """

    def __init__(
        self,
        config: ExecutorConfig,
        *,
        session: requests.Session | None,
        endpoints: Mapping[str, str],
        batch_client: Callable[[], batch_v1.BatchServiceClient],
        storage_client: Callable[[], storage.Client],
        no_session_reason: str = "",
    ) -> None:
        self.config = config
        self.session = session
        self.endpoints = dict(endpoints)
        self._batch_client = batch_client
        self._storage_client = storage_client
        self._no_session_reason = no_session_reason
        self.cache: dict[str, Any] = {}

    @functools.cached_property
    def batch(self) -> batch_v1.BatchServiceClient:
        return self._batch_client()

    @functools.cached_property
    def storage(self) -> storage.Client:
        return self._storage_client()

    def rest(
        self, api: str, method: str, path: str, *, base: str = "", **kwargs: Any
    ) -> requests.Response:
        """One REST call to ``api`` (a :data:`GOOGLE_ENDPOINTS` name); ``base`` overrides its URL.

        :raises Skip: the API cannot be asked here (no endpoint, or no credentials)
        """
        url = base or self.endpoints.get(api)
        if not url:
            raise Skip(f"no {api} API here (the configuration points at an emulator)")
        if self.session is None:
            raise Skip(self._no_session_reason or "no credentials")
        kwargs.setdefault("timeout", 30)
        return self.session.request(method, url.rstrip("/") + path, **kwargs)

    def rest_json(self, api: str, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """Like :meth:`rest`, for a call that must succeed; the answer's JSON.

        :raises ApiRefused: the API answered with an error
        """
        response = self.rest(api, method, path, **kwargs)
        if response.status_code >= 400:
            raise ApiRefused(api, response)
        data: dict[str, Any] = response.json() if response.content else {}
        return data

    def once(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` the first time ``key`` is asked for, its value (or error) after."""
        if key not in self.cache:
            try:
                self.cache[key] = (True, compute())
            except (Skip, ApiRefused) as exc:
                self.cache[key] = (False, exc)
        ok, value = self.cache[key]
        if not ok:
            raise value
        return value


class ApiRefused(Exception):
    """A REST API answered with an HTTP error."""

    def __init__(self, api: str, response: requests.Response) -> None:
        self.status = response.status_code
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200] or response.reason
        self.message = str(message)
        super().__init__(f"the {api} API answered {self.status}: {self.message}")


# -- the checks ------------------------------------------------------------------------------


def check_apis(probe: Probe) -> CheckResult:
    """The services a job needs are enabled in the project (Service Usage ``batchGet``)."""
    project = probe.config.project_id
    names = [f"projects/{project}/services/{service}" for service in REQUIRED_SERVICES]
    data = probe.rest_json(
        "serviceusage", "GET", f"/v1/projects/{project}/services:batchGet", params={"names": names}
    )
    states = {s["name"].rsplit("/", 1)[-1]: s.get("state") for s in data.get("services", [])}
    disabled = [service for service in REQUIRED_SERVICES if states.get(service) != "ENABLED"]
    if disabled:
        return CheckResult(
            "apis",
            Status.FAIL,
            f"not enabled in {project}: {', '.join(disabled)}",
            f"gcloud services enable {' '.join(disabled)} --project={project}",
        )
    return CheckResult("apis", Status.PASS, f"enabled: {', '.join(REQUIRED_SERVICES)}")


def check_batch(probe: Probe) -> CheckResult:
    """The Batch API answers a job listing in the project and region, with the real client."""
    config = probe.config
    parent = f"projects/{config.project_id}/locations/{config.region}"
    where = config.batch_api_endpoint or "batch.googleapis.com"
    try:
        pager = probe.batch.list_jobs(request={"parent": parent, "page_size": 1}, timeout=30)
        next(iter(pager), None)
    except api_exceptions.PermissionDenied as exc:
        return CheckResult(
            "batch",
            Status.FAIL,
            f"{where} refused to list jobs in {parent}: {exc.message}",
            f"grant the executor's identity roles/batch.jobsEditor on project {config.project_id}",
        )
    except (api_exceptions.NotFound, api_exceptions.InvalidArgument) as exc:
        return CheckResult(
            "batch",
            Status.FAIL,
            f"{where} does not know {parent}: {exc.message}",
            "set region to a Batch location (gcloud batch locations list)",
        )
    except (api_exceptions.GoogleAPICallError, requests.RequestException) as exc:
        return CheckResult(
            "batch",
            Status.FAIL,
            f"{where} did not answer a job listing in {parent}: {exc}",
            "check batch_api_endpoint and the network (is the Batch API enabled?)",
        )
    return CheckResult("batch", Status.PASS, f"{where} lists jobs in {parent}")


def _region(probe: Probe) -> dict[str, Any]:
    config = probe.config
    return probe.once(
        "region",
        lambda: probe.rest_json(
            "compute", "GET", f"/compute/v1/projects/{config.project_id}/regions/{config.region}"
        ),
    )


def check_region(probe: Probe) -> CheckResult:
    """The region exists for the project and is up (Compute ``regions.get``); without the
    Compute API, whether the package's compute catalogue knows it."""
    region = probe.config.region
    try:
        data = _region(probe)
    except Skip as skip:
        return _from_catalogue(probe, "region", skip)
    except ApiRefused as exc:
        if exc.status == 404:
            return CheckResult(
                "region",
                Status.FAIL,
                f"{region} is not a Compute Engine region",
                "set region to one of `gcloud compute regions list`",
            )
        raise
    status = data.get("status", "UP")
    if status != "UP":
        return CheckResult(
            "region", Status.WARN, f"{region} is {status}", "choose a region that is UP"
        )
    return CheckResult(
        "region", Status.PASS, f"{region} is UP ({len(data.get('zones', []))} zones)"
    )


def _from_catalogue(probe: Probe, name: str, skip: Skip) -> CheckResult:
    """The ``region`` or ``machine`` answer from the package's compute catalogue (Google's
    documentation, not asked live): what an emulator's configuration gets."""
    config = probe.config
    shapes = catalogue()
    whole = name == "machine"
    problem = shapes.check(
        region=config.region,
        machine_type=config.machine_type if whole else "",
        accelerator_type=config.accelerator_type if whole else "",
        accelerator_count=config.accelerator_count if whole else 0,
        vcpus=config.vcpus if whole else 0,
        memory_mib=config.memory if whole else 0,
    )
    source = f"per the compute catalogue of {shapes.retrieved}; {skip}"
    if problem is not None:
        return CheckResult(name, Status.FAIL, f"{problem.message} ({source})")
    what = f"{config.machine_type} in {config.region}" if whole else config.region
    return CheckResult(name, Status.PASS, f"{what} is offered ({source})")


def _machine(probe: Probe) -> dict[str, Any] | None:
    """The configured machine type in one of the region's zones (None: none configured)."""
    config = probe.config
    if not config.machine_type:
        return None

    def find() -> dict[str, Any]:
        zones = {url.rsplit("/", 1)[-1] for url in _region(probe).get("zones", [])}
        path = f"/compute/v1/projects/{config.project_id}/aggregated/machineTypes"
        params = {"filter": f'name = "{config.machine_type}"'}
        offered: dict[str, Any] = {}
        for page in _pages(probe, "compute", path, params):
            for scope, listing in page.get("items", {}).items():
                zone = scope.rsplit("/", 1)[-1]
                for machine in listing.get("machineTypes", []):
                    if zone in zones:
                        offered[zone] = machine
        return offered

    offered: dict[str, Any] = probe.once("machine", find)
    return offered


def _pages(probe: Probe, api: str, path: str, params: dict[str, str]) -> Iterator[dict[str, Any]]:
    token = ""
    while True:
        page = probe.rest_json(
            api, "GET", path, params={**params, "pageToken": token} if token else params
        )
        yield page
        token = page.get("nextPageToken", "")
        if not token:
            return


def check_machine(probe: Probe) -> CheckResult:
    """The machine type is offered in the region's zones (Compute ``machineTypes``; without
    the Compute API, the compute catalogue)."""
    config = probe.config
    if not config.machine_type:
        raise Skip(
            f"no machine_type set: Batch chooses one for vcpus={config.vcpus:g}, "
            f"memory={config.memory} MiB"
        )
    try:
        offered = _machine(probe)
    except Skip as skip:
        return _from_catalogue(probe, "machine", skip)
    if not offered:
        return CheckResult(
            "machine",
            Status.FAIL,
            f"{config.machine_type} is not offered in any zone of {config.region}",
            f"gcloud compute machine-types list --filter='zone~^{config.region}-' lists those "
            f"that are; pick one, or another region",
        )
    sample = next(iter(offered.values()))
    cpus, memory = int(sample.get("guestCpus", 0)), int(sample.get("memoryMb", 0))
    if (cpus and cpus < config.vcpus) or (memory and memory < config.memory):
        return CheckResult(
            "machine",
            Status.FAIL,
            f"{config.machine_type} has {cpus} vCPUs and {memory} MiB, less than the "
            f"vcpus={config.vcpus:g} and memory={config.memory} asked for",
            "choose a larger machine_type, or lower vcpus/memory",
        )
    return CheckResult(
        "machine",
        Status.PASS,
        f"{config.machine_type} ({cpus} vCPUs, {memory} MiB) in {', '.join(sorted(offered))}",
    )


def check_cpu_quota(probe: Probe) -> CheckResult:
    """The region's CPU quotas have room for one VM of the shape (Compute region quotas)."""
    config = probe.config
    quotas = {q["metric"]: q for q in _region(probe).get("quotas", [])}
    try:
        machine = _machine(probe)
    except (Skip, ApiRefused):
        machine = None
    sample = next(iter(machine.values()), None) if machine else None
    needed = int(sample["guestCpus"]) if sample else math.ceil(config.vcpus)
    metrics = ["CPUS"]
    if config.provisioning_model != "STANDARD" and quotas.get("PREEMPTIBLE_CPUS", {}).get("limit"):
        metrics = ["PREEMPTIBLE_CPUS"]  # Spot VMs use it when it is granted, else CPUS
    family = config.machine_type.split("-", 1)[0].upper()
    if family and f"{family}_CPUS" in quotas:
        metrics.append(f"{family}_CPUS")
    short = []
    rooms = []
    for metric in metrics:
        quota = quotas.get(metric)
        if quota is None:
            continue
        room = float(quota.get("limit", 0)) - float(quota.get("usage", 0))
        rooms.append(f"{metric} {room:g} of {float(quota.get('limit', 0)):g} free")
        if room < needed:
            short.append(metric)
    if short:
        return CheckResult(
            "cpu-quota",
            Status.FAIL,
            f"one VM needs {needed} vCPUs; {'; '.join(rooms)} in {config.region}",
            f"request more {', '.join(short)} quota in {config.region} (IAM & Admin > Quotas), "
            f"or free some",
        )
    return CheckResult(
        "cpu-quota", Status.PASS, f"one VM needs {needed} vCPUs; {'; '.join(rooms) or 'no limit'}"
    )


def check_job_quota(probe: Probe) -> CheckResult:
    """No Batch quota is zero in the region (Cloud Quotas ``quotaInfos``)."""
    config = probe.config
    path = (
        f"/v1/projects/{config.project_id}/locations/global/services/batch.googleapis.com"
        f"/quotaInfos"
    )
    zero: list[str] = []
    seen = 0
    for page in _pages(probe, "cloudquotas", path, {}):
        for info in page.get("quotaInfos", []):
            for dims in info.get("dimensionsInfos", []):
                region = dims.get("dimensions", {}).get("region")
                where = dims.get("applicableLocations", [])
                if region not in (None, config.region) or (
                    where and config.region not in where and "global" not in where
                ):
                    continue
                seen += 1
                if str(dims.get("details", {}).get("value", "")) == "0":
                    zero.append(str(info.get("quotaId") or info.get("metric")))
    if zero:
        return CheckResult(
            "job-quota",
            Status.FAIL,
            f"Batch quota at 0 in {config.region}: {', '.join(sorted(set(zero)))}",
            "request an increase in IAM & Admin > Quotas (service batch.googleapis.com)",
        )
    return CheckResult(
        "job-quota",
        Status.PASS,
        f"{seen} Batch quota value(s) apply in {config.region}, none is 0 (job creation: "
        f"6,000 mutations/min per region, fixed)",
    )


def check_bucket(probe: Probe) -> CheckResult:
    """The bucket exists and is in (or covers) the region."""
    config = probe.config
    try:
        bucket = probe.storage.get_bucket(config.bucket_name, timeout=30)
    except api_exceptions.NotFound:
        return CheckResult(
            "bucket",
            Status.FAIL,
            f"gs://{config.bucket_name} does not exist",
            f"gcloud storage buckets create gs://{config.bucket_name} --location={config.region} "
            f"--project={config.project_id} (or `covalent deploy up gcpbatch_array`)",
        )
    except api_exceptions.Forbidden as exc:
        return CheckResult(
            "bucket",
            Status.WARN,
            f"may not read gs://{config.bucket_name}'s metadata ({exc.message}): its location "
            f"is unknown; the objects check says whether tasks can use it",
            "grant roles/storage.insightsCollectorService or storage.buckets.get on the bucket "
            "to check its location",
        )
    location = str(bucket.location or "").upper()
    region = config.region
    covered = bucket_covers(location, getattr(bucket, "data_locations", None) or [], region)
    if not covered:
        return CheckResult(
            "bucket",
            Status.WARN,
            f"gs://{config.bucket_name} is in {location}, the jobs run in {region}: every input "
            f"and result crosses regions (egress charges, slower transfers)",
            f"use a bucket in {region}, or set region to the bucket's",
        )
    return CheckResult("bucket", Status.PASS, f"gs://{config.bucket_name} is in {location}")


def bucket_covers(location: str, data_locations: list[str], region: str) -> bool:
    """Whether a bucket in ``location`` (a region, multi-region or dual-region) is in or covers
    ``region``: then the tasks' transfers stay inside it."""
    location = location.upper()
    return (
        location == region.upper()
        or region.startswith(_MULTI_REGIONS.get(location, ()))
        or region in _DUAL_REGIONS.get(location, ())
        or region in [str(place).lower() for place in data_locations]
    )


def check_objects(probe: Probe) -> CheckResult:
    """The caller may create, read, list and delete objects: ``testIamPermissions``, then a
    probe object written, read back and deleted under the prefix (none is left behind)."""
    config = probe.config
    bucket = probe.storage.bucket(config.bucket_name)
    held: list[str] | None
    try:
        held = list(bucket.test_iam_permissions(list(OBJECT_PERMISSIONS), timeout=30))
    except api_exceptions.NotFound:
        held = None  # an emulator without IAM (fake-gcs-server): the probe answers alone
    if held is not None:
        missing = [p for p in OBJECT_PERMISSIONS if p not in held]
        if missing:
            return CheckResult(
                "objects",
                Status.FAIL,
                f"the caller lacks {', '.join(missing)} on gs://{config.bucket_name}",
                f"gcloud storage buckets add-iam-policy-binding gs://{config.bucket_name} "
                f"--member=YOUR_MEMBER --role=roles/storage.objectUser",
            )
    blob = bucket.blob(f"{config.bucket_prefix}/doctor-probe-{secrets.token_hex(6)}")
    payload = b"gcpbatch-array doctor probe; safe to delete\n"
    try:
        blob.upload_from_string(payload, if_generation_match=0, timeout=30)
        try:
            if blob.download_as_bytes(timeout=30) != payload:
                return CheckResult(
                    "objects", Status.FAIL, f"gs://{blob.bucket.name}/{blob.name} read back wrong"
                )
        finally:
            blob.delete(timeout=30)
    except api_exceptions.NotFound:
        return CheckResult("objects", Status.FAIL, f"gs://{config.bucket_name} does not exist")
    except api_exceptions.GoogleAPICallError as exc:
        return CheckResult(
            "objects",
            Status.FAIL,
            f"writing, reading or deleting gs://{config.bucket_name}/{blob.name} failed: "
            f"{str(exc.message).splitlines()[0]}",
            f"grant the executor's identity roles/storage.objectUser on gs://{config.bucket_name}",
        )
    how = "permissions held, and a" if held is not None else "(no IAM here) a"
    return CheckResult(
        "objects",
        Status.PASS,
        f"{how} probe object under {config.bucket_prefix}/ written, read and deleted",
    )


def platform_checks() -> list[tuple[str, Callable[[Probe], CheckResult]]]:
    """The project, Batch and storage checks, in order, with their names."""
    return [
        ("apis", check_apis),
        ("batch", check_batch),
        ("region", check_region),
        ("machine", check_machine),
        ("cpu-quota", check_cpu_quota),
        ("job-quota", check_job_quota),
        ("bucket", check_bucket),
        ("objects", check_objects),
    ]
