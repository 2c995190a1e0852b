"""The behaviours users feel, as electrons: one that raises, one preempted, a quota, a cancel.

Runs in this project's venv (our executor) and in the original plugin's (``.venv-seed``), so
only the standard library, anyio, cloudpickle and Covalent are imported here. Each case runs a
few electrons at once, each with a fresh executor as in Covalent's server, and records what
each electron's caller got (its value, or the exception's type, message, causes and whether the
electron's own traceback survived), the job handle the executor saved, and how many times the
electron's function started and finished (marker files the tasks write: the tasks are
processes on this machine). Covalent's side of the conversation is :class:`CovalentStandIn`.

The plugin's side of a case is ``python -m benchmarks.behaviour_cases`` (see :func:`main`);
:mod:`benchmarks.behaviours` runs ours in its own process and the rest of each case (the cloud,
the fault, the emulator's records).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import cloudpickle

__all__ = ["CASES", "USER_FRAME", "Case", "CovalentStandIn", "behaviour_electron", "run_case"]

# The tasks cannot import `benchmarks`: the electron goes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

#: The user's own frame in a raising electron's traceback: seen by the caller or not.
USER_FRAME = "_refuse_input"
#: The Unix socket in the markers folder on which electrons say that they started.
START_SOCKET = "started.sock"
#: Seconds a cancelled electron's task is still checked for after its natural end.
CANCEL_GRACE_SECONDS = 3.0


@dataclasses.dataclass(frozen=True)
class Case:
    """A few electrons at once, and what happens to one of them."""

    name: str  # file stem part and table row
    question: str  # what the table's row answers
    electrons: int  # electrons started at once
    task_seconds: float = 1.0  # how long each electron's function sleeps
    raises: int | None = None  # this electron's function raises ValueError
    preempted: bool = False  # attempt 0 of task 0 of the first job dies with exit 50001
    jobs_per_minute: int | None = None  # the cloud's job-creation quota
    cancel: int | None = None  # this electron is cancelled once its task runs
    cancelled_task_seconds: float = 15.0  # how long the cancelled electron would sleep
    timeout: float = 120.0  # the benchmark gives up on an electron after this (recorded)


CASES = {
    case.name: case
    for case in (
        Case("raises", "an electron that raises", electrons=3, raises=0),
        Case("preempted", "an electron preempted once (exit 50001)", electrons=3, preempted=True),
        Case(
            "quota",
            "30 electrons at once, 20 job creations a minute",
            electrons=30,
            task_seconds=0.0,
            jobs_per_minute=20,
            timeout=240.0,
        ),
        Case(
            "cancel", "a cancel of one electron of three", electrons=3, task_seconds=3.0, cancel=0
        ),
    )
}


def _refuse_input(index: int) -> None:
    raise ValueError(f"electron {index} refuses its input")


def behaviour_electron(index: int, seconds: float, fail: bool, markers: str) -> int:
    """The cases' electron: mark its start (and say so on the folder's socket, if there is
    one), raise or sleep ``seconds``, mark its end.

    :returns: ``index + 1``
    """
    import os
    import socket
    import time
    import uuid

    stem = os.path.join(markers, str(index))
    open(f"{stem}.started.{uuid.uuid4().hex}", "w").close()
    try:
        with socket.socket(socket.AF_UNIX) as started:
            started.connect(os.path.join(markers, START_SOCKET))
            started.sendall(f"{index}\n".encode())
    except OSError:
        pass  # nobody is listening: only the cancel case waits for a start
    if fail:
        _refuse_input(index)
    time.sleep(seconds)
    open(f"{stem}.finished.{uuid.uuid4().hex}", "w").close()
    return index + 1


def _marks(markers: Path, index: int, kind: str) -> list[Path]:
    return list(markers.glob(f"{index}.{kind}.*"))


class CovalentStandIn:
    """What Covalent's dispatcher answers one electron's executor (``executor_proxy.watch``):
    it keeps the job handle the executor saves, and says whether the electron was cancelled."""

    def __init__(self) -> None:
        self.job_handle: Any = None  # as Covalent stores it (JSON) and hands it to cancel()
        self.handle_saved = anyio.Event()
        self.cancel_requested = False  # what get_cancel_requested() answers

    async def serve(self, executor: Any) -> None:
        """Answer ``executor``'s requests until it says it is done."""
        from covalent.executor.utils import Signals

        while True:
            action, body = await executor._send_queue.get()
            if action == Signals.EXIT:
                return
            answer = None
            if (action, body) == (Signals.GET, "cancel_requested"):
                answer = self.cancel_requested
            elif action == Signals.PUT and body[0] == "job_handle":
                self.job_handle = json.loads(body[1])
                self.handle_saved.set()
            executor._recv_queue.put_nowait((True, answer))


def describe_error(error: BaseException) -> dict[str, Any]:
    """What a caller can learn from ``error``: type, message, the chain of causes, and
    whether the electron's own exception type and frame are in what it can print."""
    chain: list[str] = []
    seen: BaseException | None = error
    while seen is not None:
        chain.append(type(seen).__name__)
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    printed = "".join(traceback.format_exception(error))
    return {
        "error_type": type(error).__name__,
        "error_message": str(error)[-2000:],
        "error_chain": chain,
        "names_user_exception": "ValueError" in printed,
        "traceback_survives": USER_FRAME in printed,
    }


