"""Graph-aware coalescing against the timers alone, in the same run (issue 13).

One local cloud and one private Covalent server for every scenario; each dispatch sets
``graph_aware`` (and the other keys) in the server's config file, which the server reads again
for every electron. Scenarios:

- ``demo``: the demo's grid search (1 load, 24 train, 24 score: three waves, 49 electrons) on an
  idle machine and beside two busy processes: jobs made (3 is the minimum);
- ``small``: 10 electrons: seconds from dispatch to the last result, graph-aware, timers, and one
  job per electron (``batch_window = 0``);
- ``big`` (``--big``): 1,000 electrons: jobs, first and last result.

Each row also has the span from the first to the last electron started (Covalent's own pace),
the ``batch_window`` in force, ``ceil(span / batch_window)`` (issue 13's bound on the jobs) and
why each new job stopped filling (its flush-reason label).

Run: ``.venv/bin/python -m benchmarks.graph_aware [--big] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from covalent_gcpbatch_array.config import DEFAULTS

from .harness import environment, sleepy_electron
from .measure import machine_load

DEFAULT_OUT = Path(__file__).parent / "results" / "graph_aware.json"
BUSY = "while True: pass"
#: Written before every dispatch (the server's config keeps keys a dispatch does not set):
#: the demo's poll_freq, and the coalescing keys' defaults unless a scenario sets them.
SETTINGS = {"poll_freq": 1.0} | {
    key: DEFAULTS[key]
    for key in ("batch_window", "batch_idle_gap", "max_tasks_per_job", "graph_aware")
}


@contextlib.contextmanager
def busy_processes(count: int) -> Iterator[None]:
    """``count`` processes spinning on a core each, for the block's duration."""
    processes = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(count)]
    try:
        yield
    finally:
        for process in processes:
            process.kill()
            process.wait()


def _seconds_since(moment: datetime, times: list[Any]) -> list[float]:
    utc = [t if t.tzinfo else t.replace(tzinfo=timezone.utc) for t in times if t]
    return [(t - moment).total_seconds() for t in utc]


def window_bound(span_s: float | None, batch_window: float) -> int | None:
    """``ceil(span / batch_window)``, at least one job; ``None`` without a span or a window."""
    if span_s is None or batch_window <= 0:
        return None
    return max(1, math.ceil(span_s / batch_window))


def _flush_reasons(jobs: Iterable[Any]) -> dict[str, int]:
    reasons = Counter(job.flushed or "unknown" for job in jobs)
    return dict(sorted(reasons.items()))


