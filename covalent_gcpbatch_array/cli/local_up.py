"""``gcpbatch-array local up``: run the local cloud in the foreground until interrupted.

While it runs, ``[executors.gcpbatch_array]`` of the user's Covalent config points at it, so a
Covalent server (started before or after) runs ``executor="gcpbatch_array"`` electrons on the
local cloud; when it stops, the keys it wrote get their previous values back (unless
``--keep-config``). A Covalent server reads that table again each time it makes an executor by
its short name, so it needs no restart either way.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from covalent_gcpbatch_array.cli.covalent_config import (
    restore_executor_config,
    write_executor_config,
)
from covalent_gcpbatch_array.local.cloud import LocalCloud
from covalent_gcpbatch_array.local.process import read_tail

__all__ = ["describe", "executor_toml", "serve", "stop_requested"]

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
        ("Batch over gRPC", f"{cloud.batch_grpc_endpoint}   (grpc.insecure_channel(...))"),
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
        f"{executor_toml(cloud)}"
    )


def serve(
    cloud: LocalCloud,
    *,
    json_output: bool = False,
    covalent_config: str | os.PathLike[str] | None = None,
    keep_config: bool = False,
    out: TextIO = sys.stdout,
) -> int:
    """Start ``cloud``, print how to reach it, and run until SIGINT/SIGTERM/SIGHUP.

    Must run on the main thread (it installs signal handlers).

    :param json_output: print one JSON line (endpoints and executor settings) instead of text
    :param covalent_config: a Covalent config file whose ``[executors.gcpbatch_array]`` gets
        the cloud's settings while it runs (``None``: touch no config file)
    :param keep_config: leave those settings there when stopping, instead of putting back
        what was there before
    :returns: the exit status: 0 after a signal, 1 if a server died on its own
    """
    with stop_requested() as stop, cloud, _pointed_at(cloud, covalent_config, keep_config):
        if json_output:
            ready = {
                "batch_endpoint": cloud.batch_endpoint,
                "batch_grpc_endpoint": cloud.batch_grpc_endpoint,
                "storage_endpoint": cloud.storage_endpoint,
                "executor_config": cloud.executor_config(),
                "environment": cloud.environment(),
                "workdir": str(cloud.workdir),
                "covalent_config": None if covalent_config is None else str(covalent_config),
            }
            print(json.dumps(ready), file=out, flush=True)
        else:
            print(describe(cloud), file=out, flush=True)
            if covalent_config is not None:
                print(_config_note(covalent_config, keep_config), file=out, flush=True)
            print("\nPress Ctrl-C to stop.", file=out, flush=True)
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
def _pointed_at(
    cloud: LocalCloud, config_file: str | os.PathLike[str] | None, keep: bool
) -> Iterator[None]:
    """Point ``[executors.gcpbatch_array]`` of ``config_file`` at ``cloud`` while it runs."""
    if config_file is None:
        yield
        return
    backup = write_executor_config(config_file, cloud.executor_config())
    try:
        yield
    finally:
        if not keep:
            changed = restore_executor_config(backup)
            note = f" (left alone, changed meanwhile: {', '.join(changed)})" if changed else ""
            print(
                f"Put back [executors.gcpbatch_array] in {backup.config_file}{note}.",
                file=sys.stderr,
                flush=True,
            )


def _config_note(config_file: str | os.PathLike[str], keep: bool) -> str:
    when = (
        "and keeps them after it stops (--keep-config)"
        if keep
        else "until it stops, then puts back what was there"
    )
    return (
        f"\nCovalent: [executors.gcpbatch_array] in {Path(config_file)} points at this cloud "
        f"{when}.\n"
        '  Start Covalent (`covalent start`) and use executor="gcpbatch_array" on electrons.'
    )


@contextmanager
def stop_requested() -> Iterator[threading.Event]:
    """An event set by SIGINT, SIGTERM or SIGHUP (installed before the servers start, so a
    signal during start-up also stops them cleanly)."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.set()) for sig in _STOP_SIGNALS}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
