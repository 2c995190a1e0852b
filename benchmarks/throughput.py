"""How the local cloud's task throughput scales with ``max_running_tasks`` on this machine.

    python -m benchmarks.throughput [--electrons 400] [--caps 1 2 4 8 16 32]

For each cap, one burst of ``--electrons`` electrons through the executor (one job, no VM boot,
no quota, ``poll_freq`` 1 s), run by :mod:`benchmarks.harness` in a child process of its own.
Throughput is the middle 80% of the electrons over the time between the 10th and the 90th
percentile of their completion times: the edges (the first poll, the last task) do not count.
On Google the tasks of a job run side by side on their own VMs; here they are processes on
this machine's cores, so this curve is what the local cloud can show, not what Batch does.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .harness import Mode, RunSpec
from .measure import machine_load

__all__ = ["main", "measure_cap"]

RESULTS = Path(__file__).parent / "results" / "throughput.json"


def measure_cap(electrons: int, cap: int) -> dict[str, Any]:
    """One burst with at most ``cap`` tasks running at once; its throughput in tasks/s."""
    spec = RunSpec(
        name=f"throughput-{cap}",
        group="throughput",
        mode=Mode.BATCHED,
        electrons=electrons,
        provisioning_delay=0.0,
        jobs_per_minute=None,
        max_running_tasks=cap,
        batch_window=2.0,
        poll_freq=1.0,
    )
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        harness = [sys.executable, "-m", "benchmarks.harness"]
        subprocess.run(
            [*harness, "--spec", json.dumps(spec.to_json()), "--out", str(out)],
            check=True,
            cwd=Path(__file__).parent.parent,
            stdout=subprocess.DEVNULL,
        )
        result = json.loads(out.read_text())
    quantiles = result["completion_quantiles_s"]
    spread = quantiles["p90"] - quantiles["p10"]
    return {
        "max_running_tasks": cap,
        "electrons": electrons,
        "failed": result["failed"],
        "first_result_s": result["time_to_first_result_s"],
        "last_result_s": result["time_to_last_result_s"],
        "tasks_per_s": round(0.8 * electrons / spread, 1) if spread > 0 else None,
        "load_average_before": result["environment"]["load_average_before"],
        "load_average_after": result["environment"]["load_average_after"],
        "commit": result["environment"]["commit"],
    }


def main(argv: list[str] | None = None) -> None:
    """Measure every cap, print a table, and write ``benchmarks/results/throughput.json``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--electrons", type=int, default=400)
    parser.add_argument("--caps", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--out", type=Path, default=RESULTS)
    options = parser.parse_args(argv)
    rows = []
    print("max_running_tasks  tasks/s  first (s)  last (s)  failed  load before -> after")
    for cap in options.caps:
        row = measure_cap(options.electrons, cap)
        rows.append(row)
        print(
            f"{cap:>17}  {row['tasks_per_s']!s:>7}  {row['first_result_s']!s:>9}"
            f"  {row['last_result_s']!s:>8}  {row['failed']:>6}"
            f"  {row['load_average_before']} -> {row['load_average_after']}",
            flush=True,
        )
    document = {"cpus": os.cpu_count(), "load_average_end": machine_load(), "rows": rows}
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(document, indent=1) + "\n")


if __name__ == "__main__":
    main()
