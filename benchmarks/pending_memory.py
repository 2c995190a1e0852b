"""Memory held per pending electron: ``python -m benchmarks.pending_memory --electrons 10000``.

N electrons start at once, each through a fresh executor (as Covalent runs them), against a
local cloud whose VMs never boot (``provisioning_delay`` of an hour): the measurement is taken
once every input is uploaded and every job created, so every electron waits for its outcome.
Then the electrons are cancelled, which deletes the jobs and the objects, and the cloud stops.

Two passes, each in a child process of its own so that neither disturbs the other:

- ``rss``: the growth of the resident set (``/proc/self/statm``) from before the first
  electron to all pending, without ``tracemalloc`` (whose own tables would count);
- ``trace``: a ``tracemalloc`` snapshot diff over the same span, each allocation put in the
  group of the innermost frame that belongs to a known group: ``ours``
  (``covalent_gcpbatch_array/``), ``covalent``, ``google clients``, ``anyio/asyncio``, else
  ``other`` (the benchmark's own calls, the standard library). The lines of ours that hold the
  most are listed.

Prints a table and writes JSON (``--out``) with :func:`benchmarks.harness.environment`.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import subprocess
import sys
import tracemalloc
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import anyio

from .harness import environment
from .measure import _rss_bytes, machine_load, sleepy_electron

__all__ = ["GROUPS", "group_of", "measure_pending", "run"]

#: How long the local cloud's VMs take to boot: longer than any run, so no task starts.
NEVER = 3600.0
#: Frames kept per allocation: enough to find our frame under anyio's and asyncio's.
TRACE_FRAMES = 8
#: Path markers of each group, in priority order: an allocation belongs to the first group
#: one of its frames is in (ours first: what our code asks anyio or a client for is ours).
GROUPS: dict[str, tuple[str, ...]] = {
    "ours": ("/covalent_gcpbatch_array/",),
    "covalent": ("/covalent/", "/covalent_dispatcher/"),
    "google clients": ("/google/", "/grpc/", "/proto/", "/urllib3/", "/requests/"),
    # This benchmark's electron, doing Covalent's part: the executor object, run()'s coroutine.
    "benchmark as covalent": ("/benchmarks/",),
    "anyio/asyncio": ("/anyio/", "/asyncio/", "/trio/", "/sniffio/"),
}
DEFAULT_OUT = Path(__file__).parent / "results" / "pending_memory.json"
_KB = 1024


def group_of(filenames: list[str]) -> tuple[str, int]:
    """The group of an allocation whose frames (innermost first) are ``filenames``, and the
    position of its innermost frame in that group (-1 for ``other``)."""
    for group, markers in GROUPS.items():
        for position, filename in enumerate(filenames):
            if any(marker in filename for marker in markers):
                return group, position
    return "other", -1


async def measure_pending(electrons: int, *, trace: bool) -> dict[str, Any]:
    """Start ``electrons`` on a local cloud, measure once all are pending, then cancel them."""
    import covalent  # noqa: F401  (before the plugin module, as the server imports them)

    from covalent_gcpbatch_array._core.runtime import _CURRENT, ExecutorRuntime
    from covalent_gcpbatch_array.gcpbatch_array import GCPBatchArrayExecutor
    from covalent_gcpbatch_array.local import LocalCloud

    async with LocalCloud(provisioning_delay=NEVER) as cloud:
        settings: dict[str, Any] = cloud.executor_config() | {
            "retries": 0,
            # On a loaded machine 1,000 uploads may take longer than a batch waits for them.
            "upload_timeout": 0.0,
            # The cloud's bucket goes with it: deleting 10,000 objects first would take minutes.
            "keep_objects": True,
        }
        dispatch_id = f"memory-{uuid.uuid4().hex[:8]}"

        async def electron(index: int) -> None:
            executor = GCPBatchArrayExecutor(**settings)  # a fresh one, as Covalent makes
            metadata = {"dispatch_id": dispatch_id, "node_id": index}
            await executor.run(sleepy_electron, [index, 0.0], {}, metadata)

        async def all_pending() -> int:
            """Wait until every electron's task is in a created job; return the jobs."""
            while True:
                service = _CURRENT.get()
                coalescer = None if service is None else service._coalescer
                if coalescer is not None:
                    stats = coalescer.statistics()
                    if stats.members_live == electrons:
                        created = (await anyio.to_thread.run_sync(cloud.stats))["jobs_created"]
                        if created == stats.launched_batches:
                            return int(created)
                # Polling the emulator's counter: nothing here can be waited on instead.
                await anyio.sleep(0.5)

        gc.collect()
        rss_before = _rss_bytes()
        if trace:
            tracemalloc.start(TRACE_FRAMES)
            before = tracemalloc.take_snapshot()
            traced_before = tracemalloc.get_traced_memory()[0]
        async with anyio.create_task_group() as tg:
            for index in range(electrons):
                tg.start_soon(electron, index)
            jobs = await all_pending()
            gc.collect()
            rss_pending = _rss_bytes()
            result: dict[str, Any] = {"electrons": electrons, "jobs_created": jobs}
            if trace:
                after = tracemalloc.take_snapshot()
                peak = tracemalloc.get_traced_memory()[1] - traced_before
                tracemalloc.stop()
                result |= _grouped(after.compare_to(before, "traceback"), electrons)
                # What the burst held at its height (inputs waiting for their upload, ...).
                result["traced_peak_kb_per_electron"] = round(peak / _KB / electrons, 3)
            else:
                result["rss_before_mb"] = round(rss_before / _KB / _KB, 1)
                result["rss_growth_mb"] = round((rss_pending - rss_before) / _KB / _KB, 1)
                result["rss_kb_per_electron"] = round(
                    (rss_pending - rss_before) / _KB / electrons, 2
                )
            tg.cancel_scope.cancel()  # run() cancels its member: its job is deleted
        await ExecutorRuntime.wait_idle()
    return result


