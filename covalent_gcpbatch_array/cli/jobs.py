"""``gcpbatch-array jobs | tasks | logs | gc``: inspect and clean up the executor's jobs.

    gcpbatch-array jobs [-o wide|json]                 jobs made by the executor: state, counts, age
    gcpbatch-array tasks JOB [-o wide|json]            each task: electron, state, attempts, exit code
    gcpbatch-array logs JOB INDEX [--json]             a task's output and traceback (bucket, else
                                                       Cloud Logging)
    gcpbatch-array gc [--older-than 7d] [--dry-run]    delete finished jobs and their objects

Tables fit the terminal like ``kubectl get``: ids, states and counts stay whole, the long text
(the last event) is cut or left out; ``-o wide`` adds columns and cuts nothing, ``-o json``
(or ``--json``) gives every value. Output to a pipe is never cut nor padded.

Settings are read as the executor reads them (flags win, then ``[executors.gcpbatch_array]``
in the Covalent config file, then the defaults), so with the executor configured no flag is
needed. Against the local cloud, pass the endpoints ``gcpbatch-array local up`` prints::

    gcpbatch-array jobs --project local-project --bucket covalent-local \\
        --batch-endpoint http://127.0.0.1:PORT --storage-endpoint http://127.0.0.1:PORT2
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, TextIO

from covalent_gcpbatch_array.cli.table import Column, output_width, render
from covalent_gcpbatch_array.config import DEFAULTS, ExecutorConfig, resolve_config
from covalent_gcpbatch_array.exceptions import ConfigError

if TYPE_CHECKING:
    # The Google clients take about a second to import: only a command that runs needs them,
    # so `gcpbatch-array --help` stays fast.
    from covalent_gcpbatch_array.cli.ops import GcReport, Inspector, JobSummary, TaskSummary

__all__ = [
    "InspectSettings",
    "add_inspect_commands",
    "read_covalent_config",
    "render_jobs",
    "render_tasks",
]

#: Flag -> executor key, for the keys these commands use.
_FLAGS = {
    "project": "project_id",
    "region": "region",
    "bucket": "bucket_name",
    "prefix": "bucket_prefix",
    "batch_endpoint": "batch_api_endpoint",
    "storage_endpoint": "storage_api_endpoint",
}
# ExecutorConfig requires an image; these commands never use one.
_UNUSED_IMAGE = "unused-by-gcpbatch-array-inspection"


@dataclass(frozen=True)
class InspectSettings:
    """Where the executor's jobs and objects are."""

    project_id: str  # the Google Cloud project
    region: str  # the Batch location
    bucket_name: str  # the executor's bucket
    bucket_prefix: str  # the folder of job folders in the bucket
    batch_api_endpoint: str  # "" for Google's
    storage_api_endpoint: str  # "" for Google's (or STORAGE_EMULATOR_HOST)
    logging_api_endpoint: str  # "" for Google's

    @classmethod
    def from_args(
        cls, args: argparse.Namespace, read_config_file: Callable[[str], Any]
    ) -> InspectSettings:
        """Flags over the Covalent config file over the defaults, validated as the executor does.

        :raises ConfigError: a setting is missing or invalid, naming the flag that sets it
        """
        explicit = {key: getattr(args, flag, None) for flag, key in _FLAGS.items()}
        values = resolve_config(explicit, read_config_file)
        values["container_image_uri"] = values["container_image_uri"] or _UNUSED_IMAGE
        try:
            config = ExecutorConfig.from_values(values)
        except ConfigError as exc:
            flag = next((f for f, key in _FLAGS.items() if key == exc.key), None)
            if flag is None:
                raise
            hint = (
                f"pass --{flag.replace('_', '-')}, or set {exc.key} under "
                f"[executors.gcpbatch_array] in the Covalent config file"
            )
            raise ConfigError(exc.key, exc.problem, hint) from None
        logging_endpoint = args.logging_endpoint
        if logging_endpoint is None:
            # The local cloud's Batch emulator serves the Logging API too.
            emulated = config.batch_api_endpoint.startswith("http://")
            logging_endpoint = config.batch_api_endpoint if emulated else ""
        return cls(
            project_id=config.project_id,
            region=config.region,
            bucket_name=config.bucket_name,
            bucket_prefix=config.bucket_prefix,
            batch_api_endpoint=config.batch_api_endpoint,
            storage_api_endpoint=config.storage_api_endpoint,
            logging_api_endpoint=logging_endpoint,
        )

    def inspector(self) -> Inspector:
        """An Inspector over the real clients for these settings."""
        from covalent_gcpbatch_array._core.clients import (
            make_batch_client,
            make_logging_client,
            make_storage_client,
        )
        from covalent_gcpbatch_array._core.jobs import JobsApi
        from covalent_gcpbatch_array._core.storage import TaskStore
        from covalent_gcpbatch_array.cli.ops import Inspector

        storage_client = make_storage_client(self.project_id, self.storage_api_endpoint)
        return Inspector(
            JobsApi(make_batch_client(self.batch_api_endpoint), self.project_id, self.region),
            TaskStore(storage_client, self.bucket_name, self.bucket_prefix),
            storage_client,
            lambda: make_logging_client(self.project_id, self.logging_api_endpoint),
        )


