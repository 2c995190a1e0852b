"""Graph-aware coalescing through a real Covalent server: job counts, idle and under load.

Covalent's dispatcher starts electrons one at a time, slower on a loaded machine; the timers
alone then split a wave into several jobs. Reading the dispatch's graph, the executor knows the
whole wave and makes one job per wave. These tests assert job counts, never times.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import cloudpickle
import covalent as ct
import pytest

from covalent_gcpbatch_array.cli.covalent_server import CovalentServer
from covalent_gcpbatch_array.local import LocalCloud
from tests.test_covalent_e2e import Delta, dispatch, explicit_executor, wait_result

pytestmark = pytest.mark.slow

cloudpickle.register_pickle_by_value(sys.modules[__name__])

BUSY = "while True: pass"


def load() -> int:
    return 1


def train(data: int, i: int) -> int:
    time.sleep(3.0 * (i % 2))  # the wave's tasks end in two bursts, 3 s apart
    return data + i


def score(data: int, model: int) -> int:
    return data * model


def three_waves(executor: Any, width: int) -> Any:
    """load -> ``width`` train -> ``width`` score, all of one shape."""
    load_e = ct.electron(load, executor=executor)
    train_e = ct.electron(train, executor=executor)
    score_e = ct.electron(score, executor=executor)

    @ct.lattice(executor="local", workflow_executor="local")
    def workflow(n: int) -> list[int]:
        data = load_e()
        return [score_e(data, train_e(data, i)) for i in range(n)]

    return workflow


@pytest.fixture(params=["idle", "loaded"])
def machine(request: pytest.FixtureRequest) -> Iterator[str]:
    """The machine as it is, or with two busy processes beside the server."""
    busy = []
    if request.param == "loaded":
        busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(2)]
    try:
        yield request.param
    finally:
        for process in busy:
            process.kill()
            process.wait()


def test_three_waves_make_exactly_three_jobs(
    covalent_server: CovalentServer, local_cloud: LocalCloud, machine: str
) -> None:
    # A generous cap, and an idle gap shorter than the dispatcher's spacing under load: the
    # timers alone (graph_aware=false) made 4 jobs idle and 21 loaded in a trial.
    executor = explicit_executor(local_cloud, batch_window=120.0, batch_idle_gap=0.3)
    delta = Delta(local_cloud)
    result = wait_result(covalent_server, dispatch(covalent_server, three_waves(executor, 12), 12))
    assert str(result.status) == "COMPLETED", result.error
    assert result.result == [1 * (1 + i) for i in range(12)]
    assert delta["jobs_created"] == 3, f"{machine} machine"


def test_a_small_fan_out_flushes_once_its_last_electron_joined(
    covalent_server: CovalentServer, local_cloud: LocalCloud
) -> None:
    # With no idle gap and a 600 s window, only a complete wave flushes before the test's
    # dispatch timeout (240 s).
    executor = explicit_executor(local_cloud, batch_window=600.0, batch_idle_gap=0.0)
    electron = ct.electron(score, executor=executor)

    @ct.lattice(executor="local", workflow_executor="local")
    def fan_out(n: int) -> list[int]:
        return [electron(2, i) for i in range(n)]

    delta = Delta(local_cloud)
    result = wait_result(covalent_server, dispatch(covalent_server, fan_out, 10))
    assert str(result.status) == "COMPLETED", result.error
    assert result.result == [2 * i for i in range(10)]
    assert delta["jobs_created"] == 1
