"""The identity and image checks of ``gcpbatch-array doctor``.

Who runs the tasks (the tasks' service account, or the Compute Engine default one when
``service_account_email`` is empty), whether the caller may act as it, which roles it holds
against those docs/deploy.md lists, whether the task image exists in Artifact Registry, whether
the account may pull it, and whether the image's versions match this Python's (the Covalent
server's, when the doctor runs beside it).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from google.api_core import exceptions as api_exceptions

from covalent_gcpbatch_array._core.envelopes import RuntimeVersions
from covalent_gcpbatch_array.cli.doctor_checks import ApiRefused, CheckResult, Probe, Skip, Status

__all__ = ["IMAGE_LABELS", "ImageRef", "identity_checks"]

#: The labels the task image carries its versions in (runner_image/Dockerfile); the official
#: python images also set PYTHON_VERSION in the environment.
IMAGE_LABELS = {
    "python": "io.covalent-gcpbatch-array.python-version",
    "covalent": "io.covalent-gcpbatch-array.covalent-version",
}
#: What the tasks' service account needs, where (docs/deploy.md, "Roles").
PROJECT_ROLES = ("roles/batch.agentReporter", "roles/logging.logWriter")
BUCKET_ROLE = "roles/storage.objectUser"
PULL_ROLE = "roles/artifactregistry.reader"
#: Roles that include a needed one (so the need is met, but more is granted).
_COVERS = {
    BUCKET_ROLE: {BUCKET_ROLE, "roles/storage.objectAdmin", "roles/storage.admin"},
    PULL_ROLE: {
        PULL_ROLE,
        "roles/artifactregistry.writer",
        "roles/artifactregistry.repoAdmin",
        "roles/artifactregistry.admin",
    },
}
_BASIC_ROLES = {"roles/owner", "roles/editor"}
_MANIFEST_TYPES = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)


@dataclass(frozen=True)
class ImageRef:
    """An Artifact Registry Docker image: ``LOCATION-docker.pkg.dev/PROJECT/REPO/NAME:TAG``."""

    host: str  # LOCATION-docker.pkg.dev
    project: str  # the repository's project
    repository: str  # the repository id
    name: str  # the image's path in the repository
    reference: str  # its tag, or sha256:... digest

    @property
    def location(self) -> str:
        return self.host.removesuffix("-docker.pkg.dev")

    @classmethod
    def parse(cls, uri: str) -> ImageRef | None:
        """The parts of ``uri``, or None when it is not an Artifact Registry image."""
        parts = uri.split("/")
        if len(parts) < 4 or not parts[0].endswith("-docker.pkg.dev"):
            return None
        name = "/".join(parts[3:])
        if "@" in name:
            name, reference = name.split("@", 1)
        elif ":" in parts[-1]:
            name, reference = name.rsplit(":", 1)
        else:
            reference = "latest"
        return cls(parts[0], parts[1], parts[2], name, reference)


def service_account(probe: Probe) -> str:
    """The tasks' service account: the configured one, else the Compute Engine default."""
    if probe.config.service_account_email:
        return probe.config.service_account_email

    def default() -> str:
        project = probe.rest_json(
            "cloudresourcemanager", "GET", f"/v1/projects/{probe.config.project_id}"
        )
        return f"{project['projectNumber']}-compute@developer.gserviceaccount.com"

    email: str = probe.once("service-account", default)
    return email


def _roles(bindings: Iterable[dict[str, Any]], member: str) -> set[str]:
    return {b["role"] for b in bindings if member in b.get("members", ())}


def _project_roles(probe: Probe, member: str) -> set[str]:
    policy = probe.once(
        "project-policy",
        lambda: probe.rest_json(
            "cloudresourcemanager",
            "POST",
            f"/v1/projects/{probe.config.project_id}:getIamPolicy",
            json={"options": {"requestedPolicyVersion": 3}},
        ),
    )
    return _roles(policy.get("bindings", []), member)


