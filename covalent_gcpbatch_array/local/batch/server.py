"""The Batch emulator process: ``python -m covalent_gcpbatch_array.local.batch.server``.

Process contract (LocalCloud and the CLI rely on it)::

    python -m covalent_gcpbatch_array.local.batch.server --host 127.0.0.1 --port 0 \\
        --storage-endpoint http://127.0.0.1:G [--provisioning-delay S] \\
        [--max-running-tasks N] [--jobs-per-minute N] [--image-map JSON] [--workdir DIR]
        [--preload MODULE,MODULE] [--jobs-per-window N] [--quota-window-seconds S]
        [--grpc-port P] [--deletion-delay S] [--cancellation-delay S]
        [--tasks-hidden-until-provisioned] [--log-resource-type TYPE]

``--jobs-per-minute N`` is ``--jobs-per-window N --quota-window-seconds 60``.

It binds the port (0: a free one), starts the task launcher, and once it serves prints exactly
one JSON line on stdout, ``{"endpoint": "http://127.0.0.1:PORT", "grpc_endpoint":
"127.0.0.1:GRPC_PORT", "pid": PID}``; logs go to stderr. The same jobs are served over REST
(``endpoint``, :mod:`.api`) and gRPC (``grpc_endpoint``, no TLS, :mod:`.grpc_api`; its port is
``--grpc-port``, 0 by default: a free one). SIGTERM or SIGINT stop it cleanly (every task
killed), and it gets SIGTERM when its parent dies. One task group holds the HTTP server and the
scheduler; the gRPC server runs on the same event loop.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import uvicorn

from covalent_gcpbatch_array.local.batch.api import create_app
from covalent_gcpbatch_array.local.batch.faults import DEFAULT_QUOTA_WINDOW_SECONDS
from covalent_gcpbatch_array.local.batch.grpc_api import grpc_server
from covalent_gcpbatch_array.local.batch.launcher import DEFAULT_PRELOAD, TaskLauncher
from covalent_gcpbatch_array.local.batch.rpcs import BatchRpcs
from covalent_gcpbatch_array.local.batch.scheduler import BatchScheduler, EmulatorSettings
from covalent_gcpbatch_array.local.logging.api import TaskLogIndex
from covalent_gcpbatch_array.local.logging.resources import JOB_RESOURCE, RESOURCE_TYPES
from covalent_gcpbatch_array.local.process import set_parent_death_signal

__all__ = ["main"]

logger = logging.getLogger("covalent_gcpbatch_array.local.batch.server")

# How long in-flight HTTP requests get to finish on shutdown.
_HTTP_SHUTDOWN_TIMEOUT = 2


class _Server(uvicorn.Server):
    """uvicorn's server, minus its signal handling (ours stops it), plus a "started" event."""

    def __init__(self, config: uvicorn.Config, started: anyio.Event) -> None:
        super().__init__(config)
        self._started_event = started

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self._started_event.set()


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def _image_map(text: str) -> dict[str, list[str]]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(value, dict) or not all(
        isinstance(argv, list) and all(isinstance(arg, str) for arg in argv)
        for argv in value.values()
    ):
        raise argparse.ArgumentTypeError(
            "must be a JSON object mapping an image URI (or pattern) to an argv list, e.g. "
            '{"*": ["python", "-m", "covalent_gcpbatch_array.runner"]}'
        )
    return value


def _module_list(text: str) -> tuple[str, ...]:
    return tuple(module.strip() for module in text.split(",") if module.strip())


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m covalent_gcpbatch_array.local.batch.server",
        description="Google Batch API emulator: runs jobs' tasks as local processes.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument(
        "--grpc-port", type=int, default=0, help="the gRPC server's port (0 picks a free one)"
    )
    parser.add_argument(
        "--storage-endpoint", required=True, help="GCS emulator URL, given to tasks"
    )
    parser.add_argument("--provisioning-delay", type=_non_negative_float, default=0.0)
    parser.add_argument("--max-running-tasks", type=_positive_int, default=None)
    defaults = EmulatorSettings()
    parser.add_argument(
        "--deletion-delay",
        type=_non_negative_float,
        default=defaults.deletion_delay,
        help="seconds a deleted job stays DELETION_IN_PROGRESS "
        f"(default: {defaults.deletion_delay:g})",
    )
    parser.add_argument(
        "--cancellation-delay",
        type=_non_negative_float,
        default=defaults.cancellation_delay,
        help="seconds a cancelled job stays CANCELLATION_IN_PROGRESS "
        f"(default: {defaults.cancellation_delay:g})",
    )
    parser.add_argument(
        "--tasks-hidden-until-provisioned",
        action="store_true",
        help="a new job lists no tasks until its provisioning delay is over, as Google's may",
    )
    parser.add_argument(
        "--log-resource-type",
        choices=RESOURCE_TYPES,
        default=JOB_RESOURCE,
        help=f"the monitored resource of task log entries (default: {JOB_RESOURCE})",
    )
    quota = parser.add_mutually_exclusive_group()
    quota.add_argument("--jobs-per-minute", type=_positive_int, default=None)
    quota.add_argument("--jobs-per-window", type=_positive_int, default=None)
    parser.add_argument(
        "--quota-window-seconds",
        type=_positive_float,
        default=None,
        help=f"the job-creation quota's window (default: {DEFAULT_QUOTA_WINDOW_SECONDS:g})",
    )
    parser.add_argument("--image-map", type=_image_map, default=None)
    parser.add_argument(
        "--preload",
        type=_module_list,
        default=DEFAULT_PRELOAD,
        help="comma-separated modules the task launcher's fork server imports once "
        f"(default: {','.join(DEFAULT_PRELOAD)}; '' for none)",
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="task outputs (default: a temporary folder)"
    )
    options = parser.parse_args(argv)
    if options.jobs_per_minute is not None:
        if options.quota_window_seconds is not None:
            parser.error("--jobs-per-minute has a 60 s window; use --jobs-per-window with it")
        options.jobs_per_window = options.jobs_per_minute
    if options.quota_window_seconds is None:
        options.quota_window_seconds = DEFAULT_QUOTA_WINDOW_SECONDS
    return options


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    return sock


