"""The benchmark plans (``--all``, ``--quick``) and running them, one child process per run.

Every run is one :class:`~benchmarks.harness.RunSpec` measured by ``python -m
benchmarks.harness`` in a process of its own, on a local cloud of its own, so that CPU time,
peak memory and the API counters belong to that run alone. Runs that mostly wait are run side
by side to fit the whole plan in a few hours on 2 cores:

- *heavy* runs (thousands of task processes on this machine) run first, one at a time, with
  nothing else running: they give the headline numbers;
- *background* runs are bound by the job-creation quota (one job per electron at 20 jobs a
  minute: 1,000 electrons take 50 minutes to get their jobs) and use almost no CPU: they run
  alongside the light runs;
- the other, *light* runs (mostly waiting for simulated VM boots) go ``parallel`` at a time.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import anyio

from .harness import Arrival, Mode, RunSpec

__all__ = [
    "RESULTS_DIR",
    "Planned",
    "covalent_plan",
    "full_plan",
    "original_plan",
    "quick_plan",
    "run_plan",
    "size_plan",
    "trickle_plan",
]

RESULTS_DIR = Path(__file__).parent / "results"

#: The realistic cloud of issue 5: a VM boot of 30 s and 20 job creations a minute.
PROVISIONING_DELAY = 30.0
JOBS_PER_MINUTE = 20
#: Covalent's own dispatch rate, about 2 electrons a second (FACTS.md).
COVALENT_RATE = 2.0
#: Task processes running at once: more than the 2 cores can serve only adds contention.
MAX_RUNNING_TASKS = 8
#: Seconds a run may take beyond what its plan expects before it is stopped.
TIMEOUT_MARGIN = 1800.0


@dataclasses.dataclass(frozen=True)
class Planned:
    """A run in a plan, and how it shares the machine."""

    spec: RunSpec  # what to run
    background: bool = False  # quota-bound and nearly idle: runs alongside the light runs
    heavy: bool = False  # CPU-bound: runs first, alone
    profile: bool = False  # record a py-spy profile of the executor process
    expected_seconds: float = 600.0  # rough duration, for the time-out


def make_spec(name: str, group: str, mode: Mode, electrons: int, **knobs: Any) -> RunSpec:
    defaults: dict[str, Any] = {
        "provisioning_delay": PROVISIONING_DELAY,
        "jobs_per_minute": JOBS_PER_MINUTE,
        "max_running_tasks": MAX_RUNNING_TASKS,
        "rate": COVALENT_RATE,
    }
    return RunSpec(name=name, group=group, mode=mode, electrons=electrons, **(defaults | knobs))


def _quota_minutes(electrons: int, per_minute: int | None) -> float:
    return 0.0 if per_minute is None else electrons / per_minute


def size_plan(
    batched: Sequence[int] = (10, 100, 1000, 10_000),
    baseline: Sequence[int] = (10, 100, 1000),
    *,
    group: str = "sizes",
    profile_at: int | None = 10_000,
    **knobs: Any,
) -> list[Planned]:
    """Burst fan-outs of each size, batched and baseline (one job per electron)."""
    plans = []
    for mode, sizes in ((Mode.BATCHED, batched), (Mode.BASELINE, baseline)):
        for electrons in sizes:
            spec = make_spec(f"{group}-{mode.value}-{electrons}", group, mode, electrons, **knobs)
            quota = _quota_minutes(electrons, spec.jobs_per_minute) * 60
            expected = (
                spec.target_seconds + electrons / 15 + (quota if mode is Mode.BASELINE else 0)
            )
            plans.append(
                Planned(
                    spec,
                    background=mode is Mode.BASELINE and quota > 600,
                    heavy=mode is Mode.BATCHED and electrons >= 1000,
                    profile=mode is Mode.BATCHED and electrons == profile_at,
                    expected_seconds=expected,
                )
            )
    return plans


def trickle_plan(
    batched: Sequence[int] = (10, 100, 1000),
    baseline: Sequence[int] = (10, 100, 1000),
    *,
    group: str = "trickle",
    **knobs: Any,
) -> list[Planned]:
    """Fan-outs arriving at Covalent's dispatch rate, batched and baseline."""
    plans = []
    for mode, sizes in ((Mode.BATCHED, batched), (Mode.BASELINE, baseline)):
        for electrons in sizes:
            spec = make_spec(
                f"{group}-{mode.value}-{electrons}",
                group,
                mode,
                electrons,
                arrival=Arrival.TRICKLE,
                **knobs,
            )
            quota = _quota_minutes(electrons, spec.jobs_per_minute) * 60
            expected = spec.target_seconds + (quota if mode is Mode.BASELINE else 0)
            plans.append(
                Planned(
                    spec,
                    background=mode is Mode.BASELINE and quota > 600,
                    expected_seconds=expected,
                )
            )
    return plans


