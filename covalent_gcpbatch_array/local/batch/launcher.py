"""Starting task processes for the Batch emulator, fast: the local stand-in for a VM's image.

:class:`TaskLauncher` maps a container runnable to a local command line (:meth:`container_argv`)
and starts task processes (:meth:`~TaskLauncher.start`). Every task is started by a pre-warmed
fork server (:mod:`covalent_gcpbatch_array.local.batch.fork_server`) that imported covalent,
cloudpickle and google-cloud-storage once: a ``[sys.executable, "-m", MODULE, ...]`` task runs in
a child forked from it and skips those imports (1 to 5 s), any other command line is exec'd
from a forked child. Either way the task leads its own process group, and the fork server owns
every task: when the launcher's process dies, even by SIGKILL, the server kills them all.

Everything here is async and never blocks the event loop; the launcher lives in the emulator's
loop. Enter it in the thread that runs that loop: Linux sends the parent-death signal when the
thread that started the fork server ends, not the process. ::

    async with TaskLauncher() as launcher:
        argv = launcher.container_argv(image_uri, entrypoint="", commands=[])
        task = await launcher.start(argv, env=env, stdout=out_path, stderr=err_path)
        exit_code = await task.wait()
"""

from __future__ import annotations

import contextlib
import enum
import fnmatch
import itertools
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import Process, TaskGroup, UNIXSocketStream
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

__all__ = [
    "DEFAULT_IMAGE_MAP",
    "DEFAULT_PRELOAD",
    "RUNNER_MODULE",
    "TaskLauncher",
    "TaskProcess",
    "TaskStartError",
    "UnknownImageError",
]

# The task side of the project: the ENTRYPOINT of its runner image.
RUNNER_MODULE = "covalent_gcpbatch_array.runner"

# Modules the fork server imports once, so tasks start without importing them.
DEFAULT_PRELOAD: tuple[str, ...] = (
    "covalent",
    "cloudpickle",
    "google.cloud.storage",
    RUNNER_MODULE,
)

# Any image runs the project's runner with the current Python, as the runner image would.
DEFAULT_IMAGE_MAP: Mapping[str, Sequence[str]] = {"*": (sys.executable, "-m", RUNNER_MODULE)}

# An entrypoint naming the image's Python means the local one.
_PYTHON_NAME = re.compile(r"^python(3(\.\d+)?)?$")
_SHUTDOWN_TIMEOUT = 10.0  # seconds the fork server gets to kill its tasks before it is killed
_KILLED = 128 + signal.SIGKILL  # what a task reports when it died with the server


class UnknownImageError(ValueError):
    """A container runnable names an image the launcher has no local command line for."""

    def __init__(self, image_uri: str, known: Sequence[str]) -> None:
        self.image_uri = image_uri
        patterns = ", ".join(repr(k) for k in known) or "none"
        super().__init__(
            f"no local command line for container image {image_uri!r} (image map patterns: "
            f"{patterns}); map it with TaskLauncher(image_map={{{image_uri!r}: "
            f"[sys.executable, '-m', 'your.module']}}), or with the emulator's --image-map JSON"
        )


class TaskStartError(RuntimeError):
    """A task could not be started: bad output path, or the launcher is not running."""


class _State(enum.Enum):
    NEW = "new"  # constructed, fork server not started
    RUNNING = "running"  # fork server up (maybe still preloading): tasks can be started
    CLOSING = "closing"  # __aexit__ began: no new task
    BROKEN = "broken"  # the fork server died on its own: no new task
    CLOSED = "closed"  # __aexit__ finished


