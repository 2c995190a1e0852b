"""The fan-out benchmark: batched array jobs against one job per electron, side by side.

    python -m benchmarks.fanout --electrons 100 1000             # both modes, burst
    python -m benchmarks.fanout --electrons 100 --arrival trickle --rate 2
    python -m benchmarks.fanout --all                            # everything in RESULTS.md
    python -m benchmarks.fanout --quick                          # a miniature, in < 1 min
    python -m benchmarks.fanout --original [--electrons 10 100]  # against the original plugin
    python -m benchmarks.fanout --behaviours                     # raise, preemption, quota, cancel

Each run starts its own local cloud (our Batch emulator and fake-gcs-server) with the given
provisioning delay and job-creation quota, and measures, for each mode: Batch jobs created
(= simulated VM boots), Batch API calls by method, Cloud Storage operations, time to the first
and the last result, executor CPU time per electron and the executor's peak memory. Results
are JSON files in ``benchmarks/results/`` (``--all``) or ``benchmarks/results/adhoc/``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import anyio

from .harness import Arrival, Mode, RunSpec
from .suite import (
    COVALENT_RATE,
    JOBS_PER_MINUTE,
    MAX_RUNNING_TASKS,
    PROVISIONING_DELAY,
    RESULTS_DIR,
    Planned,
    full_plan,
    original_plan,
    quick_plan,
    run_plan,
)

__all__ = ["main"]

_DEFAULTS = RunSpec(name="", group="", mode=Mode.BATCHED, electrons=1)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.fanout",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    plan = parser.add_mutually_exclusive_group()
    plan.add_argument(
        "--all",
        action="store_true",
        help="run the whole suite and the behaviours, then write plots and RESULTS.md",
    )
    plan.add_argument("--quick", action="store_true", help="a miniature suite, for the tests")
    plan.add_argument(
        "--original",
        action="store_true",
        help="only the rows against covalent-gcpbatch-plugin 0.15.0, then RESULTS.md",
    )
    plan.add_argument(
        "--behaviours",
        action="store_true",
        help="only the behaviours table (an electron that raises, a preemption, a quota, a "
        "cancel) for the original plugin and both modes of ours, then RESULTS.md",
    )
    plan.add_argument(
        "--report-only", action="store_true", help="redraw plots and RESULTS.md from the JSON"
    )
    parser.add_argument(
        "--electrons",
        type=int,
        nargs="+",
        default=None,
        help="fan-out sizes (default: 100; with --original, its 10, 100 and 1,000)",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=[mode.value for mode in Mode],
        default=[mode.value for mode in Mode],
        help="batched: the executor's coalescing; baseline: one job per electron",
    )
    parser.add_argument(
        "--arrival", choices=[a.value for a in Arrival], default=Arrival.BURST.value
    )
    parser.add_argument(
        "--rate", type=float, default=COVALENT_RATE, help="electrons per second when trickling"
    )
    parser.add_argument(
        "--provisioning-delay",
        type=float,
        default=PROVISIONING_DELAY,
        help="seconds from a job's creation to its first task (a VM boot)",
    )
    parser.add_argument(
        "--jobs-per-minute",
        type=int,
        default=JOBS_PER_MINUTE,
        help="job-creation quota of the emulator (0: none)",
    )
    parser.add_argument(
        "--max-running-tasks",
        type=int,
        default=MAX_RUNNING_TASKS,
        help="task processes running at once on this machine (0: no cap)",
    )
    parser.add_argument("--task-seconds", type=float, default=_DEFAULTS.task_seconds)
    parser.add_argument("--batch-window", type=float, default=_DEFAULTS.batch_window)
    parser.add_argument("--batch-idle-gap", type=float, default=_DEFAULTS.batch_idle_gap)
    parser.add_argument("--max-tasks-per-job", type=int, default=_DEFAULTS.max_tasks_per_job)
    parser.add_argument("--poll-freq", type=float, default=_DEFAULTS.poll_freq)
    parser.add_argument(
        "--keep-objects", action="store_true", help="the executor leaves task objects in place"
    )
    parser.add_argument(
        "--trace-memory", action="store_true", help="also measure allocations with tracemalloc"
    )
    parser.add_argument(
        "--profile", action="store_true", help="record a py-spy profile of each batched run"
    )
    parser.add_argument(
        "--results", type=Path, help=f"results folder (default: {RESULTS_DIR}, adhoc/ in it)"
    )
    parser.add_argument("--parallel", type=int, default=3, help="light runs in flight at once")
    parser.add_argument("--resume", action="store_true", help="skip runs that have a result")
    return parser


def _adhoc_plan(options: argparse.Namespace) -> list[Planned]:
    knobs: dict[str, Any] = {
        "arrival": Arrival(options.arrival),
        "rate": options.rate,
        "provisioning_delay": options.provisioning_delay,
        "jobs_per_minute": options.jobs_per_minute or None,
        "max_running_tasks": options.max_running_tasks or None,
        "task_seconds": options.task_seconds,
        "batch_window": options.batch_window,
        "batch_idle_gap": options.batch_idle_gap,
        "max_tasks_per_job": options.max_tasks_per_job,
        "poll_freq": options.poll_freq,
        "keep_objects": options.keep_objects,
        "trace_memory": options.trace_memory,
    }
    plans = []
    for electrons in options.electrons or [100]:
        for mode in map(Mode, options.modes):
            name = f"adhoc-{options.arrival}-{mode.value}-{electrons}"
            spec = RunSpec(name=name, group="adhoc", mode=mode, electrons=electrons, **knobs)
            plans.append(
                Planned(
                    spec,
                    heavy=True,  # one at a time: ad-hoc runs are compared with each other
                    profile=options.profile and mode is Mode.BATCHED,
                    expected_seconds=spec.target_seconds + electrons * 4,
                )
            )
    return plans


def _print_side_by_side(paths: list[Path]) -> None:
    results = [json.loads(path.read_text()) for path in paths]
    rows = [
        ("jobs created (VM boots)", "jobs_created"),
        ("Batch API calls", "api_calls_total"),
        ("storage operations", "storage_ops_total"),
        ("time to first result (s)", "time_to_first_result_s"),
        ("time to last result (s)", "time_to_last_result_s"),
        ("executor CPU per electron (ms)", "cpu_ms_per_electron"),
        ("executor peak RSS (MB)", "rss_peak_mb"),
        ("failed electrons", "failed"),
    ]
    names = [result["spec"]["name"].removeprefix("adhoc-") for result in results]
    width = max(12, *(len(name) for name in names))
    print("\n" + " " * 32 + "".join(f"{name:>{width + 2}}" for name in names))
    for label, key in rows:
        cells = "".join(f"{result[key]!s:>{width + 2}}" for result in results)
        print(f"{label:<32}{cells}")
    for result in results:
        calls = ", ".join(f"{k} {v}" for k, v in result["api_calls"].items())
        print(f"{result['spec']['name']}: {calls}")


def main(argv: list[str] | None = None) -> None:
    """Run what the options ask for; see ``--help``."""
    options = _parser().parse_args(argv)
    from .report import write_report

    if options.report_only:
        write_report(options.results or RESULTS_DIR)
        return
    from .behaviours import run_behaviours

    if options.behaviours:
        results = options.results or RESULTS_DIR
        anyio.run(lambda: run_behaviours(results, parallel=options.parallel))
        print(f"wrote {write_report(results)}")
        return
    if options.all or options.quick or options.original:
        results = options.results or RESULTS_DIR
        if options.all:
            plan = full_plan()
        elif options.original:
            plan = original_plan(*([options.electrons] if options.electrons else []))
        else:
            plan = quick_plan()
        anyio.run(
            lambda: run_plan(
                plan,
                results,
                parallel=options.parallel,
                resume=options.resume,
                in_process=options.quick,
            )
        )
        if options.all:
            anyio.run(lambda: run_behaviours(results, parallel=options.parallel))
        print(f"wrote {write_report(results)}")
        return
    results = options.results or RESULTS_DIR / "adhoc"
    written = anyio.run(lambda: run_plan(_adhoc_plan(options), results, resume=options.resume))
    _print_side_by_side(written)


if __name__ == "__main__":
    main()
