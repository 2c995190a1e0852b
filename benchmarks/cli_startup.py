"""How long ``gcpbatch-array`` takes to answer, as a user runs it (a new process each time).

    .venv/bin/python -m benchmarks.cli_startup [--runs 5] [--source DIR]

Starts a local cloud with one job labelled as the executor's, then runs each command ``--runs``
times as a fresh process and prints the median and the fastest wall time:

- ``gcpbatch-array --help`` and ``gcpbatch-array jobs --help`` (argument parsing only);
- ``gcpbatch-array jobs`` and ``gcpbatch-array tasks JOB`` against the local cloud, with an
  empty Covalent config folder (so the settings come from the flags).

``--source DIR`` runs the package found in ``DIR`` instead (e.g. an older commit unpacked with
``git archive COMMIT covalent_gcpbatch_array | tar -x -C DIR``), to compare before and after.
Numbers depend on the machine's load; nothing here asserts a limit. ``python -X importtime``
says where the time of one command goes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

from google.cloud import batch_v1

from covalent_gcpbatch_array.local import LocalCloud


def labelled_job(cloud: LocalCloud) -> str:
    """A one-task job carrying the executor's label; its id."""
    script = batch_v1.Runnable(script=batch_v1.Runnable.Script(text="true"))
    job = batch_v1.Job(
        task_groups=[batch_v1.TaskGroup(task_spec=batch_v1.TaskSpec(runnables=[script]))],
        labels={"created-by": "covalent-gcpbatch-array"},
    )
    job_id = f"cga-bench-{uuid.uuid4().hex[:10]}"
    cloud.batch_client().create_job(
        parent=f"projects/{cloud.project_id}/locations/{cloud.region}", job=job, job_id=job_id
    )
    return job_id


def timed(argv: list[str], env: dict[str, str], runs: int) -> tuple[float, float]:
    """Median and fastest wall time of ``runs`` fresh runs of the command."""
    command = [sys.executable, "-m", "covalent_gcpbatch_array.cli.main", *argv]
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, env=env, check=True, capture_output=True, timeout=120)
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per command (default: 5)")
    parser.add_argument("--source", default="", help="run the package in this folder instead")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as config_dir, LocalCloud(preload=()) as cloud:
        env = {**os.environ, "COVALENT_CONFIG_DIR": config_dir, "HOME": config_dir}
        if args.source:
            env["PYTHONPATH"] = args.source
        config = cloud.executor_config()
        flags = [
            *("--project", config["project_id"], "--bucket", config["bucket_name"]),
            *("--batch-endpoint", config["batch_api_endpoint"]),
            *("--storage-endpoint", config["storage_api_endpoint"]),
        ]
        job_id = labelled_job(cloud)
        commands = {
            "--help": ["--help"],
            "jobs --help": ["jobs", "--help"],
            "jobs": ["jobs", *flags],
            "tasks JOB": ["tasks", job_id, *flags],
        }
        print(f"{'command':<14} {'median':>8} {'fastest':>8}   ({args.runs} runs each)")
        for name, argv in commands.items():
            median, fastest = timed(argv, env, args.runs)
            print(f"{name:<14} {median:7.2f}s {fastest:7.2f}s")


if __name__ == "__main__":
    main()
