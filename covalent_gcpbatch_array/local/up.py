"""``gcpbatch-array local up``: run the local cloud in the foreground until interrupted."""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from covalent_gcpbatch_array.local._process import read_tail
from covalent_gcpbatch_array.local.cloud import LocalCloud

__all__ = ["describe", "executor_toml", "serve"]

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_HEALTH_CHECK_INTERVAL = 1.0  # seconds between checks that both servers are still alive


def executor_toml(cloud: LocalCloud) -> str:
    """The executor's settings for this cloud, as a ``[executors.gcpbatch_array]`` TOML table."""
    lines = ["[executors.gcpbatch_array]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in cloud.executor_config().items()]
    return "\n".join(lines)


def describe(cloud: LocalCloud) -> str:
    """What a user needs to point clients and the executor at a running local cloud."""
    rows = [
        ("Google Batch API", f'{cloud.batch_endpoint}   (client_options={{"api_endpoint": ...}})'),
        ("Cloud Storage", f"{cloud.storage_endpoint}   (STORAGE_EMULATOR_HOST)"),
        ("project", cloud.project_id),
        ("region", cloud.region),
        ("bucket", f"gs://{cloud.bucket_name}"),
        ("container image", cloud.container_image_uri),
        ("task outputs, logs", str(cloud.workdir)),
    ]
    width = max(len(name) for name, _ in rows)
    table = "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)
    return (
        f"Local cloud is up.\n{table}\n\n"
        "Point Google's storage clients at it (in another shell):\n"
        f"  export STORAGE_EMULATOR_HOST={cloud.storage_endpoint}\n\n"
        "Executor settings (Covalent config file, or GCPBatchArrayExecutor(**settings)):\n"
        f"{executor_toml(cloud)}\n\n"
        "Press Ctrl-C to stop."
    )


def serve(cloud: LocalCloud, *, json_output: bool = False, out: TextIO = sys.stdout) -> int:
    """Start ``cloud``, print how to reach it, and run until SIGINT/SIGTERM/SIGHUP.

    Must run on the main thread (it installs signal handlers).

    :param json_output: print one JSON line (endpoints and executor settings) instead of text
    :returns: the exit status: 0 after a signal, 1 if a server died on its own
    """
    with _stop_requested() as stop, cloud:
        if json_output:
            ready = {
                "batch_endpoint": cloud.batch_endpoint,
                "storage_endpoint": cloud.storage_endpoint,
                "executor_config": cloud.executor_config(),
                "environment": cloud.environment(),
                "workdir": str(cloud.workdir),
            }
            print(json.dumps(ready), file=out, flush=True)
        else:
            print(describe(cloud), file=out, flush=True)
        # The wait doubles as a health check: a server that dies must not go unnoticed.
        while not stop.wait(_HEALTH_CHECK_INTERVAL):
            if not cloud.is_running():
                logs = "".join(
                    f"\n--- {name} (last lines) ---\n{read_tail(cloud.workdir / name)}"
                    for name in ("batch-server.log", "fake-gcs-server.log")
                )
                print(
                    f"A local cloud server stopped unexpectedly. Stopping.{logs}",
                    file=sys.stderr,
                    flush=True,
                )
                return 1
        print("Stopping the local cloud ...", file=sys.stderr, flush=True)
    print("Stopped.", file=sys.stderr, flush=True)
    return 0


@contextmanager
def _stop_requested() -> Iterator[threading.Event]:
    """An event set by SIGINT, SIGTERM or SIGHUP (installed before the servers start, so a
    signal during start-up also stops them cleanly)."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.set()) for sig in _STOP_SIGNALS}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