def read_covalent_config(key: str) -> Any:
    """Look ``key`` up under ``[executors.gcpbatch_array]`` of the file Covalent would use.

    The file is read directly: importing covalent to ask it would take two seconds.

    :raises KeyError: the key is not set there, or there is no such file
    """
    from covalent_gcpbatch_array.cli.covalent_config import (
        default_config_file,
        read_executor_config,
    )

    return (read_executor_config(default_config_file()) or {})[key]


def add_inspect_commands(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    *,
    read_config_file: Callable[[str], Any] = read_covalent_config,
) -> None:
    """Register ``jobs``, ``tasks``, ``logs`` and ``gc``; each sets ``handler(args) -> int``.

    :param subparsers: what ``ArgumentParser.add_subparsers()`` returned
    :param read_config_file: looks an executor key up in the Covalent config file, raising
        ``KeyError`` when it is not set (the default reads it as the executor does)
    """
    run = functools.partial(_run, read_config_file=read_config_file)
    jobs = subparsers.add_parser(
        "jobs",
        help="list the executor's Batch jobs: state, task counts, age",
        description="List the Batch jobs the executor made in the project and region "
        "(those labelled created-by=covalent-gcpbatch-array), newest first.",
    )
    _add_common(jobs, wide=True)
    jobs.set_defaults(handler=run(_jobs))

    tasks = subparsers.add_parser(
        "tasks",
        help="list a job's tasks: state, attempts, exit code, the electron each ran",
        description="List the tasks of one job with the electron (dispatch id, node id) each "
        "ran, from the job's manifest in the bucket.",
    )
    tasks.add_argument("job", help="the Batch job id (see `gcpbatch-array jobs`)")
    _add_common(tasks, wide=True)
    tasks.set_defaults(handler=run(_tasks))

    logs = subparsers.add_parser(
        "logs",
        help="print a task's stdout, stderr and the traceback of a failed electron",
        description="Print what one task printed: the runner's copy in the bucket if it is "
        "still there (last attempt, with the traceback from error.pkl), else the task's entries "
        "in Cloud Logging (every attempt; the runner logs the traceback there).",
    )
    logs.add_argument("job", help="the Batch job id")
    logs.add_argument("index", type=_task_index, help="the task index (see `gcpbatch-array tasks`)")
    _add_common(logs)
    logs.set_defaults(handler=run(_logs))

    gc = subparsers.add_parser(
        "gc",
        help="delete finished jobs and their bucket objects older than an age",
        description="Delete the executor's finished (SUCCEEDED or FAILED) Batch jobs whose last "
        "state change is older than --older-than, with their folders in the bucket, and job "
        "folders whose job is gone. Running jobs are never touched.",
    )
    gc.add_argument(
        "--older-than",
        type=_duration,
        default=timedelta(days=7),
        metavar="AGE",
        help="age such as 7d, 12h, 1d12h, 30m (default: 7d)",
    )
    gc.add_argument(
        "--orphan-grace",
        type=_duration,
        default=timedelta(hours=1),
        metavar="AGE",
        help="a folder without a job is only deleted once this old too: a batch uploads its "
        "inputs before its job exists (default: 1h)",
    )
    gc.add_argument("--dry-run", action="store_true", help="say what would go; delete nothing")
    _add_common(gc)
    gc.set_defaults(handler=run(_gc))