async def _serve(options: argparse.Namespace, sock: socket.socket, workdir: Path) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with TaskLauncher(image_map=options.image_map, preload=options.preload) as launcher:
            scheduler = BatchScheduler(
                launcher,
                workdir=workdir,
                storage_endpoint=options.storage_endpoint,
                settings=EmulatorSettings(
                    provisioning_delay=options.provisioning_delay,
                    max_running_tasks=options.max_running_tasks,
                    deletion_delay=options.deletion_delay,
                    cancellation_delay=options.cancellation_delay,
                    tasks_hidden_until_provisioned=options.tasks_hidden_until_provisioned,
                ),
                jobs_per_window=options.jobs_per_window,
                quota_window_seconds=options.quota_window_seconds,
            )
            rpcs = BatchRpcs(scheduler, TaskLogIndex(options.log_resource_type))
            config = uvicorn.Config(
                create_app(rpcs),
                log_config=None,
                log_level="warning",
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=_HTTP_SHUTDOWN_TIMEOUT,
            )
            started, stopped = anyio.Event(), anyio.Event()
            server = _Server(config, started)

            async def serve_http() -> None:
                try:
                    await server.serve(sockets=[sock])
                finally:
                    stopped.set()

            grpc = grpc_server(rpcs)
            grpc_port = grpc.add_insecure_port(f"{options.host}:{options.grpc_port}")
            async with anyio.create_task_group() as tg:
                await tg.start(scheduler.run)
                tg.start_soon(serve_http)
                await grpc.start()
                await launcher.wait_ready()
                await _first(started.wait, stopped.wait)
                if not started.is_set():
                    raise RuntimeError("the HTTP server stopped during start-up (see above)")
                host, port = sock.getsockname()[:2]
                if host in ("0.0.0.0", ""):
                    host = "127.0.0.1"
                ready = {
                    "endpoint": f"http://{host}:{port}",
                    "grpc_endpoint": f"{host}:{grpc_port}",
                    "pid": os.getpid(),
                }
                print(json.dumps(ready), flush=True)
                logger.info("Batch emulator serving on %s, task outputs in %s", ready, workdir)

                async def wait_for_signal() -> None:
                    async for signum in signals:
                        logger.info("received signal %d: stopping", signum)
                        return

                await _first(wait_for_signal, stopped.wait)
                server.should_exit = True
                await grpc.stop(_HTTP_SHUTDOWN_TIMEOUT)
                with anyio.move_on_after(_HTTP_SHUTDOWN_TIMEOUT + 1):
                    await stopped.wait()
                # Cancelling the scheduler kills every running task.
                tg.cancel_scope.cancel()


async def _first(*waits: Callable[[], Awaitable[Any]]) -> None:
    """Return as soon as the first of ``waits`` returns (the others are cancelled)."""
    async with anyio.create_task_group() as tg:

        async def run(wait: Callable[[], Awaitable[Any]]) -> None:
            await wait()
            tg.cancel_scope.cancel()

        for wait in waits:
            tg.start_soon(run, wait)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the emulator until SIGTERM/SIGINT (see the module docstring for the contract)."""
    options = _parse_args(argv)
    # Started by a plain Popen too (the CLI, tests): ask for it here, not only in LocalCloud.
    set_parent_death_signal(signal.SIGTERM, os.getppid())
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s batch_server %(levelname)s %(name)s: %(message)s",
    )
    sock = _bind(options.host, options.port)
    own_workdir = options.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="batch-emulator-")) if own_workdir else options.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    # uvloop (installed with uvicorn's extras) makes the HTTP layer about twice as fast.
    backend_options = {"use_uvloop": importlib.util.find_spec("uvloop") is not None}
    try:
        anyio.run(
            _serve, options, sock, workdir, backend="asyncio", backend_options=backend_options
        )
    finally:
        sock.close()
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
