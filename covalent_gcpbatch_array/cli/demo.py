"""``gcpbatch-array demo``: an SVM grid search through a real Covalent server and the local cloud.

Starts the local cloud and a private Covalent server (its own HOME and port; both stopped at
the end, even on failure or Ctrl-C), writes the executor's settings into that server's config,
and dispatches :func:`~covalent_gcpbatch_array.cli.demo_workflow.grid_search`: the iris SVM
trained and scored for every (C, gamma) pair of a grid, every electron on ``gcpbatch_array``.
While it runs, it shows each Batch job's tasks (pending, running, done), read through the real
``google-cloud-batch`` client; at the end it prints the score table, the best pair, and how the
electrons were packed into jobs.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table

from covalent_gcpbatch_array._core.jobs import FLUSH_REASON_LABEL
from covalent_gcpbatch_array.cli.covalent_server import CovalentServer
from covalent_gcpbatch_array.cli.local_up import stop_requested
from covalent_gcpbatch_array.local.cloud import LocalCloud

if TYPE_CHECKING:
    from covalent._results_manager.result import Result

__all__ = ["DEMO_EXECUTOR_SETTINGS", "run_demo"]

#: Added to the local cloud's endpoints in the server's config. The coalescing knobs keep their
#: defaults (10 s window, 2 s idle gap); a local task needs no 5 s polling.
DEMO_EXECUTOR_SETTINGS: dict[str, Any] = {"poll_freq": 1.0}
#: Modules the emulator's "VM image" has imported before a task starts, as a real image would
#: have them installed: the fork server's defaults (covalent, the runner) and the science stack.
DEMO_PRELOAD = (
    "covalent",
    "cloudpickle",
    "google.cloud.storage",
    "covalent_gcpbatch_array.runner",
    "numpy",
    "sklearn.svm",
    "sklearn.datasets",
)
_FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "POSTPROCESSING_FAILED", "PENDING_POSTPROCESSING")
_REFRESH_SECONDS = 0.5  # between progress reads (one ListJobs + one status query)


@dataclass(frozen=True)
class JobProgress:
    """One Batch job's tasks by state, as the Batch API reports them."""

    job_id: str  # the job's id (last part of its name)
    tasks: int  # taskCount
    pending: int  # PENDING + ASSIGNED: waiting for a VM
    running: int  # RUNNING
    succeeded: int  # SUCCEEDED
    failed: int  # FAILED
    flushed: str  # why the executor stopped filling it ("idle gap", "full", ...; "" unknown)


class BatchProgress:
    """Reads every job of the local cloud with one ``ListJobs`` call, through the real client."""

    def __init__(self, cloud: LocalCloud) -> None:
        self._client = cloud.batch_client()
        self._parent = f"projects/{cloud.project_id}/locations/{cloud.region}"
        self.calls = 0  # ListJobs calls made (the emulator counts them with the executor's)

    def read(self) -> list[JobProgress]:
        """Every job, oldest first."""
        self.calls += 1
        jobs = []
        for job in self._client.list_jobs(parent=self._parent):
            group = job.status.task_groups.get("group0")
            counts = {key: int(value) for key, value in group.counts.items()} if group else {}
            jobs.append(
                JobProgress(
                    job_id=job.name.rsplit("/", 1)[-1],
                    tasks=int(job.task_groups[0].task_count) if job.task_groups else 0,
                    pending=counts.get("PENDING", 0) + counts.get("ASSIGNED", 0),
                    running=counts.get("RUNNING", 0),
                    succeeded=counts.get("SUCCEEDED", 0),
                    failed=counts.get("FAILED", 0),
                    flushed=job.labels.get(FLUSH_REASON_LABEL, "").replace("-", " "),
                )
            )
        return sorted(jobs, key=lambda job: job.job_id)


