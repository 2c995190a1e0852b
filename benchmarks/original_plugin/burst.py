"""The original plugin's side of a fan-out, run by the plugin's own venv (``.venv-seed``).

    .venv-seed/bin/python -m benchmarks.original_plugin.burst --load JSON --settings JSON \\
        --dispatch-id ID --out FILE

Runs from the clone's root, so that only :mod:`benchmarks.measure` and this module are
imported from it (not this project's package, which that venv lacks). As in Covalent's server,
each electron gets a fresh ``GCPBatchExecutor(**settings)`` and its ``run()`` is a task of one
event loop; Covalent's answers to the executor (cancel requested? save the job handle) are
given here as its dispatcher gives them for a task nobody cancelled. ``CGA_SEED_BATCH_ENDPOINT``
and ``STORAGE_EMULATOR_HOST`` in the environment point the plugin at the local cloud (see
:mod:`.shim`). Writes the measurements as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import anyio

from benchmarks.measure import FanOut, FanOutLoad, sleepy_electron


async def _answer_as_covalent(executor: Any) -> None:
    """What Covalent's ``executor_proxy.watch`` answers, for a task that is not cancelled."""
    from covalent.executor.utils import Signals

    while True:
        action, body = await executor._send_queue.get()
        if action == Signals.EXIT:
            return
        answer = False if (action, body) == (Signals.GET, "cancel_requested") else None
        executor._recv_queue.put_nowait((True, answer))


def electron_runner(settings: dict[str, Any], dispatch_id: str, task_seconds: float) -> Any:
    """``call(index)`` for :class:`FanOut`: a fresh plugin executor runs electron ``index``."""
    from covalent_gcpbatch_plugin.gcpbatch import GCPBatchExecutor

    async def call(index: int) -> Any:
        executor = GCPBatchExecutor(**settings)
        executor._init_runtime()
        metadata = {"dispatch_id": dispatch_id, "node_id": index}
        async with anyio.create_task_group() as tg:
            tg.start_soon(_answer_as_covalent, executor)
            try:
                return await executor.run(sleepy_electron, [index, task_seconds], {}, metadata)
            finally:
                tg.cancel_scope.cancel()

    return call


def main() -> None:
    """Run the fan-out the options describe and print its measurements."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load", required=True, help="FanOutLoad fields as JSON")
    parser.add_argument("--settings", required=True, help="GCPBatchExecutor keywords as JSON")
    parser.add_argument("--dispatch-id", required=True)
    parser.add_argument("--out", required=True, help="where to write the measurements (JSON)")
    options = parser.parse_args()
    import covalent  # noqa: F401  (as the server does, before the plugin module)

    load = FanOutLoad(**json.loads(options.load))
    call = electron_runner(json.loads(options.settings), options.dispatch_id, load.task_seconds)
    measured = anyio.run(FanOut(load, call).run)
    with open(options.out, "w") as out:
        json.dump(measured, out)


if __name__ == "__main__":
    main()