def covalent_plan(electrons: int = 100, *, group: str = "covalent", **knobs: Any) -> list[Planned]:
    """The same fan-out dispatched through a real Covalent server, in each mode."""
    plans = []
    for mode in Mode:
        spec = make_spec(
            f"{group}-{mode.value}-{electrons}",
            group,
            mode,
            electrons,
            arrival=Arrival.COVALENT,
            **knobs,
        )
        quota = _quota_minutes(electrons, spec.jobs_per_minute) * 60
        # Server start-up, Covalent's ~0.5 s per electron, then the jobs.
        expected = 60 + electrons / 2 + spec.target_seconds
        plans.append(
            Planned(
                spec,
                heavy=mode is Mode.BATCHED,  # the server's dispatcher keeps a core busy
                expected_seconds=expected + (quota if mode is Mode.BASELINE else 0),
            )
        )
    return plans


def original_plan(
    sizes: Sequence[int] = (10, 100, 1000), *, group: str = "original", **knobs: Any
) -> list[Planned]:
    """The original plugin beside both modes of ours, burst and through Covalent, same cloud.

    No job-creation quota here (``jobs_per_minute=None`` unless given): under 20 a minute the
    original plugin fails most electrons of a burst (a 429 fails its run), which the behaviours
    show; these rows compare what each does with the same electrons.
    """
    plans = []
    for arrival in (Arrival.BURST, Arrival.COVALENT):
        for electrons in sizes:
            for mode in (Mode.ORIGINAL, Mode.BATCHED, Mode.BASELINE):
                name = f"{group}-{arrival.value}-{mode.value}-{electrons}"
                spec = make_spec(
                    name,
                    group,
                    mode,
                    electrons,
                    **({"jobs_per_minute": None} | knobs),
                    arrival=arrival,
                )
                # Covalent starts about 2 electrons a second; the original plugin lists the
                # whole bucket at every poll of a finished job (quadratic in the fan-out).
                expected = spec.target_seconds + electrons / 2 + electrons**2 / 5000
                plans.append(
                    Planned(
                        spec,
                        heavy=arrival is Arrival.COVALENT or electrons >= 1000,
                        expected_seconds=60 + expected,
                    )
                )
    return plans


def full_plan() -> list[Planned]:
    """Every fan-out RESULTS.md shows (a few hours on 2 cores, most of it waiting)."""
    from .sweep import sweep_plan

    return [*size_plan(), *trickle_plan(), *covalent_plan(), *original_plan(), *sweep_plan()]


def quick_plan() -> list[Planned]:
    """A miniature of :func:`full_plan` that keeps the scripts working (well under a minute).

    One run per code path, each as short as it can be: a burst in both modes (the size table
    and plots, the goals), a batched trickle (the trickle arrivals and their table) and one
    window-sweep point (the sweep table and plot); no VM boot, no quota. The original plugin
    is left out: its venv takes one to two minutes to make on a fresh machine (16 s a run
    once cached), more than this whole plan.
    """
    from .sweep import sweep_plan

    fast: dict[str, Any] = {
        "provisioning_delay": 0.0,
        "jobs_per_minute": None,
        "max_running_tasks": 4,
        "batch_window": 0.5,
        "batch_idle_gap": 0.2,
        "poll_freq": 0.25,
        "rate": 10.0,
    }
    return [
        *size_plan((4,), (4,), profile_at=None, **fast),
        *trickle_plan((4,), (), **fast),
        *sweep_plan(
            electrons=4,
            windows=(0.5,),
            idle_gaps=(0.0,),
            arrivals=(Arrival.TRICKLE,),
            **{k: v for k, v in fast.items() if k not in ("batch_window", "batch_idle_gap")},
        ),
    ]


def result_path(results_dir: Path, spec: RunSpec) -> Path:
    """Where the result of ``spec`` goes."""
    return results_dir / f"{spec.name}.json"