def _grouped(diffs: list[tracemalloc.StatisticDiff], electrons: int) -> dict[str, Any]:
    """Bytes grown per group, and the lines of ours that grew most, per electron."""
    groups: Counter[str] = Counter()
    lines: Counter[str] = Counter()
    for diff in diffs:
        frames = list(reversed(diff.traceback))  # innermost first
        group, position = group_of([frame.filename for frame in frames])
        groups[group] += diff.size_diff
        if group == "ours":
            frame = frames[position]
            name = frame.filename.split("/covalent_gcpbatch_array/")[-1]
            lines[f"{name}:{frame.lineno}"] += diff.size_diff
    per_electron = {name: round(groups[name] / _KB / electrons, 3) for name in [*GROUPS, "other"]}
    return {
        "traced_kb_per_electron": per_electron,
        "traced_total_kb_per_electron": round(sum(groups.values()) / _KB / electrons, 3),
        "ours_top_lines_kb_per_electron": {
            line: round(size / _KB / electrons, 3) for line, size in lines.most_common(15)
        },
    }


def run(electrons: int, trace_electrons: int | None = None) -> dict[str, Any]:
    """Both passes, each in a child process; the merged result with its environment.

    :param trace_electrons: electrons of the ``trace`` pass (default: ``electrons``); tracing
        slows the executor down several times
    """
    load_before = machine_load()
    result: dict[str, Any] = {"kind": "pending_memory", "electrons": electrons}
    counts = {"rss": electrons, "trace": trace_electrons or electrons}
    for phase, count in counts.items():
        completed = subprocess.run(
            [
                *(sys.executable, "-m", "benchmarks.pending_memory"),
                *("--phase", phase, "--electrons", str(count)),
            ],
            capture_output=True,
            text=True,
            check=False,
            cwd=Path(__file__).parent.parent,
        )
        if completed.returncode:
            raise RuntimeError(f"the {phase} pass failed:\n{completed.stderr[-4000:]}")
        result[phase] = json.loads(completed.stdout.splitlines()[-1])
    result["command"] = f"python -m benchmarks.pending_memory --electrons {electrons}" + (
        f" --trace-electrons {trace_electrons}" if trace_electrons else ""
    )
    result["environment"] = environment(load_before)
    return result


def table(result: dict[str, Any]) -> str:
    """The result as a plain-text table."""
    rss, trace = result["rss"], result["trace"]
    rows = [
        f"{result['electrons']} electrons pending in {rss['jobs_created']} jobs "
        f"(traced: {trace['electrons']} in {trace['jobs_created']})",
        f"RSS growth: {rss['rss_growth_mb']} MB ({rss['rss_kb_per_electron']} KB per electron, "
        f"from {rss['rss_before_mb']} MB)",
        "traced KB per electron:",
        *(f"  {name:<16}{kb:>8.2f}" for name, kb in trace["traced_kb_per_electron"].items()),
        f"  {'total':<16}{trace['traced_total_kb_per_electron']:>8.2f}"
        f" (at the burst's peak: {trace['traced_peak_kb_per_electron']:.2f})",
        "ours, by line (KB per electron):",
        *(
            f"  {line:<44}{kb:>8.3f}"
            for line, kb in trace["ours_top_lines_kb_per_electron"].items()
        ),
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    """Measure, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--electrons", type=int, default=10_000)
    parser.add_argument("--trace-electrons", type=int, help="for the tracemalloc pass")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON")
    parser.add_argument("--phase", choices=("rss", "trace"), help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.phase:  # a child pass: its result on stdout
        trace = options.phase == "trace"
        measured = anyio.run(functools.partial(measure_pending, options.electrons, trace=trace))
        print(json.dumps(measured))
        return
    result = run(options.electrons, options.trace_electrons)
    print(table(result))
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written to {options.out}")


if __name__ == "__main__":
    main()
