"""The Covalent row: a fan-out dispatched through a real Covalent server, in one mode.

The electrons reach the executor the way they do in production: Covalent's dispatcher starts
them one by one (about 2 a second, FACTS.md), each with a fresh executor made from the server's
``[executors.gcpbatch_array]`` config, all inside the server's one event loop. So the trickle
here is Covalent's own, not a simulated one.

The executor runs inside the server's process, with Covalent's dispatcher: the CPU time and
memory measured are the server's (Covalent and the executor together), read with psutil.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import toml

from .harness import Mode, RunSpec, cloud_counts, count_objects, environment
from .measure import machine_load, sleepy_electron
from .original_plugin.run import cloud_options, plugin_env, plugin_settings
from .original_plugin.venv import ensure_seed_venv

__all__ = ["run_covalent_fanout"]

#: The server's memory is sampled this often.
MEMORY_SAMPLE_SECONDS = 0.25
#: After the result, the executor still cleans up inside the server; counters are read once
#: they have stopped changing over this many seconds.
SETTLE_SECONDS = 3.0
_MB = 1024 * 1024


def _make_workflow(ct: Any, executor: str) -> Any:
    bench_electron = ct.electron(sleepy_electron, executor=executor)

    @ct.lattice
    def fan_out(count: int, sleep_seconds: float) -> list[int]:
        return [bench_electron(index, sleep_seconds) for index in range(count)]

    return fan_out


def _as_utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


class _ServerMemory:
    """Samples the server process's resident memory in a thread, until stopped."""

    def __init__(self, process: Any) -> None:
        self.process = process  # psutil.Process of the server
        self.peak = 0  # bytes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="server-memory", daemon=True)

    def __enter__(self) -> _ServerMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(MEMORY_SAMPLE_SECONDS)


def _settled_stats(cloud: Any) -> dict[str, Any]:
    """The emulator's counters once the executor's clean-up inside the server is over."""
    stats = cloud.stats()
    while True:
        time.sleep(SETTLE_SECONDS)  # a quiet period is what "settled" means here
        again = cloud.stats()
        if again == stats:
            return dict(again)
        stats = again


def run_covalent_fanout(spec: RunSpec) -> dict[str, Any]:
    """Start a local cloud and a private Covalent server, dispatch the fan-out, measure it."""
    import cloudpickle
    import psutil

    from covalent_gcpbatch_array.cli.covalent_server import CovalentServer
    from covalent_gcpbatch_array.local import LocalCloud

    from .storage_log import StorageLog, logging_every_request

    load_before = machine_load()
    with contextlib.ExitStack() as stack:
        # `==`, not `is`: run as `python -m benchmarks.harness`, that module is loaded twice.
        venv = ensure_seed_venv() if spec.mode == Mode.ORIGINAL else None
        with logging_every_request():
            cloud = LocalCloud(
                provisioning_delay=spec.provisioning_delay,
                max_running_tasks=spec.max_running_tasks,
                jobs_per_minute=spec.jobs_per_minute,
                **(cloud_options(venv) if venv else {}),
            )
            stack.callback(cloud.stop)
            cloud.start()
        if venv is None:
            executor, settings = (
                "gcpbatch_array",
                cloud.executor_config() | spec.executor_settings(),
            )
            server = CovalentServer(executor_config=settings)
        else:
            # The plugin's own server: its venv's covalent, its config section, the shim's
            # variables; a HOME made here, as the config must be in it before the start.
            home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cga-seed-")))
            executor = "gcpbatch"
            settings = plugin_settings(cloud, spec.poll_freq, str(home / "cache"))
            config = home / ".config" / "covalent" / "covalent.conf"
            config.parent.mkdir(parents=True)
            config.write_text(toml.dumps({"executors": {executor: settings}}))
            server = CovalentServer(home=home, python=venv.python, environment=plugin_env(cloud))
        stack.callback(server.stop)
        server.start()
        # Our covalent client reads the private server's config, never the user's.
        os.environ["COVALENT_CONFIG_DIR"] = str(server.config_file.parent)
        import covalent as ct

        # The tasks cannot import `benchmarks`: Covalent pickles the electron by value.
        for module in ("benchmarks.harness", "benchmarks.measure", __name__):
            cloudpickle.register_pickle_by_value(sys.modules[module])
        workflow = _make_workflow(ct, executor)
        storage_log = StorageLog.of(cloud.workdir)
        process = psutil.Process(server.pid)
        rss_before = process.memory_info().rss
        cpu_before = sum(process.cpu_times()[:2])
        with _ServerMemory(process) as memory:
            dispatched_at = datetime.now(timezone.utc)
            started = time.monotonic()
            dispatch_id = ct.dispatch(workflow, dispatcher_addr=server.address)(
                spec.electrons, spec.task_seconds
            )
            result = server.result(dispatch_id)
            workflow_seconds = time.monotonic() - started
            cpu_at_result = sum(process.cpu_times()[:2]) - cpu_before
            stats = _settled_stats(cloud)
            cpu_total = sum(process.cpu_times()[:2]) - cpu_before
        storage = storage_log.operations()
        objects_left = count_objects(cloud)
        nodes = [
            result.get_node_result(node_id)
            for node_id in result.lattice.transport_graph.get_internal_graph_copy().nodes
        ]
        electrons = [node for node in nodes if node["node_name"] == "sleepy_electron"]
        starts = [
            (_as_utc(n["start_time"]) - dispatched_at).total_seconds()
            for n in electrons
            if n["start_time"]
        ]
        ends = [
            (_as_utc(n["end_time"]) - dispatched_at).total_seconds()
            for n in electrons
            if n["end_time"]
        ]
        failed = [n for n in electrons if str(n["status"]) != "COMPLETED"]
        status = str(result.status)

    return {
        "kind": "fanout",
        "spec": spec.to_json(),
        "executor_settings": settings,
        "objects_left": objects_left,
        "environment": environment(load_before),
        "electrons": spec.electrons,
        "workflow_status": status,
        "succeeded": spec.electrons - len(failed),
        "failed": len(failed),
        "errors_sample": [str(n["error"])[:500] for n in failed[:5]],
        **cloud_counts(stats, storage),
        "arrival_span_s": round(max(starts) - min(starts), 3) if starts else None,
        "time_to_first_result_s": round(min(ends), 3) if ends else None,
        "time_to_last_result_s": round(max(ends), 3) if ends else None,
        "workflow_s": round(workflow_seconds, 3),
        "completion_quantiles_s": {},
        # Covalent's own trickle replaces the simulated one: the target uses its real span.
        "target_s": round(
            (max(starts) - min(starts) if starts else math.nan)
            + spec.batch_window
            + spec.provisioning_delay
            + spec.task_seconds
            + spec.poll_freq,
            3,
        ),
        "cpu_s_to_last_result": round(cpu_at_result, 3),
        "cpu_s_total": round(cpu_total, 3),
        "cpu_ms_per_electron": round(1000 * cpu_total / spec.electrons, 3),
        "cpu_counts": "the Covalent server process: dispatcher and executor together",
        "rss_before_mb": round(rss_before / _MB, 1),
        "rss_peak_mb": round(memory.peak / _MB, 1),
        "rss_peak_delta_mb": round((memory.peak - rss_before) / _MB, 1),
        "rss_all_pending_mb": None,
        "pending_at_peak": None,
        "tracemalloc_peak_mb": None,
    }
