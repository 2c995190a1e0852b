"""End-to-end and fault tests that mean the same on Google Cloud as on the local cloud.

``make test`` runs them on the local cloud (so they are tested themselves); ``make test-gcp``
sets ``GCPBATCH_ARRAY_TEST_TARGET=gcp`` and runs them on a real project given by
``GOOGLE_CLOUD_PROJECT``, ``GCPBATCH_TEST_BUCKET`` and ``GCPBATCH_TEST_IMAGE`` (optional:
``GCPBATCH_TEST_REGION``, ``GCPBATCH_TEST_SERVICE_ACCOUNT``), with Application Default
Credentials; without them the module is skipped with one line. See docs/real-cloud.md, which
also estimates what a run costs.
"""

from __future__ import annotations

import io
import json
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import redirect_stdout
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from electrons import (
    Spec,
    check_cancelled,
    check_exactly_one_outcome,
    check_infrastructure_error,
    check_user_error,
    check_value,
    fan_out,
    new_token,
)

from covalent_gcpbatch_array._core.runtime import ExecutorRuntime
from covalent_gcpbatch_array.local import LocalCloud

if TYPE_CHECKING:
    import google.cloud.storage as storage

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ON_GCP = os.environ.get("GCPBATCH_ARRAY_TEST_TARGET") == "gcp"
_NEEDED = ("GOOGLE_CLOUD_PROJECT", "GCPBATCH_TEST_BUCKET", "GCPBATCH_TEST_IMAGE")
if ON_GCP and not all(os.environ.get(name) for name in _NEEDED):
    pytest.skip(
        f"real-cloud suite skipped: set {', '.join(_NEEDED)} and Application Default "
        f"Credentials (docs/real-cloud.md)",
        allow_module_level=True,
    )


@dataclass
class Target:
    """Where the suite runs: executor settings, and what the tests wait for there."""

    name: str  # for messages
    settings: dict[str, Any]  # executor settings (every electron's)
    storage_client: Callable[[], storage.Client]  # the client to look into the bucket with
    deadline: float  # seconds a fan-out may take (VMs boot and pull the image on Google)
    long_sleep: float  # an electron that must be cancelled or stopped sleeps this long
    time_limit: float  # the time limit the time-limit test sets

    def executor_config(self) -> dict[str, Any]:
        """What tests.electrons.fan_out builds each executor from."""
        return dict(self.settings)

    def cli_flags(self) -> list[str]:
        """The flags that point ``gcpbatch-array`` commands at this target."""
        s = self.settings
        flags = ["--project", s["project_id"], "--region", s["region"]]
        flags += ["--bucket", s["bucket_name"], "--prefix", s["bucket_prefix"]]
        for flag, key in (
            ("--batch-endpoint", "batch_api_endpoint"),
            ("--storage-endpoint", "storage_api_endpoint"),
        ):
            if s.get(key):
                flags += [flag, s[key]]
        return flags


@pytest.fixture(scope="module")
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    """A real project under ``make test-gcp``; else the session's local cloud, in a region
    and bucket prefix of the suite's own (``gc`` deletes every old finished job it sees)."""
    prefix = f"suite-{secrets.token_hex(4)}"
    if ON_GCP:
        from covalent_gcpbatch_array._core.clients import make_storage_client

        env = os.environ
        settings = {
            "project_id": env["GOOGLE_CLOUD_PROJECT"],
            "region": env.get("GCPBATCH_TEST_REGION", "us-east1"),
            "bucket_name": env["GCPBATCH_TEST_BUCKET"],
            "container_image_uri": env["GCPBATCH_TEST_IMAGE"],
            "service_account_email": env.get("GCPBATCH_TEST_SERVICE_ACCOUNT", ""),
            "bucket_prefix": prefix,
            "machine_type": "e2-standard-2",
            "provisioning_model": "SPOT",
            "vcpus": 0.5,
            "memory": 512,
            "poll_freq": 5,
            "batch_window": 10.0,
            "batch_idle_gap": 3.0,
            "retries": 2,  # for Spot preemptions: user errors and time limits are never retried
        }
        project = settings["project_id"]
        yield Target(
            f"project {project}",
            settings,
            lambda: make_storage_client(project),
            deadline=1800,
            long_sleep=900,
            time_limit=60,
        )
        return
    cloud: LocalCloud = request.getfixturevalue("local_cloud")
    settings = cloud.executor_config() | {
        "region": "us-west1",
        "bucket_prefix": prefix,
        "poll_freq": 0.2,
        "batch_window": 0.5,
        "batch_idle_gap": 0.0,
        "retries": 0,
    }
    yield Target("the local cloud", settings, cloud.storage_client, 180, 60, 2)


