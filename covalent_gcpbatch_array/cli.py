"""The ``gcpbatch-array`` command: a thin dispatcher over the package's subcommands.

Each subcommand registers its arguments in an ``_add_*`` function and names a handler that
imports what it needs when it runs, so ``gcpbatch-array --help`` stays fast.

    gcpbatch-array local up [--provisioning-delay S] [--max-running-tasks N] [--jobs-per-minute N]
    gcpbatch-array demo [--tasks N]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from covalent_gcpbatch_array.exceptions import GCPBatchArrayError

__all__ = ["build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``gcpbatch-array`` with ``argv`` (default: the command line); return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        status: int = args.handler(args)
    except GCPBatchArrayError as exc:
        print(f"gcpbatch-array: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return status


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="gcpbatch-array",
        description="Covalent executor for Google Cloud Batch array jobs, and its local cloud.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_local(commands)
    _add_demo(commands)
    return parser


# -- argument types ---------------------------------------------------------------------------


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0..65535, got {text}")
    return value


# -- gcpbatch-array local ---------------------------------------------------------------------


def _add_local(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    local = commands.add_parser(
        "local", help="the local cloud: a Google Batch API emulator and fake-gcs-server"
    )
    actions = local.add_subparsers(dest="action", required=True, metavar="ACTION")
    up = actions.add_parser(
        "up",
        help="run the local cloud in the foreground until Ctrl-C",
        description="Start the Batch API emulator and fake-gcs-server, print their endpoints "
        "and the executor settings that use them, and run until Ctrl-C or SIGTERM.",
    )
    up.add_argument(
        "--provisioning-delay",
        type=_non_negative_float,
        default=0.0,
        metavar="S",
        help="seconds from a job's creation to its first task start (default: 0)",
    )
    up.add_argument(
        "--max-running-tasks",
        type=_positive_int,
        default=None,
        metavar="N",
        help="cap on tasks running at once across all jobs (default: no cap)",
    )
    up.add_argument(
        "--jobs-per-minute",
        type=_positive_int,
        default=None,
        metavar="N",
        help="job-creation quota; over it CreateJob answers 429 (default: none)",
    )
    up.add_argument(
        "--batch-port", type=_port, default=0, help="Batch API port (default: a free one)"
    )
    up.add_argument(
        "--storage-port", type=_port, default=None, help="Cloud Storage port (default: a free one)"
    )
    up.add_argument(
        "--workdir", default=None, help="keep task outputs and logs here (default: a temp folder)"
    )
    up.add_argument(
        "--preload",
        default=None,
        metavar="MODULES",
        help="comma-separated modules the task fork server imports once "
        "(default: covalent and the runner's imports; '' for none: faster start for scripts)",
    )
    up.add_argument(
        "--json", action="store_true", help="print one JSON line with the endpoints and settings"
    )
    up.set_defaults(handler=_local_up)


def _local_up(args: argparse.Namespace) -> int:
    from covalent_gcpbatch_array.local import LocalCloud
    from covalent_gcpbatch_array.local.up import serve

    cloud = LocalCloud(
        provisioning_delay=args.provisioning_delay,
        max_running_tasks=args.max_running_tasks,
        jobs_per_minute=args.jobs_per_minute,
        batch_port=args.batch_port,
        storage_port=args.storage_port or None,
        workdir=args.workdir,
        preload=None if args.preload is None else [m for m in args.preload.split(",") if m],
    )
    return serve(cloud, json_output=args.json)


# -- gcpbatch-array demo ----------------------------------------------------------------------


def _add_demo(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = commands.add_parser(
        "demo",
        help="run an array job on the local cloud through Google's real clients",
        description="Start the local cloud, run one Batch array job whose tasks each write "
        "their own Cloud Storage object (one task is preempted and retried), check the "
        "objects, and print what the emulator counted.",
    )
    demo.add_argument(
        "--tasks", type=_positive_int, default=8, metavar="N", help="task count (default: 8)"
    )
    demo.add_argument(
        "--provisioning-delay",
        type=_non_negative_float,
        default=0.0,
        metavar="S",
        help="seconds before the job's first task starts (default: 0)",
    )
    demo.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    from covalent_gcpbatch_array.demo import run_demo

    if args.tasks < 2:
        print("gcpbatch-array demo: error: --tasks must be at least 2", file=sys.stderr)
        return 2
    return run_demo(tasks=args.tasks, provisioning_delay=args.provisioning_delay)


if __name__ == "__main__":
    sys.exit(main())
