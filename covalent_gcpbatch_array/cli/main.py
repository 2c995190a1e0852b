"""The ``gcpbatch-array`` command: a thin dispatcher over the package's subcommands.

Each subcommand registers its arguments in an ``_add_*`` function and names a handler that
imports what it needs when it runs, so ``gcpbatch-array --help`` stays fast.

    gcpbatch-array local up [--provisioning-delay S] [--max-running-tasks N] [--jobs-per-minute N]
                            [--covalent-config PATH] [--keep-config] ...
    gcpbatch-array local demo [--tasks N]
    gcpbatch-array demo [--c-values C,C,...] [--gamma-values G,G,...] [--hold]
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import TypeVar

from covalent_gcpbatch_array.cli.doctor import add_doctor_command
from covalent_gcpbatch_array.cli.jobs import add_inspect_commands
from covalent_gcpbatch_array.exceptions import GCPBatchArrayError, LocalCloudError

__all__ = ["build_parser", "main"]

#: Commands that run the local cloud: they need the package's [local] extra.
_LOCAL_COMMANDS = frozenset({"local", "demo"})
_LOCAL_EXTRA = re.compile(r"""extra\s*==\s*["']local["']""")
#: LocalCloud's knobs that `local up` passes on only when given.
_LOCAL_UP_KNOBS = (
    "deletion_delay",
    "cancellation_delay",
    "tasks_hidden_until_provisioned",
    "log_resource_type",
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``gcpbatch-array`` with ``argv`` (default: the command line); return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        if args.command in _LOCAL_COMMANDS:
            _require_local_extra()
        status: int = args.handler(args)
    except GCPBatchArrayError as exc:
        print(f"gcpbatch-array: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return status


def _require_local_extra() -> None:
    """Refuse a local-cloud command when a distribution of the [local] extra is missing."""
    missing = []
    for requirement in metadata.requires("covalent-gcpbatch-array") or []:
        name, _, marker = requirement.partition(";")
        if _LOCAL_EXTRA.search(marker):
            name = re.split(r"[<>=!~\[ ]", name.strip(), maxsplit=1)[0]
            try:
                metadata.distribution(name)
            except metadata.PackageNotFoundError:
                missing.append(name)
    if missing:
        raise LocalCloudError(
            f"the local cloud needs the package's [local] extra ({', '.join(missing)} not "
            "installed): pip install 'covalent-gcpbatch-array[local]'"
        )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="gcpbatch-array",
        description="Covalent executor for Google Cloud Batch array jobs, and its local cloud.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_local(commands)
    _add_demo(commands)
    add_inspect_commands(commands)
    add_doctor_command(commands)
    return parser


# -- argument types ---------------------------------------------------------------------------

_Number = TypeVar("_Number", int, float)


def _bounded(
    convert: Callable[[str], _Number], what: str, low: _Number, high: _Number | None = None
) -> Callable[[str], _Number]:
    """An argument type: ``convert(text)`` (``what`` it must look like), ``low`` to ``high``."""

    def parse(text: str) -> _Number:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (value >= low and (high is None or value <= high)):  # NaN is neither
            limits = f">= {low:g}" if high is None else f"{low:g}..{high:g}"
            raise argparse.ArgumentTypeError(f"must be {limits}, got {text}")
        return value

    return parse


_non_negative_float = _bounded(float, "a number of seconds", 0.0)
_positive_int = _bounded(int, "a whole number", 1)
_port = _bounded(int, "a port number", 0, 65535)


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
    # Given only when set: LocalCloud's defaults are the ones in force otherwise.
    up.add_argument(
        "--deletion-delay",
        type=_non_negative_float,
        default=argparse.SUPPRESS,
        metavar="S",
        help="seconds a deleted job stays DELETION_IN_PROGRESS (default: 2)",
    )
    up.add_argument(
        "--cancellation-delay",
        type=_non_negative_float,
        default=argparse.SUPPRESS,
        metavar="S",
        help="seconds a cancelled job stays CANCELLATION_IN_PROGRESS (default: 2)",
    )
    up.add_argument(
        "--tasks-hidden-until-provisioned",
        action="store_true",
        default=argparse.SUPPRESS,
        help="a new job lists no tasks until its provisioning delay is over, as Google's may",
    )
    up.add_argument(
        "--generic-task-logs",
        action="store_const",
        const="generic_task",
        dest="log_resource_type",
        default=argparse.SUPPRESS,
        help="task log entries on the older generic_task resource "
        "(default: batch.googleapis.com/Job)",
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
    up.add_argument(
        "--covalent-config",
        default=None,
        metavar="PATH",
        help="the Covalent config file whose [executors.gcpbatch_array] points at the local cloud "
        "(default: the one `covalent` uses, $COVALENT_CONFIG_DIR or ~/.config/covalent)",
    )
    config_mode = up.add_mutually_exclusive_group()
    config_mode.add_argument(
        "--keep-config",
        action="store_true",
        help="leave the local cloud's settings in the Covalent config when stopping "
        "(default: put back what was there)",
    )
    config_mode.add_argument(
        "--no-covalent-config",
        action="store_true",
        help="do not touch any Covalent config file",
    )
    up.set_defaults(handler=_local_up)
    _add_local_demo(actions)


def _local_up(args: argparse.Namespace) -> int:
    from covalent_gcpbatch_array.cli.local_up import serve
    from covalent_gcpbatch_array.local import LocalCloud

    cloud = LocalCloud(
        provisioning_delay=args.provisioning_delay,
        max_running_tasks=args.max_running_tasks,
        jobs_per_minute=args.jobs_per_minute,
        **{knob: getattr(args, knob) for knob in _LOCAL_UP_KNOBS if hasattr(args, knob)},
        batch_port=args.batch_port,
        storage_port=args.storage_port or None,
        workdir=args.workdir,
        preload=None if args.preload is None else [m for m in args.preload.split(",") if m],
    )
    covalent_config = None
    if not args.no_covalent_config:
        from covalent_gcpbatch_array.cli.covalent_config import default_config_file

        covalent_config = args.covalent_config or default_config_file()
    return serve(
        cloud,
        json_output=args.json,
        covalent_config=covalent_config,
        keep_config=args.keep_config,
    )


def _add_local_demo(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = actions.add_parser(
        "demo",
        help="run one array job on the local cloud through Google's real clients (no Covalent)",
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
    demo.set_defaults(handler=_local_demo)


def _local_demo(args: argparse.Namespace) -> int:
    from covalent_gcpbatch_array.cli.array_demo import run_demo

    if args.tasks < 2:
        print("gcpbatch-array local demo: error: --tasks must be at least 2", file=sys.stderr)
        return 2
    return run_demo(tasks=args.tasks, provisioning_delay=args.provisioning_delay)


# -- gcpbatch-array demo ----------------------------------------------------------------------


def _positive_floats(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas, got {text!r}"
        ) from None
    if not values or any(not value > 0 for value in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"values repeat in {text!r}")
    return values


def _add_demo(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = commands.add_parser(
        "demo",
        help="SVM grid search through a private Covalent server and the local cloud",
        description="Start the local cloud and a private Covalent server, dispatch the iris SVM "
        "grid search (a train_svm and a score_svm electron per (C, gamma) pair, all on "
        "gcpbatch_array), show each Batch job's progress, then print the scores, the best "
        "pair and how the electrons were packed into Batch jobs. Both servers stop at the end.",
    )
    demo.add_argument(
        "--c-values",
        type=_positive_floats,
        default=None,
        metavar="C,C,...",
        help="the grid's C values (default: 0.1,0.3,1,3,10,30)",
    )
    demo.add_argument(
        "--gamma-values",
        type=_positive_floats,
        default=None,
        metavar="G,G,...",
        help="the grid's gamma values (default: 0.01,0.1,0.7,3)",
    )
    demo.add_argument(
        "--provisioning-delay",
        type=_non_negative_float,
        default=0.0,
        metavar="S",
        help="seconds the emulator waits before a job's first task starts, like a VM boot "
        "(default: 0)",
    )
    demo.add_argument(
        "--hold",
        action="store_true",
        help="keep the Covalent server and the local cloud up after the result, to look at "
        "the Covalent UI, until Ctrl-C",
    )
    demo.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    from covalent_gcpbatch_array.cli.demo import run_demo

    return run_demo(
        c_values=args.c_values,
        gamma_values=args.gamma_values,
        provisioning_delay=args.provisioning_delay,
        hold=args.hold,
    )


if __name__ == "__main__":
    sys.exit(main())
