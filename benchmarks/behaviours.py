"""The behaviours table: the cases of :mod:`benchmarks.behaviour_cases` for each executor.

    python -m benchmarks.fanout --behaviours        # every case, then RESULTS.md
    python -m benchmarks.behaviours --case raises --mode original --out FILE   # one of them

For covalent-gcpbatch-plugin 0.15.0 (through its shim, :mod:`benchmarks.original_plugin`) and
for ours batched and with one job per electron, each case runs on a LocalCloud of the same
settings (a small provisioning delay, at most 8 tasks at once, the case's quota), started
fresh for each executor: a job-creation quota is a sliding window, and the plugin leaves its
jobs behind, so a cloud shared in turn would not give the next executor the same conditions.
Besides what each electron's caller saw, a result records the emulator's counts (jobs, calls
by method, task attempts, quota refusals), each electron's task attempts (the emulator's
record of its task, found by the job handle the executor saved), the objects left in the
bucket, and where it ran (commit, machine, load averages, settings), as the fan-out results
do. One child process per case and executor; results are ``behaviour-CASE-MODE.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from .behaviour_cases import CASES, Case, run_case
from .harness import Mode, environment
from .measure import machine_load
from .original_plugin.run import cloud_options, run_in_seed_venv
from .original_plugin.venv import ensure_seed_venv

__all__ = [
    "CLOUD_SETTINGS",
    "MODES",
    "behaviour_path",
    "not_run",
    "run_behaviour",
    "run_behaviours",
]

#: The cloud of every case: a short VM boot, at most 8 task processes at once.
CLOUD_SETTINGS: dict[str, Any] = {"provisioning_delay": 1.0, "max_running_tasks": 8}
#: Our executor's knobs beyond its defaults: short waits, so that the whole table takes minutes.
OUR_KNOBS: dict[str, Any] = {"poll_freq": 1.0, "batch_window": 1.0, "batch_idle_gap": 0.5}
#: The plugin's poll period (whole seconds); its other settings are its defaults.
PLUGIN_POLL_FREQ = 1.0
MODES = (Mode.ORIGINAL, Mode.BATCHED, Mode.BASELINE)
#: Seconds a child may take beyond its case's own time-out.
CHILD_MARGIN = 180.0


def behaviour_path(results_dir: Path, case: str, mode: Mode) -> Path:
    """Where the result of ``case`` for ``mode`` goes."""
    return results_dir / f"behaviour-{case}-{mode.value}.json"


def task_attempts(workdir: Path, job_handle: Any) -> int | None:
    """Attempts the emulator started for the task behind ``job_handle`` (ours: a dict with
    ``job_id`` and ``task_index``; the plugin's: its job's id, one task): the attempt folders
    it keeps under ``WORKDIR/jobs/JOB_ID/UID/tasks/INDEX/`` (see
    ``BatchScheduler.output_dir``), also after the job is deleted. ``None``: no job handle."""
    if isinstance(job_handle, dict):
        job_id, index = str(job_handle["job_id"]), int(job_handle["task_index"])
    elif isinstance(job_handle, str):
        job_id, index = job_handle, 0
    else:
        return None
    return sum(1 for path in workdir.glob(f"jobs/{job_id}/*/tasks/{index}/*") if path.is_dir())


def _object_names(cloud: Any) -> list[str]:
    """The objects in the cloud's bucket (what the executor left behind)."""
    client = cloud.storage_client(direct=True)
    return [blob.name for blob in client.list_blobs(cloud.bucket_name)]


async def _run_ours(case: Case, mode: Mode, cloud: Any, markers: Path) -> tuple[Any, Any]:
    import covalent  # noqa: F401  (before the plugin module, as the server does)

    from covalent_gcpbatch_array._core.runtime import ExecutorRuntime
    from covalent_gcpbatch_array.gcpbatch_array import GCPBatchArrayExecutor

    settings = cloud.executor_config() | OUR_KNOBS
    if mode == Mode.BASELINE:
        settings["max_tasks_per_job"] = 1

    def make_executor() -> Any:
        return GCPBatchArrayExecutor(**settings)

    observed = await run_case(case, make_executor, markers, f"behave-{uuid.uuid4().hex[:8]}")
    await ExecutorRuntime.wait_idle()  # its clean-up ends before the cloud is read and stopped
    return observed, settings