def _add_common(parser: argparse.ArgumentParser, *, wide: bool = False) -> None:
    where = parser.add_argument_group(
        "where to look (default: the executor's settings in the Covalent config file)"
    )
    where.add_argument("--project", metavar="ID", help="Google Cloud project id")
    where.add_argument(
        "--region", metavar="REGION", help=f"Batch region (default: {DEFAULTS['region']})"
    )
    where.add_argument("--bucket", metavar="NAME", help="the executor's bucket name")
    where.add_argument(
        "--prefix",
        metavar="PATH",
        help=f"the executor's bucket prefix (default: {DEFAULTS['bucket_prefix']})",
    )
    where.add_argument("--batch-endpoint", metavar="URL", help="Batch API URL (default: Google's)")
    where.add_argument(
        "--storage-endpoint", metavar="URL", help="Cloud Storage URL (default: Google's)"
    )
    where.add_argument(
        "--logging-endpoint",
        default=None,
        metavar="URL",
        help="Cloud Logging URL (default: Google's; the Batch endpoint if that is a plain "
        "http:// emulator such as the local cloud)",
    )
    if not wide:
        parser.add_argument("--json", action="store_true", help="print JSON for scripts")
        return
    parser.add_argument(
        "-o",
        "--output",
        choices=("table", "wide", "json"),
        default="table",
        help="table: fitted to the terminal (default); wide: more columns, nothing cut; "
        "json: every value, for scripts",
    )
    parser.add_argument(
        "--json", dest="output", action="store_const", const="json", help="same as -o json"
    )


def _task_index(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"a task index is a whole number >= 0, got {text!r}")
    return int(text)


def _duration(text: str) -> timedelta:
    from covalent_gcpbatch_array.cli.ops import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


Command = Callable[["Inspector", argparse.Namespace, TextIO], Any]


def _run(
    command: Command, *, read_config_file: Callable[[str], Any]
) -> Callable[[argparse.Namespace], int]:
    """A handler: settings from the flags and config file, then ``command`` on an event loop."""

    def handler(args: argparse.Namespace) -> int:
        import anyio

        inspector = InspectSettings.from_args(args, read_config_file).inspector()
        status: int = anyio.run(command, inspector, args, sys.stdout)
        return status

    return handler


# -- the commands -------------------------------------------------------------------------


async def _jobs(inspector: Inspector, args: argparse.Namespace, out: TextIO) -> int:
    jobs = await inspector.jobs()
    if args.output == "json":
        _print_json([_job_json(job) for job in jobs], out)
        return 0
    out.write(render_jobs(jobs, wide=args.output == "wide", width=output_width(out)))
    return 0


def render_jobs(
    jobs: list[JobSummary], *, wide: bool, width: int | None, now: datetime | None = None
) -> str:
    """The ``jobs`` table; every column but the wide view's extras is essential."""
    now = now or datetime.now(timezone.utc)
    counts = ("SUCCEEDED", "FAILED", "RUNNING", "PENDING")
    headers = counts if wide else ("SUCC", "FAIL", "RUN", "PEND")
    columns = [
        Column("JOB"),
        Column("STATE"),
        Column("TASKS", right=True),
        *(Column(header, right=True) for header in headers),
        Column("AGE", right=True),
    ]
    if wide:
        columns += [Column("FLUSHED"), Column("CREATED"), Column("UPDATED"), Column("UID")]
    rows = []
    for job in jobs:
        states = {**job.task_states}
        states["RUNNING"] = states.get("RUNNING", 0) + states.get("ASSIGNED", 0)
        row = [
            job.job_id,
            job.state if wide else _SHORT_STATES.get(job.state, job.state),
            str(job.task_count),
            *(str(states.get(state, 0)) for state in counts),
            _age(now - job.created),
        ]
        if wide:
            flushed = job.flush_reason or "-"
            row += [flushed, job.created.isoformat(), job.updated.isoformat(), job.uid]
        rows.append(row)
    return f"{len(jobs)} job(s)\n" + render(columns, rows, None if wide else width)


async def _tasks(inspector: Inspector, args: argparse.Namespace, out: TextIO) -> int:
    tasks = await inspector.tasks(args.job)
    if args.output == "json":
        _print_json([_task_json(task) for task in tasks], out)
        return 0
    wide = args.output == "wide"
    out.write(render_tasks(args.job, tasks, wide=wide, width=output_width(out)))
    if tasks and all(task.dispatch_id is None for task in tasks):
        out.write(
            "The job's manifest is gone, so which electron each task ran is unknown: the\n"
            "executor deletes a job's objects when it ends unless keep_objects is set. Each\n"
            "task's log names its electron (`gcpbatch-array logs JOB INDEX`).\n"
        )
    return 0