def check_act_as(probe: Probe) -> CheckResult:
    """The caller may act as the tasks' service account (Batch refuses the job otherwise)."""
    email = service_account(probe)
    response = probe.rest(
        "iam",
        "POST",
        f"/v1/projects/-/serviceAccounts/{email}:testIamPermissions",
        json={"permissions": ["iam.serviceAccounts.actAs"]},
    )
    if response.status_code == 404:
        return CheckResult(
            "act-as",
            Status.FAIL,
            f"service account {email} does not exist",
            "set service_account_email to an existing account (covalent deploy up creates one)",
        )
    if response.status_code >= 400:
        raise ApiRefused("iam", response)
    if "iam.serviceAccounts.actAs" not in response.json().get("permissions", []):
        return CheckResult(
            "act-as",
            Status.FAIL,
            f"the caller may not act as {email}: Batch will refuse every job",
            f"gcloud iam service-accounts add-iam-policy-binding {email} "
            f"--member=YOUR_MEMBER --role=roles/iam.serviceAccountUser",
        )
    return CheckResult("act-as", Status.PASS, f"the caller may act as {email}")


def check_account_roles(probe: Probe) -> CheckResult:
    """The tasks' account holds the roles docs/deploy.md lists, and warns of broader ones."""
    email = service_account(probe)
    member = f"serviceAccount:{email}"
    on_project = _project_roles(probe, member)
    bucket_name = probe.config.bucket_name
    try:
        policy = probe.storage.bucket(bucket_name).get_iam_policy(
            requested_policy_version=3, timeout=30
        )
        on_bucket: set[str] | None = _roles(policy.bindings, member)
        unread = ""
    except api_exceptions.GoogleAPICallError as exc:
        on_bucket, unread = (
            None,
            f"gs://{bucket_name}'s IAM policy is not readable here ({exc.code})",
        )
    held = on_project | (on_bucket or set())
    missing = [role for role in PROJECT_ROLES if role not in on_project]
    if on_bucket is not None and not held & (_COVERS[BUCKET_ROLE] | _BASIC_ROLES):
        missing.append(f"{BUCKET_ROLE} (on gs://{bucket_name})")
    if missing:
        return CheckResult(
            "account-roles",
            Status.FAIL,
            f"{email} lacks {', '.join(missing)}",
            "grant them as docs/deploy.md lists (covalent deploy up does), e.g. gcloud projects "
            f"add-iam-policy-binding {probe.config.project_id} --member={member} "
            f"--role={missing[0].split(' ')[0]}",
        )
    broader = sorted((on_project - set(PROJECT_ROLES)) | ((on_bucket or set()) - {BUCKET_ROLE}))
    if broader:
        return CheckResult(
            "account-roles",
            Status.WARN,
            f"{email} holds more than the tasks need: {', '.join(broader)}",
            "use a service account with only the roles docs/deploy.md lists (the Compute "
            "Engine default account has roles/editor): set service_account_email",
        )
    if unread:
        raise Skip(f"{email} holds the project roles, but {unread}")
    return CheckResult("account-roles", Status.PASS, f"{email} holds exactly the task roles")


def _image(probe: Probe) -> ImageRef:
    uri = probe.config.container_image_uri
    image = ImageRef.parse(uri)
    if image is None:
        raise Skip(f"{uri} is not an Artifact Registry image (LOCATION-docker.pkg.dev/...)")
    return image


def _registry_get(probe: Probe, image: ImageRef, path: str, accept: str = "") -> Any:
    base = probe.endpoints.get("registry") or (
        "" if "artifactregistry" not in probe.endpoints else f"https://{image.host}"
    )
    headers = {"Accept": accept} if accept else {}
    response = probe.rest("registry", "GET", path, base=base, headers=headers)
    if response.status_code >= 400:
        raise ApiRefused("Artifact Registry (Docker)", response)
    return response.json()


def _image_config(probe: Probe) -> dict[str, Any]:
    """The image's config (its Env and Labels), from the registry's Docker API."""
    image = _image(probe)

    def fetch() -> dict[str, Any]:
        root = f"/v2/{image.project}/{image.repository}/{image.name}"
        manifest = _registry_get(
            probe, image, f"{root}/manifests/{image.reference}", _MANIFEST_TYPES
        )
        if "manifests" in manifest:  # an index: the linux/amd64 image is what the VMs run
            chosen = next(
                (
                    m
                    for m in manifest["manifests"]
                    if m.get("platform", {}).get("architecture") == "amd64"
                ),
                manifest["manifests"][0],
            )
            manifest = _registry_get(
                probe, image, f"{root}/manifests/{chosen['digest']}", _MANIFEST_TYPES
            )
        blob = _registry_get(probe, image, f"{root}/blobs/{manifest['config']['digest']}")
        config: dict[str, Any] = blob.get("config") or {}
        return config

    config: dict[str, Any] = probe.once("image-config", fetch)
    return config