async def run_behaviour(case: Case, mode: Mode) -> dict[str, Any]:
    """Start a local cloud, run ``case`` on it with ``mode``'s executor, and record it all."""
    from covalent_gcpbatch_array.local import LocalCloud

    load_before = machine_load()
    venv = ensure_seed_venv() if mode == Mode.ORIGINAL else None
    cloud_settings = CLOUD_SETTINGS | {"jobs_per_minute": case.jobs_per_minute}
    async with LocalCloud(**cloud_settings, **(cloud_options(venv) if venv else {})) as cloud:
        if case.preempted:
            # Attempt 0 of task 0 of the next job created dies as a reclaimed Spot VM does.
            await anyio.to_thread.run_sync(cloud.fail_task, 0)
        with tempfile.TemporaryDirectory(prefix="cga-behave-") as folder:
            markers = Path(folder)
            if venv is None:
                observed, settings = await _run_ours(case, mode, cloud, markers)
            else:
                arguments = ["--case", case.name, "--markers", folder]
                arguments += ["--dispatch-id", f"behave-{uuid.uuid4().hex[:8]}"]
                observed, settings = await run_in_seed_venv(
                    venv, cloud, "benchmarks.behaviour_cases", arguments, PLUGIN_POLL_FREQ
                )
        stats = await anyio.to_thread.run_sync(cloud.stats)
        objects_left = await anyio.to_thread.run_sync(_object_names, cloud)
        for electron in observed["electrons"]:
            electron["task_attempts"] = task_attempts(cloud.workdir, electron["job_handle"])
    return {
        **_identity(case, mode, load_before),
        "settings": {"case": vars(case), "cloud": cloud_settings, "executor": settings},
        "jobs_created": int(stats["jobs_created"]),
        "task_attempts": int(stats["task_attempts"]),
        "quota_refusals": int(stats["quota_refusals"]),
        "api_calls": {method: int(count) for method, count in stats["api_calls"].items() if count},
        "objects_left": len(objects_left),
        "objects_left_names": objects_left[:20],
        **observed,
    }


def _identity(case: Case, mode: Mode, load_before: list[float]) -> dict[str, Any]:
    """What every behaviour result starts with: which case, which executor, where it ran."""
    return {
        "kind": "behaviour",
        "case": case.name,
        "question": case.question,
        "mode": mode.value,
        "environment": environment(load_before),
    }


def not_run(case: Case, mode: Mode, reason: str, load_before: list[float]) -> dict[str, Any]:
    """The result of a case that could not be run, saying why (the table shows it)."""
    return _identity(case, mode, load_before) | {"not_run": reason}


async def run_behaviours(
    results_dir: Path,
    cases: tuple[str, ...] = tuple(CASES),
    modes: tuple[Mode, ...] = MODES,
    *,
    parallel: int = 3,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Run every case for every executor, ``parallel`` child processes at a time.

    The plugin's venv is made first (once), so that the children do not race to make it.
    :returns: the result files written
    """
    if Mode.ORIGINAL in modes:
        await anyio.to_thread.run_sync(ensure_seed_venv)
    await anyio.Path(results_dir).mkdir(parents=True, exist_ok=True)
    limiter = anyio.CapacityLimiter(max(1, parallel))
    written: list[Path] = []

    async def child(case: str, mode: Mode) -> None:
        out = behaviour_path(results_dir, case, mode)
        command = [sys.executable, "-m", "benchmarks.behaviours", "--case", case]
        command += ["--mode", mode.value, "--out", str(out)]
        async with limiter:
            log(f"start behaviour {case} / {mode.value}")
            load_before = machine_load()
            reason = f"no result within {CASES[case].timeout + CHILD_MARGIN:g} s"
            with anyio.move_on_after(CASES[case].timeout + CHILD_MARGIN):
                completed = await anyio.run_process(
                    command, check=False, cwd=Path(__file__).parent.parent
                )
                if completed.returncode == 0 and out.exists():
                    written.append(out)
                    log(f"done behaviour {case} / {mode.value}")
                    return
                output = (completed.stdout + completed.stderr).decode(errors="replace")
                reason = f"exit code {completed.returncode}: {output.strip()[-1500:]}"
            log(f"FAILED behaviour {case} / {mode.value}: {reason}")
            out.write_text(json.dumps(not_run(CASES[case], mode, reason, load_before), indent=1))
            written.append(out)

    async with anyio.create_task_group() as tg:
        for case in cases:
            for mode in modes:
                tg.start_soon(child, case, mode)
    return sorted(written)


def main(argv: list[str] | None = None) -> None:
    """Run one case for one executor and write its result (JSON)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--case", required=True, choices=sorted(CASES))
    parser.add_argument("--mode", required=True, choices=[mode.value for mode in MODES])
    parser.add_argument("--out", required=True, type=Path)
    options = parser.parse_args(argv)
    result = anyio.run(run_behaviour, CASES[options.case], Mode(options.mode))
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