def specs(count: int, special: dict[int, tuple[str, Any]] | None = None) -> list[Spec]:
    token = new_token()
    special = special or {}
    return [Spec(i, token, *special.get(i, ("ok", 0))) for i in range(count)]


def objects_under(target: Target, folder: str) -> list[str]:
    client = target.storage_client()
    return [blob.name for blob in client.list_blobs(target.settings["bucket_name"], prefix=folder)]


def gcpbatch_array(target: Target, *argv: str) -> Any:
    """Run ``gcpbatch-array ARGV --json`` with the target's flags; its JSON answer."""
    from covalent_gcpbatch_array.cli.main import build_parser

    args = build_parser().parse_args([*argv, *target.cli_flags(), "--json"])
    out = io.StringIO()
    with redirect_stdout(out):
        status = args.handler(args)
    assert status == 0, out.getvalue()
    return json.loads(out.getvalue())


class TestOnCloud:
    async def test_a_fan_out_of_20_with_a_raising_electron(self, target: Target) -> None:
        fan = await fan_out(target, specs(20, {7: ("raise", 0)}), deadline=target.deadline)  # type: ignore[arg-type]
        check_exactly_one_outcome(fan)
        for outcome in fan:
            if outcome.spec.index == 7:
                check_user_error(outcome)
            else:
                check_value(outcome)

    async def test_cancel(self, target: Target) -> None:
        fan = await fan_out(
            target,  # type: ignore[arg-type]
            specs(2, {0: ("sleep", target.long_sleep)}),
            cancel_after={0: 1.0},
            deadline=target.deadline,
        )
        check_cancelled(fan[0])
        check_value(fan[1])

    async def test_time_limit(self, target: Target) -> None:
        limit = target.time_limit
        fan = await fan_out(
            target,  # type: ignore[arg-type]
            specs(2, {1: ("sleep", target.long_sleep)}),
            time_limit=limit,
            deadline=target.deadline,
        )
        check_value(fan[0])
        check_infrastructure_error(fan[1], f"time_limit={limit:g}s")

    async def test_a_crash_is_retried_without_a_preemption(self, target: Target) -> None:
        # The first attempt exits 17 (not a user error, not a time limit): Batch retries it.
        fan = await fan_out(
            target,  # type: ignore[arg-type]
            specs(2, {1: ("crash_until", 1)}),
            retries=1,
            deadline=target.deadline,
        )
        check_exactly_one_outcome(fan)
        check_value(fan[0])
        check_value(fan[1])

    async def test_cleanup_leaves_no_objects(self, target: Target) -> None:
        fan = await fan_out(target, specs(3), deadline=target.deadline)  # type: ignore[arg-type]
        for outcome in fan:
            check_value(outcome)
        await ExecutorRuntime.wait_idle()
        jobs = {str(o.handle["job_id"]) for o in fan if o.handle}
        prefix = target.settings["bucket_prefix"]
        # The job's manifest stays (so `gcpbatch-array tasks` can name the electrons): gc's.
        left = [name for job in jobs for name in objects_under(target, f"{prefix}/{job}/tasks/")]
        assert not left, f"task objects left on {target.name}: {left}"

    async def test_gc_deletes_a_finished_job_and_its_objects(self, target: Target) -> None:
        fan = await fan_out(target, specs(2), keep_objects=True, deadline=target.deadline)  # type: ignore[arg-type]
        for outcome in fan:
            check_value(outcome)
        await ExecutorRuntime.wait_idle()
        job = str(fan[0].handle["job_id"]) if fan[0].handle else ""
        folder = f"{target.settings['bucket_prefix']}/{job}/"
        assert objects_under(target, folder), "keep_objects kept nothing"
        report = await _in_thread(
            gcpbatch_array, target, "gc", "--older-than", "0s", "--orphan-grace", "0s"
        )
        assert job in report["deleted_jobs"]
        assert not objects_under(target, folder)
        listed = await _in_thread(gcpbatch_array, target, "jobs")
        assert job not in [j["job_id"] for j in listed]

    async def test_doctor_finds_no_failure(self, target: Target) -> None:
        from covalent_gcpbatch_array.cli.doctor import run_checks
        from covalent_gcpbatch_array.config import resolve_config

        values = resolve_config(target.settings, {}.__getitem__)
        results = await _in_thread(run_checks, values)
        failed = [f"{r.name}: {r.summary}" for r in results if r.status.value == "fail"]
        assert not failed, failed


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    # The commands run their own event loop (anyio.run): not on this one.
    import anyio.to_thread

    return await anyio.to_thread.run_sync(lambda: fn(*args))
