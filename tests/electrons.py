"""Fan-outs of electrons whose every outcome is checked, for the reliability, property,
bad-input, load and security tests (a helper module, not a test module).

Each electron runs :func:`work` on a :class:`Spec`: its index, a token unique to the fan-out,
and a behaviour (return, raise, crash, exit without writing, ...). Its value names its own
input (``"{token}:{index}:{index**2}"``), so a result that is swapped, duplicated or left over
from another fan-out cannot pass for the right one. :func:`fan_out` runs the electrons
concurrently, each through a fresh executor as Covalent does, and records for each how many
times its ``run()`` ended and how.
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import cloudpickle
import covalent  # noqa: F401  (the Covalent server imports covalent before the plugin)
from covalent._shared_files.exceptions import TaskCancelledError, TaskRuntimeError

from covalent_gcpbatch_array._core.compat import give_task_streams
from covalent_gcpbatch_array.exceptions import TaskInfrastructureError
from covalent_gcpbatch_array.gcpbatch_array import GCPBatchArrayExecutor
from covalent_gcpbatch_array.local import LocalCloud

# The tasks cannot import this module: its functions and classes travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

#: Quick polls and a short window; no retries unless a test asks for them.
FAST: dict[str, Any] = {"poll_freq": 0.2, "batch_window": 0.5, "batch_idle_gap": 0.0, "retries": 0}


@dataclass(frozen=True)
class Spec:
    """What one electron does; it is also the electron's whole input."""

    index: int  # the electron's node id in the fan-out
    token: str  # unique to the fan-out
    behaviour: str = "ok"  # see work()
    param: Any = 0  # the behaviour's parameter (seconds, attempts, a path, ...)


def new_token() -> str:
    return secrets.token_hex(4)


def expected_value(spec: Spec) -> str:
    """The value a successful electron returns: it names its own input."""
    return f"{spec.token}:{spec.index}:{spec.index**2}"


def user_error_message(spec: Spec) -> str:
    return f"electron {spec.index} of {spec.token} failed on purpose"


def work(spec: Spec) -> Any:
    """The electron. Behaviours:

    - ``ok``: return :func:`expected_value`;
    - ``raise``: raise ``ValueError(user_error_message)``;
    - ``exit_silently``: end the process with code 0 without writing anything;
    - ``crash_until``: end the process with code 17 while the attempt is below ``param``;
    - ``sleep``: sleep ``param`` seconds, then return;
    - ``wait_file``: wait (up to 5 minutes) until the file ``param`` exists, then return;
    - ``report_attempt``: return the value with ``@{attempt}`` appended;
    - ``echo``: return ``param`` itself (large values, hostile values).
    """
    attempt = int(os.environ.get("BATCH_TASK_RETRY_ATTEMPT", "0"))
    print(f"electron {spec.index} attempt {attempt}: {spec.behaviour}")
    if spec.behaviour == "raise":
        raise ValueError(user_error_message(spec))
    if spec.behaviour == "exit_silently":
        os._exit(0)
    if spec.behaviour == "crash_until" and attempt < spec.param:
        os._exit(17)
    if spec.behaviour == "sleep":
        time.sleep(spec.param)
    if spec.behaviour == "wait_file":
        deadline = time.monotonic() + 300
        while not os.path.exists(spec.param) and time.monotonic() < deadline:
            time.sleep(0.05)
    if spec.behaviour == "report_attempt":
        return f"{expected_value(spec)}@{attempt}"
    if spec.behaviour == "echo":
        return spec.param
    return expected_value(spec)


class RecordingExecutor(GCPBatchArrayExecutor):
    """The executor, recording the job handle ``run()`` gives Covalent's runtime."""

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self.handle: dict[str, Any] | None = None
        self.handle_set = anyio.Event()

    async def _set_job_handle(self, handle: dict[str, Any]) -> None:
        # Covalent's runtime would store it in its database; cancel() gets it back from there.
        self.handle = handle
        self.handle_set.set()


@dataclass
class Outcome:
    """How one electron's ``run()`` ended."""

    spec: Spec  # its input
    ends: int = 0  # how many times run() returned or raised: must be exactly 1
    value: Any = None  # what run() returned
    error: BaseException | None = None  # what run() raised
    handle: dict[str, Any] | None = None  # its (job_id, task_index)
    stdout: str = ""  # what the executor printed to the electron's task_stdout
    stderr: str = ""  # ... and task_stderr

    @property
    def cause(self) -> BaseException | None:
        return None if self.error is None else self.error.__cause__

    def describe(self) -> str:
        return f"electron {self.spec.index} ({self.spec.behaviour}, handle {self.handle})"


@dataclass
class FanOut:
    """A fan-out's outcomes, by electron index."""

    outcomes: dict[int, Outcome] = field(default_factory=dict)

    def __getitem__(self, index: int) -> Outcome:
        return self.outcomes[index]

    def __iter__(self) -> Any:
        return iter(self.outcomes.values())

    def by_task(self) -> dict[tuple[str, int], Outcome]:
        """Outcomes by (job id, task index)."""
        return {(str(o.handle["job_id"]), int(o.handle["task_index"])): o for o in self if o.handle}


def executor_for(cloud: LocalCloud, **overrides: Any) -> RecordingExecutor:
    return RecordingExecutor(**(cloud.executor_config() | FAST | overrides))


