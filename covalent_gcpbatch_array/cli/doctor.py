"""``gcpbatch-array doctor``: check a configuration against its project before paying for VMs.

    gcpbatch-array doctor [--project ID] [--bucket NAME] [--image URI] ... [--json]

Settings are read as the executor reads them: flags (one per constructor key), then
``[executors.gcpbatch_array]`` in the Covalent config file, then the defaults
(:func:`~covalent_gcpbatch_array.config.resolve_config`). Each check prints PASS, WARN, FAIL
or SKIP with the fix; the exit status is 1 when any check failed, else 0. The checks are in
:mod:`~covalent_gcpbatch_array.cli.doctor_checks` and :mod:`~covalent_gcpbatch_array.cli.doctor_iam`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, TextIO

from covalent_gcpbatch_array.config import DEFAULTS, ExecutorConfig, resolve_config
from covalent_gcpbatch_array.exceptions import ConfigError, GCPBatchArrayError

if TYPE_CHECKING:
    import requests

    from covalent_gcpbatch_array.cli.doctor_checks import CheckResult

__all__ = ["add_doctor_command", "run_checks"]

#: Flag -> executor key: the keys the checks read.
_FLAGS = {
    "project": "project_id",
    "region": "region",
    "bucket": "bucket_name",
    "prefix": "bucket_prefix",
    "image": "container_image_uri",
    "service_account": "service_account_email",
    "vcpus": "vcpus",
    "memory": "memory",
    "machine_type": "machine_type",
    "provisioning_model": "provisioning_model",
    "batch_endpoint": "batch_api_endpoint",
    "storage_endpoint": "storage_api_endpoint",
}
_SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]


def add_doctor_command(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    *,
    read_config_file: Callable[[str], Any] | None = None,
) -> None:
    """Register ``doctor``; it sets ``handler(args) -> int``.

    :param read_config_file: looks an executor key up in the Covalent config file, raising
        ``KeyError`` when it is not set (default: as the executor does)
    """
    doctor = subparsers.add_parser(
        "doctor",
        help="check the project, bucket, image and roles before running jobs",
        description="Check, with the executor's configuration and Google's clients, that the "
        "APIs are enabled, the bucket and image exist and may be used, the tasks' service "
        "account has its roles, the region offers the machine and has quota, and the image's "
        "versions match this Python's. Checks nothing here can answer are SKIPPED, never "
        "passed. Exit status 1 when a check fails.",
    )
    where = doctor.add_argument_group(
        "the configuration (default: the executor's settings in the Covalent config file)"
    )
    where.add_argument("--project", metavar="ID", help="project_id")
    where.add_argument("--region", metavar="REGION", help=f"region (default {DEFAULTS['region']})")
    where.add_argument("--bucket", metavar="NAME", help="bucket_name")
    where.add_argument("--prefix", metavar="PATH", help="bucket_prefix")
    where.add_argument("--image", metavar="URI", help="container_image_uri")
    where.add_argument("--service-account", metavar="EMAIL", help="service_account_email")
    where.add_argument("--vcpus", type=float, metavar="N", help="vcpus")
    where.add_argument("--memory", type=int, metavar="MIB", help="memory")
    where.add_argument("--machine-type", metavar="TYPE", help="machine_type")
    where.add_argument("--provisioning-model", metavar="MODEL", help="provisioning_model")
    where.add_argument("--batch-endpoint", metavar="URL", help="batch_api_endpoint")
    where.add_argument("--storage-endpoint", metavar="URL", help="storage_api_endpoint")
    doctor.add_argument(
        "--api-endpoint",
        action="append",
        default=[],
        type=_api_endpoint,
        metavar="API=URL",
        help="ask API (serviceusage, compute, cloudquotas, iam, cloudresourcemanager, "
        "artifactregistry, registry) at URL instead of Google's (repeatable)",
    )
    doctor.add_argument("--json", action="store_true", help="print JSON for scripts")

    def handler(args: argparse.Namespace) -> int:
        from covalent_gcpbatch_array.cli.jobs import read_covalent_config

        explicit = {key: getattr(args, flag) for flag, key in _FLAGS.items()}
        values = resolve_config(explicit, read_config_file or read_covalent_config)
        results = run_checks(values, overrides=dict(args.api_endpoint))
        return render(results, sys.stdout, as_json=args.json)

    doctor.set_defaults(handler=handler)


def _api_endpoint(text: str) -> tuple[str, str]:
    from covalent_gcpbatch_array.cli.doctor_checks import GOOGLE_ENDPOINTS

    api, _, url = text.partition("=")
    known = [*GOOGLE_ENDPOINTS, "registry"]
    if api not in known or not url.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(
            f"expected API=URL with API one of {', '.join(known)}, got {text!r}"
        )
    return api, url


def run_checks(
    values: Mapping[str, Any],
    *,
    overrides: Mapping[str, str] | None = None,
    session: requests.Session | None = None,
) -> list[CheckResult]:
    """Every check, in order, for the executor settings ``values`` (every key of DEFAULTS).

    :param overrides: base URL per REST API (see ``--api-endpoint``)
    :param session: the session for plain ``http://`` REST endpoints (default: a new one)
    """
    from covalent_gcpbatch_array._core.clients import make_batch_client, make_storage_client
    from covalent_gcpbatch_array.cli.doctor_checks import (
        GOOGLE_ENDPOINTS,
        CheckResult,
        Probe,
        Status,
        platform_checks,
    )
    from covalent_gcpbatch_array.cli.doctor_iam import identity_checks

    checks = platform_checks() + identity_checks()
    try:
        config = ExecutorConfig.from_values(values)
    except ConfigError as exc:
        skipped = [
            CheckResult(name, Status.SKIP, "the configuration is invalid") for name, _ in checks
        ]
        return [CheckResult("config", Status.FAIL, f"{exc.key}: {exc.problem}", exc.hint), *skipped]
    results = [
        CheckResult(
            "config",
            Status.PASS,
            f"project {config.project_id}, region {config.region}, bucket {config.bucket_name}, "
            f"image {config.container_image_uri}",
        )
    ]
    emulated = config.batch_api_endpoint.startswith("http://")
    endpoints = {**({} if emulated else GOOGLE_ENDPOINTS), **(overrides or {})}
    credentials_result, session, reason = _credentials(config, endpoints, session)
    results.append(credentials_result)
    probe = Probe(
        config,
        session=session,
        endpoints=endpoints,
        batch_client=lambda: make_batch_client(config.batch_api_endpoint),
        storage_client=lambda: make_storage_client(config.project_id, config.storage_api_endpoint),
        no_session_reason=reason,
    )
    results += [_run(name, check, probe) for name, check in checks]
    return results


def _credentials(
    config: ExecutorConfig, endpoints: Mapping[str, str], session: requests.Session | None
) -> tuple[CheckResult, requests.Session | None, str]:
    """The credentials check, and the REST session (None without credentials, and why)."""
    import google.auth
    import google.auth.exceptions
    import requests
    from google.auth.transport.requests import AuthorizedSession

    from covalent_gcpbatch_array.cli.doctor_checks import CheckResult, Status

    urls = [config.batch_api_endpoint, config.storage_api_endpoint, *endpoints.values()]
    if all(url.startswith("http://") for url in urls):
        result = CheckResult(
            "credentials", Status.SKIP, "every endpoint is a plain http:// emulator: none used"
        )
        return result, session or requests.Session(), ""
    try:
        credentials, project = google.auth.default(scopes=_SCOPES)
    except google.auth.exceptions.DefaultCredentialsError as exc:
        fix = "gcloud auth application-default login, or set GOOGLE_APPLICATION_CREDENTIALS"
        reason = "no Google credentials found"
        return CheckResult("credentials", Status.FAIL, f"{reason}: {exc}", fix), None, reason
    who = getattr(credentials, "service_account_email", None) or "your user account"
    summary = f"Application Default Credentials of {who}"
    if project and project != config.project_id:
        summary += f" (their default project is {project}; checking {config.project_id})"
    return CheckResult("credentials", Status.PASS, summary), AuthorizedSession(credentials), ""


def _run(name: str, check: Callable[[Any], CheckResult], probe: Any) -> CheckResult:
    """One check; what it could not ask becomes SKIP, what broke becomes FAIL."""
    import google.auth.exceptions
    import requests
    from google.api_core import exceptions as api_exceptions

    from covalent_gcpbatch_array.cli.doctor_checks import ApiRefused, CheckResult, Skip, Status

    try:
        return check(probe)
    except Skip as exc:
        return CheckResult(name, Status.SKIP, str(exc))
    except ApiRefused as exc:
        if exc.status in (401, 403):
            return CheckResult(
                name,
                Status.SKIP,
                f"the caller may not ask this ({exc})",
                "run the doctor as someone who may read the project's IAM, services and quotas "
                "(e.g. roles/viewer plus roles/iam.securityReviewer) to check it",
            )
        return CheckResult(name, Status.FAIL, str(exc))
    except (
        api_exceptions.GoogleAPICallError,
        requests.RequestException,
        google.auth.exceptions.GoogleAuthError,
        GCPBatchArrayError,
    ) as exc:
        return CheckResult(name, Status.FAIL, f"could not check: {exc}")


def render(results: list[CheckResult], out: TextIO, *, as_json: bool = False) -> int:
    """Print ``results`` (text, or JSON); return the exit status: 1 when any check failed."""
    from covalent_gcpbatch_array.cli.doctor_checks import Status

    counts = Counter(result.status.value for result in results)
    failed = counts[Status.FAIL.value] > 0
    if as_json:
        checks = [{**asdict(r), "status": r.status.value} for r in results]
        out.write(
            json.dumps({"ok": not failed, "counts": dict(counts), "checks": checks}, indent=2)
        )
        out.write("\n")
        return int(failed)
    width = max(len(result.name) for result in results)
    for result in results:
        out.write(f"{result.status.name:<4}  {result.name:<{width}}  {result.summary}\n")
        if result.fix and result.status is not Status.PASS:
            out.write(f"{'':<4}  {'':<{width}}  fix: {result.fix}\n")
    summary = ", ".join(f"{counts[s.value]} {s.value}" for s in Status if counts[s.value])
    out.write(f"{len(results)} checks: {summary}\n")
    return int(failed)