class _CaseRun:
    """One run of a case: its electrons, their stand-ins, and what each one saw."""

    def __init__(
        self, case: Case, make_executor: Callable[[], Any], markers: Path, dispatch_id: str
    ) -> None:
        self.case = case
        self.make_executor = make_executor  # a fresh executor, as Covalent makes one
        self.markers = markers  # where the tasks write their marker files
        self.dispatch_id = dispatch_id
        self.standins = [CovalentStandIn() for _ in range(case.electrons)]
        self.observed: list[dict[str, Any]] = [{} for _ in range(case.electrons)]
        self.cancelled: dict[str, Any] = {}  # what cancel() did, for the cancel case
        self.function_started = [anyio.Event() for _ in range(case.electrons)]
        self.started = time.monotonic()

    def metadata(self, index: int) -> dict[str, Any]:
        return {"dispatch_id": self.dispatch_id, "node_id": index}

    async def run(self) -> dict[str, Any]:
        async with contextlib.AsyncExitStack() as stack:
            listener = None
            if self.case.cancel is not None:
                listener = await anyio.create_unix_listener(self.markers / START_SOCKET)
                await stack.enter_async_context(listener)
            listening = await stack.enter_async_context(anyio.create_task_group())
            if listener is not None:
                listening.start_soon(listener.serve, self._note_start)
            async with anyio.create_task_group() as tg:
                for index in range(self.case.electrons):
                    tg.start_soon(self._electron, index)
                if self.case.cancel is not None:
                    tg.start_soon(self._cancel_once_running, self.case.cancel)
            listening.cancel_scope.cancel()
        if self.case.cancel is not None:
            await self._wait_natural_end(self.case.cancel)
        for index, seen in enumerate(self.observed):
            seen["job_handle"] = self.standins[index].job_handle
            seen["function_started"] = len(_marks(self.markers, index, "started"))
            seen["function_finished"] = len(_marks(self.markers, index, "finished"))
        return {"electrons": self.observed, "cancel": self.cancelled or None}

    async def _note_start(self, stream: anyio.abc.SocketStream) -> None:
        """An electron's function started: it sent its index."""
        async with stream:
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, ValueError):
                self.function_started[int((await stream.receive()).decode())].set()

    async def _electron(self, index: int) -> None:
        case, seen = self.case, self.observed[index]
        executor = self.make_executor()
        executor._init_runtime()
        seconds = case.cancelled_task_seconds if index == case.cancel else case.task_seconds
        args = [index, seconds, index == case.raises, str(self.markers)]
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.standins[index].serve, executor)
            try:
                with anyio.move_on_after(case.timeout) as scope:
                    value = await executor.run(behaviour_electron, args, {}, self.metadata(index))
                    seen |= {"outcome": "result", "value": value}
                if scope.cancelled_caught:
                    seen["outcome"] = (
                        f"no answer after {case.timeout:g} s (stopped by the benchmark)"
                    )
            except Exception as exc:
                seen |= {"outcome": "error", **describe_error(exc)}
            finally:
                tg.cancel_scope.cancel()
        seen["returned_after_s"] = round(time.monotonic() - self.started, 2)

    async def _cancel_once_running(self, index: int) -> None:
        """Cancel electron ``index`` as ``ct.cancel`` does, once its function runs: flag it
        (get_cancel_requested answers True), then call a fresh executor's ``cancel()`` with
        the job handle the electron's executor saved."""
        standin = self.standins[index]
        with anyio.move_on_after(self.case.timeout) as scope:
            await standin.handle_saved.wait()
            await self.function_started[index].wait()
        if scope.cancelled_caught:
            self.cancelled = {"skipped": "the electron's task never started"}
            return
        standin.cancel_requested = True
        self.cancelled["at_s"] = round(time.monotonic() - self.started, 2)
        try:
            returned = await self.make_executor().cancel(self.metadata(index), standin.job_handle)
            self.cancelled["returned"] = repr(returned)
        except Exception as exc:
            self.cancelled["raised"] = f"{type(exc).__name__}: {exc}"[:500]

    async def _wait_natural_end(self, index: int) -> None:
        """Wait until the cancelled electron's function would have finished, had its task not
        been stopped (its first start + its sleep + a grace), so its end marker tells."""
        starts = _marks(self.markers, index, "started")
        if not starts:
            return
        first = min(path.stat().st_mtime for path in starts)
        end = first + self.case.cancelled_task_seconds + CANCEL_GRACE_SECONDS
        await anyio.sleep(max(0.0, end - time.time()))


async def run_case(
    case: Case, make_executor: Callable[[], Any], markers: Path, dispatch_id: str
) -> dict[str, Any]:
    """Run ``case`` with executors from ``make_executor``; what every electron's caller saw.

    :param markers: an empty folder the tasks can write to
    :returns: ``{"electrons": [...], "cancel": {...} or None}``
    """
    return await _CaseRun(case, make_executor, markers, dispatch_id).run()


def main() -> None:
    """The original plugin's side of a case (run by its venv, from the clone's root)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--case", required=True, choices=sorted(CASES))
    parser.add_argument("--settings", required=True, help="GCPBatchExecutor keywords as JSON")
    parser.add_argument("--markers", required=True, type=Path)
    parser.add_argument("--dispatch-id", required=True)
    parser.add_argument("--out", required=True, type=Path)
    options = parser.parse_args()
    import covalent  # noqa: F401  (as the server does, before the plugin module)
    from covalent_gcpbatch_plugin.gcpbatch import GCPBatchExecutor

    settings = json.loads(options.settings)
    observed = anyio.run(
        run_case,
        CASES[options.case],
        lambda: GCPBatchExecutor(**settings),
        options.markers,
        options.dispatch_id,
    )
    options.out.write_text(json.dumps(observed))


if __name__ == "__main__":
    main()