async def fan_out(
    cloud: LocalCloud,
    specs: Sequence[Spec],
    *,
    deadline: float = 180.0,
    arrivals: Mapping[int, float] | None = None,
    cancel_after: Mapping[int, float] | None = None,
    dispatch_id: str = "",
    fn: Callable[..., Any] = work,
    while_running: Callable[[dict[int, tuple[str, int]]], Awaitable[None]] | None = None,
    **overrides: Any,
) -> FanOut:
    """Run every spec as an electron, concurrently; wait until every ``run()`` has ended.

    :param deadline: seconds the whole fan-out may take before the test fails (a hang)
    :param arrivals: index -> seconds after the start at which that electron arrives
    :param cancel_after: index -> seconds after its job handle is known at which that
        electron is cancelled through ``executor.cancel()``, as Covalent does
    :param while_running: called with every electron's ``(job_id, task_index)`` once all
        are known (while the electrons run), e.g. to play an attacker with bucket access
    :param overrides: executor settings over the cloud's and :data:`FAST`
    """
    result = FanOut({spec.index: Outcome(spec) for spec in specs})
    handles: dict[int, tuple[str, int]] = {}
    ended: set[int] = set()
    all_known = anyio.Event()  # every electron has its handle, or ended without one

    def check_all_known() -> None:
        if len(set(handles) | ended) == len(specs):
            all_known.set()

    dispatch_id = dispatch_id or f"dispatch-{specs[0].token if specs else 'empty'}"

    async def one(spec: Spec) -> None:
        outcome = result[spec.index]
        await anyio.sleep((arrivals or {}).get(spec.index, 0.0))
        ex = executor_for(cloud, **overrides)
        give_task_streams(ex)
        metadata = {"dispatch_id": dispatch_id, "node_id": spec.index}
        async with anyio.create_task_group() as tg:
            if while_running is not None:
                tg.start_soon(note_handle, ex, spec.index)
            if cancel_after and spec.index in cancel_after:
                tg.start_soon(cancel_later, ex, metadata, cancel_after[spec.index])
            try:
                outcome.value = await ex.run(fn, [spec], {}, metadata)
            except Exception as exc:
                outcome.error = exc
            outcome.ends += 1
            ended.add(spec.index)
            check_all_known()
            outcome.handle = ex.handle
            outcome.stdout = ex.task_stdout.getvalue()
            outcome.stderr = ex.task_stderr.getvalue()
            tg.cancel_scope.cancel()

    async def note_handle(ex: RecordingExecutor, index: int) -> None:
        await ex.handle_set.wait()
        assert ex.handle is not None
        handles[index] = (str(ex.handle["job_id"]), int(ex.handle["task_index"]))
        check_all_known()

    async def call_while_running() -> None:
        assert while_running is not None
        await all_known.wait()
        await while_running(dict(handles))

    async def cancel_later(ex: RecordingExecutor, metadata: dict[str, Any], delay: float) -> None:
        await ex.handle_set.wait()
        await anyio.sleep(delay)
        assert await ex.cancel(metadata, ex.handle) is True

    with anyio.fail_after(deadline):
        async with anyio.create_task_group() as tg:
            if while_running is not None:
                tg.start_soon(call_while_running)
            for spec in specs:
                tg.start_soon(one, spec)
    return result


# -- checks ---------------------------------------------------------------------------------


def check_exactly_one_outcome(fan: FanOut) -> None:
    for outcome in fan:
        assert outcome.ends == 1, f"{outcome.describe()} ended {outcome.ends} times"
    handles = [(o.handle["job_id"], o.handle["task_index"]) for o in fan if o.handle]
    assert len(handles) == len(set(handles)), "two electrons were given the same task"


def check_value(outcome: Outcome, expected: Any = None) -> None:
    want = expected_value(outcome.spec) if expected is None else expected
    assert outcome.error is None, (
        f"{outcome.describe()} raised {outcome.error!r}: {outcome.cause!r}"
    )
    assert outcome.value == want, f"{outcome.describe()} returned {outcome.value!r}, not {want!r}"


def check_user_error(outcome: Outcome) -> None:
    assert isinstance(outcome.error, TaskRuntimeError), f"{outcome.describe()}: {outcome.error!r}"
    cause = outcome.cause
    assert type(cause) is ValueError, f"{outcome.describe()}: cause {cause!r}"
    assert str(cause) == user_error_message(outcome.spec)
    assert "failed on purpose" in outcome.stderr  # the remote traceback went to task_stderr


def check_infrastructure_error(outcome: Outcome, *fragments: str) -> TaskInfrastructureError:
    assert isinstance(outcome.error, TaskRuntimeError), f"{outcome.describe()}: {outcome.error!r}"
    cause = outcome.cause
    assert isinstance(cause, TaskInfrastructureError), f"{outcome.describe()}: cause {cause!r}"
    for fragment in fragments:
        assert fragment in str(cause), f"{fragment!r} not in {cause}"
    return cause


def check_cancelled(outcome: Outcome) -> None:
    assert isinstance(outcome.error, TaskCancelledError), f"{outcome.describe()}: {outcome.error!r}"


class Delta:
    """Changes in the Batch emulator's counters (and the GCS proxy's, if any) over a block."""

    def __init__(self, cloud: LocalCloud) -> None:
        self.cloud = cloud
        self.before = cloud.stats()
        self.storage_before = cloud.storage_stats() if cloud.gcs_faults else None

    def __getitem__(self, name: str) -> int:
        after = self.cloud.stats()
        if name in after["api_calls"]:
            return int(after["api_calls"][name] - self.before["api_calls"][name])
        return int(after[name] - self.before[name])

    def storage(self, name: str) -> int:
        assert self.storage_before is not None, "the cloud has no GCS fault proxy"
        return int(self.cloud.storage_stats()[name] - self.storage_before[name])
