"""What writing a batch's inputs as one object would save the executor, before building it.

    .venv/bin/python -m benchmarks.packed_inputs [--electrons 1000] [--rounds 3] [--json PATH]

Issue 16 lists "fewer requests per electron" as an option for the executor's CPU: a batch's
inputs written as one object that each task reads its byte range of. This measures the
executor's side of it on the local cloud, without changing the executor: the CPU time of this
process (every thread) to

- ``per-electron``: upload ``--electrons`` input envelopes one object each, as the executor
  does (:meth:`AsyncTaskStore.upload_input`, at most ``INPUT_SLOTS`` at once), then delete them
  with the job's clean-up (:meth:`AsyncTaskStore.delete_tasks`: a listing and batch requests);
- ``packed``: upload the same envelopes as one object (an offset table and the envelopes one
  after the other), then delete that one object.

Rounds alternate the two. The envelopes are real ones (:func:`encode_input` of the fan-out
benchmark's electron), encoded before the clock starts in both cases. Nothing here asserts a
limit: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import struct
import time
import uuid
from pathlib import Path
from typing import Any

import anyio

from covalent_gcpbatch_array._core.clients import make_storage_client
from covalent_gcpbatch_array._core.contract import TaskRef
from covalent_gcpbatch_array._core.envelopes import ElectronOrigin, encode_input, new_job_key
from covalent_gcpbatch_array._core.storage import INPUT_SLOTS, AsyncTaskStore, TaskStore
from covalent_gcpbatch_array.local import LocalCloud

from .harness import environment
from .measure import machine_load, sleepy_electron


def envelopes(job_id: str, count: int) -> list[bytes]:
    """``count`` signed input envelopes of the fan-out benchmark's electron."""
    key = new_job_key()
    return [
        encode_input(
            sleepy_electron,
            (index, 0.0),
            {},
            key=key,
            task=TaskRef(job_id, index),
            origin=ElectronOrigin("packed-inputs", index, "sleepy_electron"),
        )
        for index in range(count)
    ]


def pack(inputs: list[bytes]) -> bytes:
    """The envelopes as one object: ``len + 1`` big-endian offsets, then the envelopes."""
    offsets = [0]
    for data in inputs:
        offsets.append(offsets[-1] + len(data))
    return struct.pack(f">{len(offsets)}Q", *offsets) + b"".join(inputs)


async def per_electron(store: AsyncTaskStore, job_id: str, inputs: list[bytes]) -> float:
    """CPU seconds to upload one object per input, then clean the job's tasks up."""
    start = time.process_time()
    async with anyio.create_task_group() as tg:
        for index, data in enumerate(inputs):

            async def upload(index: int = index, data: bytes = data) -> None:
                async with store.input_slots:
                    await store.upload_input(TaskRef(job_id, index), data)

            tg.start_soon(upload)
    await store.delete_tasks(job_id)
    return time.process_time() - start


async def packed(store: AsyncTaskStore, job_id: str, inputs: list[bytes]) -> float:
    """CPU seconds to upload the inputs as one object, then delete it."""
    start = time.process_time()
    ref = TaskRef(job_id, 0)
    await store.upload_input(ref, pack(inputs))
    await store.delete_tasks(job_id)
    return time.process_time() - start


async def run(electrons: int, rounds: int) -> dict[str, Any]:
    """Alternate both ways ``rounds`` times; CPU milliseconds per electron of each round."""
    load_before = machine_load()
    results: dict[str, list[float]] = {"per-electron": [], "packed": []}
    with LocalCloud(preload=()) as cloud:
        client = make_storage_client(cloud.project_id, cloud.storage_endpoint)
        store = AsyncTaskStore(TaskStore(client, cloud.bucket_name, "packed-inputs"))
        for _ in range(rounds):
            for name, way in (("per-electron", per_electron), ("packed", packed)):
                job_id = f"packed-{uuid.uuid4().hex[:12]}"
                inputs = envelopes(job_id, electrons)
                seconds = await way(store, job_id, inputs)
                results[name].append(round(seconds * 1000 / electrons, 3))
    return {
        "kind": "packed_inputs",
        "electrons": electrons,
        "input_slots": INPUT_SLOTS,
        "cpu_ms_per_electron": results,
        "environment": environment(load_before),
    }


def main(argv: list[str] | None = None) -> None:
    """Run the comparison and print (and optionally write) its numbers."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--electrons", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="where to write the result")
    options = parser.parse_args(argv)
    result = anyio.run(run, options.electrons, options.rounds)
    for name, values in result["cpu_ms_per_electron"].items():
        print(f"{name:>14}: {', '.join(f'{v:.3f}' for v in values)} ms of CPU per electron")
    if options.json:
        options.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