async def run_plan(
    plans: Iterable[Planned],
    results_dir: Path = RESULTS_DIR,
    *,
    parallel: int = 3,
    resume: bool = False,
    in_process: bool = False,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Run every planned run that has no result yet (``resume``) or all of them.

    :param parallel: light runs in flight at once
    :param in_process: run the specs one by one in this process (no isolation of memory
        and CPU between runs; saves a process start per run, for the quick plan)
    :returns: the result files written
    """
    todo = [p for p in plans if not (resume and result_path(results_dir, p.spec).exists())]
    await anyio.Path(results_dir).mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if in_process:
        from .harness import run_fanout

        for planned in todo:
            result = await run_fanout(planned.spec)
            written.append(_write(results_dir, planned.spec, result))
            log(summary_line(result))
        return written

    runner = _ChildRunner(results_dir, log)
    # Heavy runs first, each alone on the machine: their timings and CPU are the headline.
    for planned in (p for p in todo if p.heavy and not p.background):
        await runner.run(planned)
    light = anyio.CapacityLimiter(max(1, parallel))
    async with anyio.create_task_group() as tg:
        for planned in (p for p in todo if p.background):
            tg.start_soon(runner.run, planned)
        for planned in (p for p in todo if not p.heavy and not p.background):
            tg.start_soon(_limited, light, runner.run, planned)
    return [path for path in runner.written if path.exists()]


async def _limited(
    limiter: anyio.CapacityLimiter, func: Callable[[Planned], Any], planned: Planned
) -> None:
    async with limiter:
        await func(planned)


def _write(results_dir: Path, spec: RunSpec, result: dict[str, Any]) -> Path:
    path = result_path(results_dir, spec)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


def summary_line(result: dict[str, Any]) -> str:
    """One line about one result, for the console."""
    spec = result["spec"]
    return (
        f"{spec['name']:<34} jobs {result['jobs_created']:>5}  api {result['api_calls_total']:>6}"
        f"  storage {result['storage_ops_total']:>7}  first {result['time_to_first_result_s']}s"
        f"  last {result['time_to_last_result_s']}s  cpu {result['cpu_ms_per_electron']} ms/el"
        f"  failed {result['failed']}"
    )


class _ChildRunner:
    """Runs one spec in a child process (optionally under py-spy) and collects its result."""

    def __init__(self, results_dir: Path, log: Callable[[str], None]) -> None:
        self.results_dir = results_dir  # where results (and profiles) go
        self.log = log  # progress messages
        self.logs_dir = Path(tempfile.gettempdir()) / "cga-bench-logs"  # children's stderr
        self.written: list[Path] = []  # result files written so far

    async def run(self, planned: Planned) -> None:
        spec = planned.spec
        out = result_path(self.results_dir, spec)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.logs_dir / f"{spec.name}.log"
        command = [
            sys.executable,
            *("-m", "benchmarks.harness"),
            *("--spec", json.dumps(spec.to_json()), "--out", str(out)),
        ]
        self.log(f"start {spec.name} (expected ~{planned.expected_seconds:.0f} s)")
        timeout = planned.expected_seconds + TIMEOUT_MARGIN
        project = Path(__file__).parent.parent
        with log_path.open("wb") as log_file, anyio.move_on_after(timeout) as scope:
            # On the time-out the process is killed on the way out of this block.
            process = await anyio.open_process(
                command, stdin=None, stdout=log_file, stderr=log_file, cwd=project
            )
            async with process, anyio.create_task_group() as tg:
                if planned.profile:
                    tg.start_soon(self._profile, process.pid, spec)
                code = await process.wait()
        if scope.cancelled_caught:
            self.log(f"FAILED {spec.name}: no result after {timeout:.0f} s; log: {log_path}")
        elif code != 0 or not out.exists():
            self.log(f"FAILED {spec.name}: exit code {code}; log: {log_path}")
        else:
            self.written.append(out)
            self.log(summary_line(json.loads(out.read_text())))

    async def _profile(self, pid: int, spec: RunSpec) -> None:
        """Sample the child with py-spy until it exits: whichever thread holds the GIL (so the
        profile is of CPU time, not of threads waiting on sockets), without pausing it."""
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        raw = self.results_dir / f"{spec.name}.pyspy.txt"
        command = [
            py_spy,
            "record",
            *("--pid", str(pid), "--format", "raw", "--rate", "20", "--gil", "--nonblocking"),
            *("--output", str(raw)),
        ]
        try:
            completed = await anyio.run_process(command, check=False)
        except OSError as exc:
            self.log(f"no profile of {spec.name}: py-spy did not start ({exc})")
            return
        if completed.returncode != 0 or not raw.exists():
            self.log(f"no profile of {spec.name}: {completed.stderr.decode(errors='replace')}")
            return
        from .profiling import summarise

        summary = summarise(raw.read_text())
        (self.results_dir / f"{spec.name}.profile.json").write_text(
            json.dumps(summary, indent=1) + "\n"
        )
        raw.unlink()