def render_tasks(job_id: str, tasks: list[TaskSummary], *, wide: bool, width: int | None) -> str:
    """The ``tasks`` table; the dispatch goes above it when every task shares one."""
    dispatches = {task.dispatch_id for task in tasks if task.dispatch_id}
    title = f"job {job_id}: {len(tasks)} task(s)"
    one_dispatch = len(dispatches) == 1 and not wide
    if one_dispatch:
        title += f"\ndispatch {next(iter(dispatches))}"
    columns = [
        Column("INDEX", right=True),
        Column("NODE", right=True),
        Column("ELECTRON"),
        Column("STATE"),
        Column("ATTEMPTS", right=True),
        Column("EXIT", right=True),
    ]
    if not one_dispatch:
        columns.append(Column("DISPATCH"))
    columns.append(Column("LAST EVENT", shrink=True))
    rows = []
    for task in tasks:
        event = task.events[-1][1] if task.events else ""
        row = [
            str(task.index),
            "-" if task.node_id is None else str(task.node_id),
            task.electron or "-",
            task.state,
            str(task.attempts),
            "-" if task.exit_code is None else str(task.exit_code),
        ]
        if not one_dispatch:
            row.append(task.dispatch_id or "-")
        row.append(event if wide else _STATE_CHANGE.sub(r"\1 -> \2", event))
        rows.append(row)
    return f"{title}\n" + render(columns, rows, None if wide else width)


async def _logs(inspector: Inspector, args: argparse.Namespace, out: TextIO) -> int:
    logs = await inspector.logs(args.job, args.index)
    if args.json:
        _print_json({"job_id": args.job, "index": args.index, **asdict(logs)}, out)
        return 0
    where = "bucket copy, last attempt" if logs.source == "bucket" else "Cloud Logging"
    parts = [("stdout", logs.stdout), ("stderr", logs.stderr)]
    if logs.traceback:
        parts.append(("traceback", logs.traceback))
    for name, text in parts:
        out.write(f"===== {name} of task {args.index} of job {args.job} ({where}) =====\n")
        out.write(text if text.endswith("\n") or not text else text + "\n")
    return 0


async def _gc(inspector: Inspector, args: argparse.Namespace, out: TextIO) -> int:
    report = await inspector.gc(
        args.older_than, orphan_grace=args.orphan_grace, dry_run=args.dry_run
    )
    if args.json:
        _print_json(asdict(report), out)
        return 0
    out.write(_gc_text(report, args.older_than))
    return 0


def _gc_text(report: GcReport, older_than: timedelta) -> str:
    verb = "would delete" if report.dry_run else "deleted"
    lines = [
        f"{verb} {len(report.deleted_jobs)} finished job(s) older than {_age(older_than)}"
        + "".join(f"\n  {job}" for job in report.deleted_jobs),
        f"{verb} {len(report.deleted_folders)} folder(s) whose job is gone"
        + "".join(f"\n  {folder}" for folder in report.deleted_folders),
    ]
    if report.deleted_orphans:
        lines.append(
            f"{verb} {len(report.deleted_orphans)} unfinished job(s) whose executor is gone "
            "(lease older than orphan_timeout)"
            + "".join(f"\n  {job}" for job in report.deleted_orphans)
        )
    if not report.dry_run:
        lines.append(f"deleted {report.deleted_objects} object(s) from the bucket")
    if report.kept_unfinished:
        lines.append(
            f"kept {len(report.kept_unfinished)} old job(s) that are still running"
            + "".join(f"\n  {job}" for job in report.kept_unfinished)
        )
    return "\n".join(lines) + "\n"


# -- rendering ----------------------------------------------------------------------------


#: Job states too long for the narrow table (the wide view and JSON say them in full).
_SHORT_STATES = {
    "DELETION_IN_PROGRESS": "DELETING",
    "CANCELLATION_IN_PROGRESS": "CANCELLING",
    "STATE_UNSPECIFIED": "UNKNOWN",
}
#: Batch's "Task state is updated from RUNNING to FAILED on zones/..." reads "RUNNING -> FAILED
#: on zones/..." in the narrow table.
_STATE_CHANGE = re.compile(r"^Task state is updated from (\w+) to (\w+)")


def _print_json(value: Any, out: TextIO) -> None:
    out.write(json.dumps(value, indent=2) + "\n")


def _job_json(job: JobSummary) -> dict[str, Any]:
    data = asdict(job)
    data["created"] = job.created.isoformat()
    data["updated"] = job.updated.isoformat()
    return data


def _task_json(task: TaskSummary) -> dict[str, Any]:
    data = asdict(task)
    data["events"] = [{"time": when.isoformat(), "description": text} for when, text in task.events]
    return data


def _age(delta: timedelta) -> str:
    """``3d4h``, ``5h12m``, ``4m10s``, ``12s``: the two largest units."""
    seconds = max(0, int(delta.total_seconds()))
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size or (unit == "s" and not parts):
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts[:2])