def run_demo(
    *,
    c_values: Sequence[float] | None = None,
    gamma_values: Sequence[float] | None = None,
    provisioning_delay: float = 0.0,
    hold: bool = False,
    out: TextIO | None = None,
) -> int:
    """Run the grid search demo and print what happens.

    :param c_values: the grid's C values (default: ``demo_workflow.DEFAULT_C_VALUES``)
    :param gamma_values: the grid's gamma values (default: ``DEFAULT_GAMMA_VALUES``)
    :param provisioning_delay: seconds the emulator waits before a job's first task starts
    :param hold: keep both servers up after the result (to look at the Covalent UI) until Ctrl-C
    :param out: where to print (default: stdout)
    :returns: the exit status: 0 if the workflow completed, else 1
    """
    # soft_wrap: a log or a pipe (80 columns to rich) gets whole progress lines.
    console = Console(file=out if out is not None else sys.stdout, highlight=False, soft_wrap=True)
    started = time.monotonic()
    console.print("[bold]Starting the local cloud and a private Covalent server ...[/bold]")
    with contextlib.ExitStack() as stack:
        cloud, server = _start_both(stack, provisioning_delay)
        # Written once the server runs (`covalent start` rewrites the file while it starts);
        # the server reads it again each time it makes an executor by its short name.
        server.write_executor_config(cloud.executor_config() | DEMO_EXECUTOR_SETTINGS)
        ready = time.monotonic()
        console.print(f"  Google Batch API  {cloud.batch_endpoint}  (emulator)")
        console.print(
            f"  Cloud Storage     {cloud.storage_endpoint}  (fake-gcs-server, behind its batch-API proxy)"
        )
        console.print(f"  Covalent UI       {server.address}  (HOME {server.home})")
        console.print(f"  ready in {ready - started:.1f} s")

        import covalent as ct

        from covalent_gcpbatch_array.cli import demo_workflow

        c_grid = list(c_values or demo_workflow.DEFAULT_C_VALUES)
        gamma_grid = list(gamma_values or demo_workflow.DEFAULT_GAMMA_VALUES)
        electrons = demo_workflow.electron_count(c_grid, gamma_grid)
        dispatch_id = ct.dispatch(demo_workflow.grid_search, dispatcher_addr=server.address)(
            c_grid, gamma_grid
        )
        console.print(
            f"Dispatched {dispatch_id}: {len(c_grid)} C x {len(gamma_grid)} gamma, "
            f"{electrons} electrons on gcpbatch_array."
        )
        watcher = BatchProgress(cloud)
        status, jobs = _show_progress(console, watcher, server.address, dispatch_id, ready)
        finished = time.monotonic()
        result = server.result(dispatch_id, intermediate_outputs=False)
        output: Any = result.result
        ok = status == "COMPLETED" and isinstance(output, dict)
        if ok:
            _print_scores(console, output, c_grid, gamma_grid)
        else:
            _print_failure(console, status, result)
        _print_packing(console, electrons, jobs, cloud, watcher)
        console.print(
            f"Workflow {finished - ready:.1f} s; total {time.monotonic() - started:.1f} s "
            f"(start-up {ready - started:.1f} s)."
        )
        if hold:
            _hold(console, server)
        console.print("Stopping the Covalent server and the local cloud ...")
    console.print("Demo OK." if ok else "Demo FAILED.")
    return 0 if ok else 1


def _start_both(
    stack: contextlib.ExitStack, provisioning_delay: float
) -> tuple[LocalCloud, CovalentServer]:
    """Start the cloud here and the server in a worker thread at the same time.

    The cloud starts on this thread because its processes die with the thread that forked them;
    the server's processes are watched by a watchdog instead, so any thread may start it.
    """
    cloud = LocalCloud(provisioning_delay=provisioning_delay, preload=DEMO_PRELOAD)
    server = CovalentServer()
    # Exits run in reverse: the server stops first (cancelling what runs), then the cloud.
    stack.callback(cloud.stop)
    stack.callback(server.stop)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="covalent-start") as pool:
        server_started = pool.submit(server.start)
        try:
            cloud.start()
            # Importing covalent takes seconds: overlap it with the server's start too.
            import covalent  # noqa: F401
        finally:
            server_started.result()
    return cloud, server


def _show_progress(
    console: Console, watcher: BatchProgress, address: str, dispatch_id: str, since: float
) -> tuple[str, list[JobProgress]]:
    """Show the jobs' progress until the dispatch finishes; return its status and the jobs."""
    if console.is_terminal:
        with Live(console=console, auto_refresh=False) as live:
            while True:
                status, jobs = _poll(watcher, address, dispatch_id)
                live.update(_progress_view(status, jobs, time.monotonic() - since), refresh=True)
                if status in _FINISHED:
                    return status, jobs
                time.sleep(_REFRESH_SECONDS)
    # A log gets short lines: one per new job (its size and why it was flushed), then one
    # line of totals per change, never one per refresh nor one listing every job.
    seen: set[str] = set()
    last = ""
    while True:
        status, jobs = _poll(watcher, address, dispatch_id)
        stamp = f"  [{time.monotonic() - since:5.1f} s]"
        for job in jobs:
            if job.job_id not in seen:
                seen.add(job.job_id)
                console.print(f"{stamp} new job {job.job_id}: {_packed(job)}")
        line = _progress_line(status, jobs)
        if line != last:
            console.print(f"{stamp} {line}")
            last = line
        if status in _FINISHED:
            return status, jobs
        time.sleep(_REFRESH_SECONDS)


def _poll(watcher: BatchProgress, address: str, dispatch_id: str) -> tuple[str, list[JobProgress]]:
    """The dispatch's status, then every job (read after it, so they are at least as new)."""
    import covalent as ct

    answer: Any = ct.get_result(dispatch_id, status_only=True, dispatcher_addr=address)
    return str(answer["status"]), watcher.read()


