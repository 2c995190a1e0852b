"""Property: for any fan-out, every electron ends with exactly one outcome, and the right one.

Hypothesis draws fan-outs (size, job shapes, arrival times, batching policy, retries), each
electron's behaviour (return, raise, crash for some attempts, exit without writing, sleep),
faults (Batch API 429/503, Cloud Storage errors and dropped connections, preemptions) and
cancellations, then runs them on the local cloud through the real clients. The expected
outcome of an electron depends only on its own input and the retries, never on which task
index or job it lands in: faults are drawn so that they cannot change it (preemptions only
with retries to spare), and a cancelled electron may end cancelled or, if its task won the
race, with its normal outcome, but with exactly one of them.

``CGA_PROPERTY_EXAMPLES`` sets how many fan-outs are drawn (default 8; each takes seconds).
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import cloudpickle
import pytest
from covalent._shared_files.exceptions import TaskCancelledError
from electrons import (
    Outcome,
    Spec,
    check_exactly_one_outcome,
    check_infrastructure_error,
    check_user_error,
    check_value,
    fan_out,
    new_token,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from covalent_gcpbatch_array._core.runtime import ExecutorRuntime
from covalent_gcpbatch_array.local import LocalCloud

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings(
        "ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning"
    ),
]

cloudpickle.register_pickle_by_value(sys.modules[__name__])

EXAMPLES = int(os.environ.get("CGA_PROPERTY_EXAMPLES", "8"))


@pytest.fixture(scope="module")
def cloud() -> Iterator[LocalCloud]:
    with LocalCloud(gcs_faults=True) as local_cloud:
        yield local_cloud


@dataclass(frozen=True)
class Electron:
    """One drawn electron."""

    behaviour: str  # ok, raise, exit_silently, crash_until, sleep
    param: Any  # attempts to crash, or seconds to sleep
    memory: int  # picks its job shape
    arrival: float  # seconds after the fan-out starts
    cancel_after: float | None  # seconds after its job handle is known, or never


@dataclass(frozen=True)
class Scenario:
    """One drawn fan-out."""

    electrons: tuple[Electron, ...]
    retries: int
    batch_window: float
    max_tasks_per_job: int
    api_faults: tuple[tuple[str, int, int], ...]  # (method, status, count)
    storage_faults: tuple[tuple[str, str, bool], ...]  # (method, object, drop)
    preempt: tuple[int, ...]  # task indices of the next job preempted on attempt 0


behaviours = st.one_of(
    st.just(("ok", 0)),
    st.just(("ok", 0)),
    st.just(("raise", 0)),
    st.just(("exit_silently", 0)),
    st.tuples(st.just("crash_until"), st.integers(1, 2)),
    st.tuples(st.just("sleep"), st.sampled_from([0.5, 1.5])),
)
electrons = st.builds(
    lambda behaviour, memory, arrival, cancel: Electron(*behaviour, memory, arrival, cancel),
    behaviours,
    st.sampled_from([256, 256, 512]),
    st.sampled_from([0.0, 0.0, 0.2, 0.7, 1.5]),
    st.one_of(st.none(), st.none(), st.none(), st.sampled_from([0.0, 0.5, 1.5])),
)


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    fan = tuple(draw(st.lists(electrons, min_size=1, max_size=10)))
    retries = draw(st.integers(0, 3))
    api_faults = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["CreateJob", "GetJob", "ListTasks"]),
                st.sampled_from([429, 500, 503]),
                st.integers(1, 2),
            ),
            max_size=3,
        )
    )
    storage_faults = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["GET", "POST"]),
                st.sampled_from(["input.pkl", "result.pkl", "error.pkl", "manifest.json"]),
                st.booleans(),
            ),
            max_size=4,
        )
    )
    # A preemption must not change any outcome: only with a retry to spare for every task.
    worst = max([e.param for e in fan if e.behaviour == "crash_until"] + [1])
    cancels = any(e.cancel_after is not None for e in fan)
    preempt: tuple[int, ...] = ()
    if retries >= worst and not cancels:
        preempt = tuple(draw(st.sets(st.integers(0, len(fan) - 1), max_size=3)))
    return Scenario(
        electrons=fan,
        retries=retries,
        batch_window=draw(st.sampled_from([0.0, 0.3, 1.0])),
        max_tasks_per_job=draw(st.sampled_from([1, 3, 100])),
        api_faults=tuple(api_faults),
        storage_faults=tuple(storage_faults),
        preempt=preempt,
    )


def check_expected(outcome: Outcome, electron: Electron, retries: int) -> None:
    """The one right outcome of an electron, given only its input and the retries."""
    if electron.behaviour == "raise":
        check_user_error(outcome)
    elif electron.behaviour == "exit_silently":
        check_infrastructure_error(outcome, "exited with code 0 without writing")
    elif electron.behaviour == "crash_until" and electron.param > retries:
        check_infrastructure_error(outcome, "exited with code 17")
    else:
        check_value(outcome)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(scenario=scenarios())
@pytest.mark.anyio
async def test_every_electron_ends_once_with_the_right_outcome(
    cloud: LocalCloud, scenario: Scenario
) -> None:
    for method, status, count in scenario.api_faults:
        cloud.fail_calls(method, status, count)
    for method, name, drop in scenario.storage_faults:
        cloud.fail_storage(method, 503, 1, drop=drop, path=name)
    for index in scenario.preempt:
        cloud.fail_task(index=index, attempt=0, exit_code=50001)
    token = new_token()
    specs = [Spec(i, token, e.behaviour, e.param) for i, e in enumerate(scenario.electrons)]
    arrivals = {i: e.arrival for i, e in enumerate(scenario.electrons)}
    cancels = {
        i: e.cancel_after for i, e in enumerate(scenario.electrons) if e.cancel_after is not None
    }
    # Two shapes: electrons of each memory size share jobs only with their own kind.
    by_memory: dict[int, list[Spec]] = {}
    for spec, electron in zip(specs, scenario.electrons, strict=True):
        by_memory.setdefault(electron.memory, []).append(spec)

    import anyio

    results: dict[int, Outcome] = {}

    async def run_shape(memory: int, members: list[Spec]) -> None:
        fan = await fan_out(
            cloud,
            members,
            arrivals={s.index: arrivals[s.index] for s in members},
            cancel_after={s.index: cancels[s.index] for s in members if s.index in cancels},
            memory=memory,
            retries=scenario.retries,
            batch_window=scenario.batch_window,
            batch_idle_gap=0.2,
            max_tasks_per_job=scenario.max_tasks_per_job,
            dispatch_id=f"property-{token}",
            deadline=300,
        )
        check_exactly_one_outcome(fan)
        results.update(fan.outcomes)

    async with anyio.create_task_group() as tg:
        for memory, members in by_memory.items():
            tg.start_soon(run_shape, memory, members)
    # The jobs' clean-up (its retries draw jitter from `random`) ends before the next draw.
    await ExecutorRuntime.wait_idle()
    cloud.clear_storage_faults()  # those whose object no electron of this draw touched

    assert sorted(results) == list(range(len(specs)))
    handles = [(o.handle["job_id"], o.handle["task_index"]) for o in results.values() if o.handle]
    assert len(handles) == len(set(handles)), "two electrons shared a task"
    for index, outcome in results.items():
        electron = scenario.electrons[index]
        if electron.cancel_after is not None and isinstance(outcome.error, TaskCancelledError):
            continue  # cancelled in time; otherwise its task won the race: check that outcome
        check_expected(outcome, electron, scenario.retries)
    gc.collect()