def run_one(
    ct: Any,
    cloud: Any,
    server: Any,
    workflow: Any,
    args: tuple[Any, ...],
    name: str,
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    """Dispatch ``workflow(*args)`` with ``settings`` in the server's config; measure it."""
    from covalent_gcpbatch_array.cli.demo import BatchProgress

    effective = SETTINGS | dict(settings)
    server.write_executor_config(cloud.executor_config() | effective)
    jobs_before = int(cloud.stats()["jobs_created"])
    listing = BatchProgress(cloud)
    known = {job.job_id for job in listing.read()}
    dispatched_at = datetime.now(timezone.utc)
    started = time.monotonic()
    dispatch_id = ct.dispatch(workflow, dispatcher_addr=server.address)(*args)
    result = server.result(dispatch_id)
    workflow_s = time.monotonic() - started
    nodes = [
        result.get_node_result(n)
        for n in result.lattice.transport_graph.get_internal_graph_copy().nodes
    ]
    ours = [n for n in nodes if n["node_name"] in name.split(",")]
    ends = _seconds_since(dispatched_at, [n["end_time"] for n in ours])
    starts = _seconds_since(dispatched_at, [n["start_time"] for n in ours])
    span = round(max(starts) - min(starts), 2) if starts else None
    new_jobs = [job for job in listing.read() if job.job_id not in known]
    return {
        "status": str(result.status),
        "electrons": len(ours),
        "jobs": int(cloud.stats()["jobs_created"]) - jobs_before,
        "tasks_per_job": [job.tasks for job in new_jobs],
        "flush_reasons": _flush_reasons(new_jobs),
        "batch_window": float(effective["batch_window"]),
        "arrival_span_s": span,
        "window_bound_jobs": window_bound(span, float(effective["batch_window"])),
        "first_result_s": round(min(ends), 2) if ends else None,
        "last_result_s": round(max(ends), 2) if ends else None,
        "workflow_s": round(workflow_s, 2),
        "errors": sorted({str(n["error"])[:300] for n in ours if n["error"]})[:3],
    }


def fan_out_workflow(ct: Any) -> Any:
    electron = ct.electron(sleepy_electron, executor="gcpbatch_array")

    @ct.lattice(executor="local", workflow_executor="local")
    def fan_out(count: int) -> list[int]:
        return [electron(index, 0.0) for index in range(count)]

    return fan_out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--big", action="store_true", help="also 1,000 electrons")
    parser.add_argument("--big-only", action="store_true", help="only 1,000 electrons")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each demo case")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    arguments = sys.argv[1:] if argv is None else argv
    options = parser.parse_args(arguments)

    import cloudpickle

    from covalent_gcpbatch_array.cli import demo_workflow
    from covalent_gcpbatch_array.cli.covalent_server import CovalentServer
    from covalent_gcpbatch_array.cli.demo import DEMO_PRELOAD
    from covalent_gcpbatch_array.local import LocalCloud

    rows: list[dict[str, Any]] = []
    # Taken at the start: the commit is the code the run loaded, even if one lands meanwhile.
    measured = environment(machine_load())

    def record(scenario: str, **row: Any) -> None:
        rows.append({"scenario": scenario, **row})
        print(json.dumps(rows[-1]), flush=True)

    with LocalCloud(preload=DEMO_PRELOAD) as cloud, CovalentServer() as server:
        os.environ["COVALENT_CONFIG_DIR"] = str(server.config_file.parent)
        import covalent as ct

        cloudpickle.register_pickle_by_value(sys.modules["benchmarks.harness"])
        grid = (list(demo_workflow.DEFAULT_C_VALUES), list(demo_workflow.DEFAULT_GAMMA_VALUES))
        for _ in range(0 if options.big_only else options.repeat):
            for machine, busy in (("idle", 0), ("loaded", 2)):
                for graph_aware in (True, False):
                    with busy_processes(busy):
                        row = run_one(
                            ct,
                            cloud,
                            server,
                            demo_workflow.grid_search,
                            grid,
                            "load_data,train_svm,score_svm",
                            {"graph_aware": graph_aware},
                        )
                    record("demo", machine=machine, graph_aware=graph_aware, **row)
        fan_out = fan_out_workflow(ct)
        small: dict[str, dict[str, Any]] = {
            "graph-aware": {"graph_aware": True},
            "timers": {"graph_aware": False},
            "one job per electron": {"graph_aware": False, "batch_window": 0.0},
        }
        for mode, settings in () if options.big_only else small.items():
            row = run_one(ct, cloud, server, fan_out, (10,), "sleepy_electron", settings)
            record("10 electrons", mode=mode, **row)
        if options.big or options.big_only:
            for graph_aware in (True, False):
                row = run_one(
                    ct,
                    cloud,
                    server,
                    fan_out,
                    (1000,),
                    "sleepy_electron",
                    {"graph_aware": graph_aware},
                )
                record("1000 electrons", graph_aware=graph_aware, **row)
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(
        json.dumps(
            {
                "environment": measured | {"load_average_after": machine_load()},
                "command": " ".join(["python -m benchmarks.graph_aware", *arguments]),
                "settings": SETTINGS,
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {options.out}")


if __name__ == "__main__":
    main()