def _progress_view(status: str, jobs: list[JobProgress], elapsed: float) -> Table:
    done = sum(job.succeeded + job.failed for job in jobs)
    total = sum(job.tasks for job in jobs)
    table = Table(
        title=f"Batch jobs: {done}/{total} tasks done  (dispatch {status}, {elapsed:.0f} s)",
        title_justify="left",
        box=box.SIMPLE_HEAD,  # no vertical rules, to keep whole job ids in 80 columns
        show_edge=False,
    )
    table.add_column("job", no_wrap=True)
    # Short headings keep the table in 80 columns: waiting = PENDING + ASSIGNED.
    for name in ("tasks", "wait", "run", "done", "fail"):
        table.add_column(name, justify="right")
    # Why the executor stopped filling the job (the counts say how far it is).
    table.add_column("flushed", no_wrap=True)
    for job in jobs:
        table.add_row(
            job.job_id,
            str(job.tasks),
            str(job.pending),
            str(job.running),
            str(job.succeeded),
            str(job.failed) if job.failed else "",
            job.flushed or "?",
        )
    return table


def _progress_line(status: str, jobs: list[JobProgress]) -> str:
    """The dispatch's status and the tasks of all its jobs, totalled: one short line."""
    if not jobs:
        return f"dispatch {status}; no Batch job yet"
    pending, running, done, failed = (
        sum(getattr(job, name) for job in jobs)
        for name in ("pending", "running", "succeeded", "failed")
    )
    return (
        f"dispatch {status}; {len(jobs)} job(s): {pending} pending, {running} running, "
        f"{done} done" + (f", {failed} failed" if failed else "")
    )


def _packed(job: JobProgress) -> str:
    return f"{job.tasks} task(s), flushed: {job.flushed or 'reason unknown'}"


def _print_scores(
    console: Console, output: dict[str, Any], c_grid: list[float], gamma_grid: list[float]
) -> None:
    scores, best = output["scores"], output["best"]
    table = Table(title="Accuracy on the 90 held-out iris samples", title_justify="left")
    table.add_column("C \\ gamma", justify="right")
    for gamma in gamma_grid:
        table.add_column(f"{gamma:g}", justify="right")
    for c in c_grid:
        cells = []
        for gamma in gamma_grid:
            text = f"{scores[f'{c:g},{gamma:g}']:.3f}"
            is_best = (c, gamma) == (best["C"], best["gamma"])
            cells.append(f"[bold green]{text} *[/bold green]" if is_best else text)
        table.add_row(f"{c:g}", *cells)
    console.print(table)
    console.print(
        f"[bold]Best: C={best['C']:g}, gamma={best['gamma']:g}, accuracy {best['score']:.3f}[/bold]"
    )


def _print_failure(console: Console, status: str, result: Result) -> None:
    console.print(f"[bold red]The workflow ended {status}.[/bold red] {result.error or ''}")
    graph = result.lattice.transport_graph
    for node_id in graph.get_internal_graph_copy().nodes:
        if str(graph.get_node_value(node_id, "status")) != "FAILED":
            continue
        name = graph.get_node_value(node_id, "name")
        detail = graph.get_node_value(node_id, "error") or graph.get_node_value(node_id, "stderr")
        console.print(f"  node {node_id} ({name}):\n{str(detail or '').strip()[-2000:]}")


def _print_packing(
    console: Console,
    electrons: int,
    jobs: list[JobProgress],
    cloud: LocalCloud,
    watcher: BatchProgress,
) -> None:
    calls = dict(cloud.stats()["api_calls"])
    # The progress display's ListJobs calls are the demo's, not the executor's.
    calls["ListJobs"] = calls.get("ListJobs", 0) - watcher.calls
    used = {name: count for name, count in sorted(calls.items()) if count}
    sizes = ", ".join(str(job.tasks) for job in jobs)
    # Why each job stopped filling: a row of one-task jobs flushed by "idle gap" says the
    # electrons came further apart than batch_idle_gap.
    reasons = ", ".join(job.flushed or "?" for job in jobs)
    console.print(
        f"Packing: {electrons} electrons -> {len(jobs)} Batch jobs (tasks per job: {sizes}; "
        f"flushed: {reasons}); "
        f"{sum(used.values())} Batch API calls by the executor "
        f"({', '.join(f'{name} {count}' for name, count in used.items())})."
    )


def _hold(console: Console, server: CovalentServer) -> None:
    console.print(
        f"Holding: the Covalent UI is at {server.address} . Press Ctrl-C to stop everything."
    )
    # A signal handler rather than KeyboardInterrupt: SIGTERM and SIGHUP stop it cleanly too,
    # and it works when the shell started us with SIGINT ignored (`... &`).
    with stop_requested() as stop:
        stop.wait()