def check_image(probe: Probe) -> CheckResult:
    """The task image exists in Artifact Registry and the caller can read it."""
    uri = probe.config.container_image_uri
    try:
        _image_config(probe)
    except ApiRefused as exc:
        if exc.status == 404:
            return CheckResult(
                "image",
                Status.FAIL,
                f"{uri} does not exist: {exc.message}",
                "build and push it: make -C runner_image cloud-build (docs/deploy.md)",
            )
        if exc.status in (401, 403):
            return CheckResult(
                "image",
                Status.FAIL,
                f"the caller may not read {uri}: {exc.message}",
                f"grant yourself {PULL_ROLE} on the repository to check it",
            )
        raise
    return CheckResult("image", Status.PASS, f"{uri} exists")


def check_image_pull(probe: Probe) -> CheckResult:
    """The tasks' service account may pull the image (repository or project IAM policy)."""
    image = _image(probe)
    email = service_account(probe)
    member = f"serviceAccount:{email}"
    repository = (
        f"/v1/projects/{image.project}/locations/{image.location}/repositories/{image.repository}"
    )
    policy = probe.rest_json("artifactregistry", "GET", f"{repository}:getIamPolicy")
    held = _roles(policy.get("bindings", []), member)
    if image.project == probe.config.project_id:
        held |= _project_roles(probe, member)
    if held & (_COVERS[PULL_ROLE] | _BASIC_ROLES):
        return CheckResult("image-pull", Status.PASS, f"{email} may pull from {image.repository}")
    return CheckResult(
        "image-pull",
        Status.FAIL,
        f"{email} may not pull {probe.config.container_image_uri}: VMs will fail to start tasks",
        f"gcloud artifacts repositories add-iam-policy-binding {image.repository} "
        f"--project={image.project} --location={image.location} --member={member} "
        f"--role={PULL_ROLE}",
    )


def check_versions(probe: Probe) -> CheckResult:
    """The image's Python and covalent versions are this Python's (pickles need the same)."""
    config = _image_config(probe)
    labels = config.get("Labels") or {}
    env = dict(item.split("=", 1) for item in config.get("Env") or [] if "=" in item)
    python = labels.get(IMAGE_LABELS["python"]) or env.get("PYTHON_VERSION", "")
    image = {
        "python": ".".join(python.split(".")[:2]),
        "covalent": labels.get(IMAGE_LABELS["covalent"], ""),
    }
    here = RuntimeVersions.current()
    wanted = {"python": here.python, "covalent": here.covalent}
    unknown = [name for name, version in image.items() if not version]
    differ = [
        f"{name} {image[name]} in the image, {wanted[name]} here"
        for name in wanted
        if image[name] and image[name] != wanted[name]
    ]
    fix = (
        "rebuild the image with this Python: make -C runner_image cloud-build "
        "PYTHON=/path/to/the/server/python"
    )
    if differ:
        return CheckResult(
            "versions",
            Status.FAIL,
            f"{'; '.join(differ)}: every electron will fail with TaskEnvironmentError",
            fix,
        )
    if unknown:
        return CheckResult(
            "versions",
            Status.WARN,
            f"the image does not say its {' or '.join(unknown)} version "
            f"(labels {', '.join(IMAGE_LABELS[name] for name in unknown)})",
            fix,
        )
    return CheckResult("versions", Status.PASS, f"image and here: {json.dumps(wanted)}")


def identity_checks() -> list[tuple[str, Callable[[Probe], CheckResult]]]:
    """The identity and image checks, in order, with their names."""
    return [
        ("act-as", check_act_as),
        ("account-roles", check_account_roles),
        ("image", check_image),
        ("image-pull", check_image_pull),
        ("versions", check_versions),
    ]