class TaskProcess:
    """One running task; made by :meth:`TaskLauncher.start`."""

    def __init__(self, pid: int, launcher: TaskLauncher) -> None:
        self.pid = pid  # the task's pid, also its process group and session id
        self._launcher = launcher
        self._exited = anyio.Event()
        self._returncode: int | None = None
        self._kill_requested = False

    @property
    def returncode(self) -> int | None:
        """The exit code once the task has ended, else None."""
        return self._returncode

    async def wait(self) -> int:
        """Wait for the task to end; return its exit code (128 + N if signal N killed it)."""
        await self._exited.wait()
        assert self._returncode is not None
        return self._returncode

    def kill(self) -> None:
        """SIGKILL the task's whole process group (its children too). Idempotent."""
        if self._returncode is None and not self._kill_requested:
            self._kill_requested = True
            self._launcher._send_nowait({"op": "kill", "pid": self.pid})

    def _set_exited(self, code: int) -> None:
        if self._returncode is None:
            self._returncode = code
            self._exited.set()

    def __repr__(self) -> str:
        return f"<TaskProcess pid={self.pid} returncode={self._returncode}>"


class _PendingStart:
    """A start request waiting for the fork server's answer."""

    def __init__(self) -> None:
        self.answered = anyio.Event()  # set when pid or error is known
        self.task: TaskProcess | None = None  # the started task
        self.error: str | None = None  # why it could not start
        self.abandoned = False  # the caller was cancelled: kill the task when it starts


class TaskLauncher:
    """Starts task processes: Python-module commands fork from a pre-warmed server, others exec.

    :param image_map: container image URI (exact, or an fnmatch pattern such as ``"*"``) -> the
        argv that replaces the image's ENTRYPOINT. Exact URIs win over patterns, patterns are
        tried in order. Default: :data:`DEFAULT_IMAGE_MAP`.
    :param preload: modules the fork server imports before serving. A module that fails to
        import is logged to stderr and skipped: tasks then import it themselves.
    """

    def __init__(
        self,
        *,
        image_map: Mapping[str, Sequence[str]] | None = None,
        preload: Sequence[str] = DEFAULT_PRELOAD,
    ) -> None:
        chosen = DEFAULT_IMAGE_MAP if image_map is None else image_map
        self._image_map = {pattern: list(argv) for pattern, argv in chosen.items()}
        self._preload = tuple(preload)
        self._state = _State.NEW
        self._process: Process | None = None
        self._stream: UNIXSocketStream | None = None
        self._task_group: TaskGroup | None = None
        self._outbox_send: MemoryObjectSendStream[dict[str, Any]] | None = None
        self._outbox_receive: MemoryObjectReceiveStream[dict[str, Any]] | None = None
        self._request_ids = itertools.count()
        # request id -> start request not answered yet
        self._pending: dict[int, _PendingStart] = {}
        # pid -> task still running
        self._running: dict[int, TaskProcess] = {}
        self._ready_or_gone = anyio.Event()  # set when the server has preloaded, or died
        self._ready_message_seen = False  # the server did say it had preloaded
        self._server_gone = anyio.Event()  # set when the control socket hits EOF
        self.preloaded: tuple[str, ...] = ()  # modules the fork server imported
        self.preload_failures: dict[str, str] = {}  # module -> why it did not import

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> TaskLauncher:
        """Start the fork server; it preloads in the background (see :meth:`wait_ready`)."""
        if self._state is not _State.NEW:
            raise RuntimeError("a TaskLauncher can be entered only once")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            command = [
                sys.executable,
                "-m",
                "covalent_gcpbatch_array.local.batch.fork_server",
                "--fd",
                str(theirs.fileno()),
                "--parent-pid",
                str(os.getpid()),
            ]
            for module in self._preload:
                command += ["--preload", module]
            # Its own session: a Ctrl-C meant for the emulator must not hit the server (the
            # emulator shuts it down); stdout is the emulator's to print its ready line on.
            self._process = await anyio.open_process(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=None,
                pass_fds=[theirs.fileno()],
                start_new_session=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._stream = await UNIXSocketStream.from_socket(ours)
        outbox_send, outbox_receive = anyio.create_memory_object_stream[dict[str, Any]](math.inf)
        self._outbox_send, self._outbox_receive = outbox_send, outbox_receive
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._write_requests, outbox_receive)
        self._task_group.start_soon(self._read_messages)
        self._state = _State.RUNNING
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Kill every task still running and stop the fork server."""
        if self._state in (_State.NEW, _State.CLOSED):
            return
        self._state = _State.CLOSING
        assert self._process is not None and self._task_group is not None
        with anyio.CancelScope(shield=True):
            self._send_nowait({"op": "shutdown"})
            with anyio.move_on_after(_SHUTDOWN_TIMEOUT):
                await self._server_gone.wait()
                await self._process.wait()
            if self._process.returncode is None:
                # Its tasks die with it (parent-death signal); it is unresponsive, so no choice.
                print(
                    f"task_launcher: fork server {self._process.pid} did not stop in "
                    f"{_SHUTDOWN_TIMEOUT:g} s; killing it",
                    file=sys.stderr,
                )
                self._process.kill()
                await self._process.wait()
            await self._process.aclose()
        # The reader and writer end at the server's EOF; cancel them in case they did not.
        self._task_group.cancel_scope.cancel()
        await self._task_group.__aexit__(None, None, None)
        self._forget_server()  # from here on, kill() and start() no longer use the streams
        self._state = _State.CLOSED
        if self._outbox_send is not None and self._outbox_receive is not None:
            self._outbox_send.close()
            self._outbox_receive.close()  # the writer may have been cancelled before it began
        if self._stream is not None:
            await self._stream.aclose()

    async def wait_ready(self) -> None:
        """Wait until the fork server has imported its preload modules.

        :raises TaskStartError: if the fork server died before that
        """
        await self._ready_or_gone.wait()
        if not self._ready_message_seen:
            raise TaskStartError(self._server_gone_message())

    @property
    def server_pid(self) -> int | None:
        """The fork server's pid (None before ``__aenter__``)."""
        return None if self._process is None else self._process.pid

    # -- public API --------------------------------------------------------------------------

    def container_argv(self, image_uri: str, entrypoint: str, commands: Sequence[str]) -> list[str]:
        """The local command line of a container runnable, with Docker's (and Batch's) rules.

        The image's ENTRYPOINT comes from the image map; a non-empty ``entrypoint`` replaces it
        (``python``/``python3`` mean the current Python); ``commands`` are appended.

        :raises UnknownImageError: if no image map entry matches ``image_uri``
        """
        image_entrypoint = self._image_map.get(image_uri)
        if image_entrypoint is None:
            image_entrypoint = next(
                (
                    argv
                    for pattern, argv in self._image_map.items()
                    if fnmatch.fnmatchcase(image_uri, pattern)
                ),
                None,
            )
        if image_entrypoint is None:
            raise UnknownImageError(image_uri, list(self._image_map))
        head = list(image_entrypoint)
        if entrypoint:
            local = (
                sys.executable if _PYTHON_NAME.match(os.path.basename(entrypoint)) else entrypoint
            )
            head = [local]
        return [*head, *commands]

    async def start(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        stdout: Path,
        stderr: Path,
        cwd: Path | None = None,
    ) -> TaskProcess:
        """Start a task and return as soon as it runs.

        :param argv: the command line; ``[sys.executable, "-m", MODULE, *args]`` is forked from
            the pre-warmed server, anything else is exec'd (``argv[0]`` looked up in env PATH)
        :param env: the task's whole environment (nothing of ours leaks in)
        :param stdout: file that receives the task's stdout (created or truncated)
        :param stderr: file that receives its stderr (may be the same file)
        :param cwd: its working directory; default: the folder of ``stdout``
        :raises TaskStartError: if an output file or the folder is unusable, or the launcher is
            not running
        """
        argv = [str(arg) for arg in argv]
        if not argv:
            raise TaskStartError("cannot start a task with an empty command line")
        if self._state is not _State.RUNNING:
            raise TaskStartError(self._not_running_message())
        request_id = next(self._request_ids)
        pending = _PendingStart()
        self._pending[request_id] = pending
        self._send_nowait(_start_request(request_id, argv, env, stdout, stderr, cwd))
        try:
            await pending.answered.wait()
        except BaseException:
            pending.abandoned = True  # the reader kills the task if it starts after all
            raise
        if pending.task is None:
            raise TaskStartError(f"cannot start task {argv!r}: {pending.error}")
        return pending.task

    # -- internals ---------------------------------------------------------------------------

    def _send_nowait(self, message: dict[str, Any]) -> None:
        """Queue a request for the fork server; dropped if it is gone (its tasks are too)."""
        if self._outbox_send is not None and not self._server_gone.is_set():
            self._outbox_send.send_nowait(message)

    async def _write_requests(self, outbox: MemoryObjectReceiveStream[dict[str, Any]]) -> None:
        assert self._stream is not None
        async with outbox:
            async for message in outbox:
                # Everything queued meanwhile goes in the same write: one syscall per burst.
                lines = [message]
                while True:
                    try:
                        lines.append(outbox.receive_nowait())
                    except anyio.WouldBlock:
                        break
                data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
                try:
                    await self._stream.send(data)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    return  # the reader sees the EOF and cleans up

    async def _read_messages(self) -> None:
        assert self._stream is not None
        receive = BufferedByteReceiveStream(self._stream)
        try:
            while True:
                line = await receive.receive_until(b"\n", max_bytes=1 << 20)
                self._dispatch(json.loads(line))
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError, OSError):
            pass
        finally:
            self._forget_server()

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "exit" in message:
            task = self._running.pop(message["pid"], None)
            if task is not None:
                task._set_exited(int(message["exit"]))
        elif "id" in message:
            pending = self._pending.pop(message["id"])
            if "pid" in message:
                pending.task = self._running[message["pid"]] = TaskProcess(message["pid"], self)
                if pending.abandoned:
                    pending.task.kill()
            else:
                pending.error = message["error"]
            pending.answered.set()
        elif message.get("ready"):
            self.preloaded = tuple(message["preloaded"])
            self.preload_failures = dict(message["failed"])
            self._ready_message_seen = True
            self._ready_or_gone.set()

    def _forget_server(self) -> None:
        """The fork server is gone: its tasks died with it, pending starts fail."""
        if self._state is _State.RUNNING:
            self._state = _State.BROKEN
            print(f"task_launcher: {self._server_gone_message()}", file=sys.stderr)
        self._server_gone.set()
        self._ready_or_gone.set()
        for pending in self._pending.values():
            pending.error = self._server_gone_message()
            pending.answered.set()
        self._pending.clear()
        for task in self._running.values():
            # The task itself died with the server (parent-death signal), but what it started
            # did not: kill its group from here. The group id stays taken while the group has
            # members, so this cannot hit an unrelated process.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(task.pid, signal.SIGKILL)
            task._set_exited(_KILLED)
        self._running.clear()

    def _server_gone_message(self) -> str:
        code = None if self._process is None else self._process.returncode
        status = "" if code is None else f" (exit code {code})"
        return f"the task launcher's fork server stopped{status}; see its messages on stderr"

    def _not_running_message(self) -> str:
        if self._state is _State.NEW:
            return "the TaskLauncher is not started: use `async with TaskLauncher() as launcher`"
        if self._state is _State.BROKEN:
            return self._server_gone_message()
        return "the TaskLauncher is closed"


def _start_request(
    request_id: int,
    argv: list[str],
    env: Mapping[str, str],
    stdout: Path,
    stderr: Path,
    cwd: Path | None,
) -> dict[str, Any]:
    """The fork server's start request, with absolute paths (our cwd may change later)."""
    stdout_path = os.path.abspath(stdout)
    return {
        "op": "start",
        "id": request_id,
        "argv": argv,
        "module": _forkable_module(argv),
        "env": {str(k): str(v) for k, v in env.items()},
        "stdout": stdout_path,
        "stderr": os.path.abspath(stderr),
        "cwd": os.path.abspath(cwd) if cwd is not None else os.path.dirname(stdout_path),
    }


def _forkable_module(argv: Sequence[str]) -> str | None:
    """MODULE if ``argv`` is ``[sys.executable, "-m", MODULE, ...]``, else None."""
    if len(argv) >= 3 and argv[0] == sys.executable and argv[1] == "-m" and argv[2]:
        return argv[2]
    return None
