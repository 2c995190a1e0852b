"""The pre-warmed fork server: the local stand-in for a task VM's image.

A real task VM pulls an image in which covalent, cloudpickle and google-cloud-storage are
installed; starting Python there and importing them takes seconds. Here every task would pay
that again, so :class:`~covalent_gcpbatch_array.local.batch.launcher.TaskLauncher` runs this
server once: it imports the preload modules, then forks one child per task. A child that runs
``python -m MODULE`` finds those modules already imported and starts in milliseconds.

Run as ``python -m covalent_gcpbatch_array.local.batch.fork_server --fd N --parent-pid P
[--preload MODULE ...]``; ``N`` is a connected Unix stream socket (the launcher keeps the other
end). Protocol, one JSON object per line::

    launcher -> server
      {"op": "start", "id": 7, "argv": [...], "module": "pkg.mod" or null, "env": {...},
       "stdout": "/abs/path", "stderr": "/abs/path", "cwd": "/abs/dir"}
      {"op": "kill", "pid": 1234}        SIGKILL that task's process group
      {"op": "shutdown"}                 kill every task, report their exits, exit
    server -> launcher
      {"ready": true, "preloaded": [...], "failed": {"module": "error"}}   once, first
      {"id": 7, "pid": 1234}  or  {"id": 7, "error": "why the task could not start"}
      {"pid": 1234, "exit": 0}           128 + N when signal N ended it, as a container reports

A task with a ``module`` runs in the forked child as ``python -m module`` would (runpy, fresh
``sys.argv``, ``os.environ`` replaced, its own session); any other argv is exec'd from a forked
child. Either way the task leads its own process group, and the group is killed when the task
ends, as a container's processes die with it.

No task outlives the server, and the server does not outlive the launcher: the server asks for
SIGTERM when its parent dies (``PR_SET_PDEATHSIG``) and also stops at EOF on the socket; it then
kills every task's process group. Each task asks for SIGKILL when the server dies.

The server is deliberately synchronous (``selectors``, no event loop, no threads): ``fork()`` is
only safe in a single-threaded process, and a child must not inherit a running event loop.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import io
import json
import os
import selectors
import signal
import socket
import sys
import tempfile
import threading
import traceback
import types
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from covalent_gcpbatch_array._core.compat import (
    join_non_daemon_threads,
    run_exit_handlers,
    run_module_as_main,
)
from covalent_gcpbatch_array.local.process import set_parent_death_signal

__all__ = ["ForkServer", "ForkedTask", "main", "run_forked_task"]

_MAX_LINE = 1 << 24  # a request larger than 16 MB is a protocol error, not a task
_OUTPUT_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC


def _log(message: str) -> None:
    print(f"fork_server[{os.getpid()}]: {message}", file=sys.stderr, flush=True)


def exit_code_of(wait_status: int) -> int:
    """The exit code a container runtime reports for a ``waitpid`` status (signal N -> 128 + N)."""
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


@dataclass(frozen=True)
class ForkedTask:
    """What a forked child runs once it has left the server loop."""

    module: str  # the module to run as __main__
    args: list[str]  # sys.argv[1:]
    env: dict[str, str]  # the task's whole environment


class ForkServer:
    """The request loop; :meth:`serve` returns only in the server (None) or in a forked child."""

    def __init__(self, control: socket.socket) -> None:
        self._control = control
        self._pid = os.getpid()
        # pids of the children still running (each leads its own process group)
        self._tasks: set[int] = set()
        # set by shutdown: the loop ends and no request is served any more
        self._stopped = False
        self._inbox = bytearray()
        self._selector = selectors.DefaultSelector()
        self._wakeup_read, self._wakeup_write = socket.socketpair()

    def serve(self, ready: dict[str, Any]) -> ForkedTask | None:
        """Answer requests until shutdown; in a forked child, return the task it must run."""
        self._wakeup_read.setblocking(False)
        self._wakeup_write.setblocking(False)
        # Signals only write their number to the wakeup socket; the loop acts on them.
        signal.set_wakeup_fd(self._wakeup_write.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(signum, _ignore_signal)
        self._selector.register(self._control, selectors.EVENT_READ, "control")
        self._selector.register(self._wakeup_read, selectors.EVENT_READ, "signal")
        try:
            self._send({"ready": True, **ready})
            while not self._stopped:
                for key, _ in self._selector.select():
                    if key.data == "signal":
                        self._on_signals(self._wakeup_read.recv(4096))
                    else:
                        task = self._on_control_readable()
                        if task is not None:
                            return task  # only in a forked child
                    if self._stopped:
                        break
        except OSError as exc:  # the launcher is gone mid-write, or the socket broke
            _log(f"control socket failed ({exc}); stopping every task")
            self._shutdown(report=False)
        return None

    def _on_signals(self, signums: bytes) -> None:
        if signal.SIGTERM in signums:  # the launcher died (parent-death signal) or was told to
            self._shutdown(report=False)
        else:
            self._reap()

    def _on_control_readable(self) -> ForkedTask | None:
        data = self._control.recv(1 << 16)
        if not data:  # EOF: the launcher is gone
            self._shutdown(report=False)
            return None
        self._inbox += data
        while not self._stopped and (end := self._inbox.find(b"\n")) >= 0:
            request = json.loads(bytes(self._inbox[:end]))
            del self._inbox[: end + 1]
            op = request.get("op")
            if op == "start":
                task = self._start(request)
                if task is not None:
                    return task
            elif op == "kill":
                self._kill(int(request["pid"]))
            elif op == "shutdown":
                self._shutdown(report=True)
            else:
                _log(f"ignoring unknown request {request!r}")
        if len(self._inbox) > _MAX_LINE:
            raise ValueError(f"request line longer than {_MAX_LINE} bytes")
        return None

    def _start(self, request: dict[str, Any]) -> ForkedTask | None:
        """Fork one task; return its ForkedTask in the child (module tasks), None in the server."""
        request_id = request["id"]
        try:
            out_fd = os.open(request["stdout"], _OUTPUT_FLAGS, 0o644)
        except OSError as exc:
            self._send({"id": request_id, "error": f"cannot open stdout file: {exc}"})
            return None
        try:
            err_fd = os.open(request["stderr"], _OUTPUT_FLAGS, 0o644)
        except OSError as exc:
            os.close(out_fd)
            self._send({"id": request_id, "error": f"cannot open stderr file: {exc}"})
            return None
        cwd = request["cwd"]
        if not os.path.isdir(cwd):
            os.close(out_fd)
            os.close(err_fd)
            self._send({"id": request_id, "error": f"working directory {cwd!r} does not exist"})
            return None
        # Buffered server output would otherwise be written a second time by the child.
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            try:
                return self._become_task(request, out_fd, err_fd)
            except BaseException as exc:  # nothing may return into the server loop
                os.write(2, f"task launch failed in the forked child: {exc!r}\n".encode())
                os._exit(1)
        os.close(out_fd)
        os.close(err_fd)
        self._tasks.add(pid)
        self._send({"id": request_id, "pid": pid})
        return None

    def _become_task(self, request: dict[str, Any], out_fd: int, err_fd: int) -> ForkedTask:
        """In the forked child: detach from the server and set up the task's process."""
        os.setsid()
        set_parent_death_signal(signal.SIGKILL, self._pid)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        self._selector.close()
        self._control.close()
        self._wakeup_read.close()
        self._wakeup_write.close()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        for fd in (devnull, out_fd, err_fd):
            os.close(fd)
        os.chdir(request["cwd"])
        env: dict[str, str] = request["env"]
        module: str | None = request["module"]
        if module is None:
            _exec(request["argv"], env)  # never returns
        return ForkedTask(module=module, args=list(request["argv"][3:]), env=env)

    def _kill(self, pid: int) -> None:
        if pid not in self._tasks:
            return  # already reaped: its group was killed then
        _kill_group(pid)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self._tasks:
                self._tasks.remove(pid)
                _kill_group(pid)  # what the task left behind dies with it, as in a container
                self._send({"pid": pid, "exit": exit_code_of(status)})

    def _shutdown(self, *, report: bool) -> None:
        """Kill every task's process group and wait for the tasks; report exits if asked."""
        self._stopped = True
        for pid in self._tasks:
            _kill_group(pid)
        for pid in sorted(self._tasks):
            _, status = os.waitpid(pid, 0)
            self._tasks.remove(pid)
            if report:
                try:
                    self._send({"pid": pid, "exit": exit_code_of(status)})
                except OSError:
                    report = False

    def _send(self, message: dict[str, Any]) -> None:
        self._control.sendall(json.dumps(message).encode() + b"\n")


def _ignore_signal(signum: int, frame: object) -> None:
    """Handlers do nothing: set_wakeup_fd already told the loop which signal came."""


def _kill_group(pid: int) -> None:
    for kill in (os.killpg, os.kill):  # os.kill: the child may not have called setsid yet
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill(pid, signal.SIGKILL)


def _exec(argv: Sequence[str], env: dict[str, str]) -> NoReturn:
    """Replace the forked child by ``argv``; exit 127/126 as a container would if that fails."""
    # Python ignores these signals; an exec'd program must get the default behaviour back.
    for name in ("SIGPIPE", "SIGXFSZ", "SIGINT"):
        signal.signal(getattr(signal, name), signal.SIG_DFL)
    try:
        os.execvpe(argv[0], list(argv), env)
    except OSError as exc:
        os.write(2, f"exec {argv[0]!r} failed: {exc.strerror}\n".encode())
        os._exit(127 if isinstance(exc, FileNotFoundError) else 126)


def run_forked_task(task: ForkedTask) -> NoReturn:
    """Run ``task.module`` exactly as ``python -m`` does, in this forked process, then exit.

    The exit code is a fresh interpreter's: 0, the code of a ``SystemExit``, or 1 with the
    traceback on stderr for any other exception. Exit runs what a task can observe of the
    interpreter's shutdown (join non-daemon threads, atexit handlers, clear the ``__main__``
    namespace so its open files are flushed and closed, flush stdio) and skips the rest with
    ``os._exit``, as multiprocessing's forked children do: tearing down the preloaded modules
    would write to, and so copy, every page shared with the server (measured: 30 ms of each
    task's life with covalent preloaded).
    """
    os.environ.clear()
    os.environ.update(task.env)
    tempfile.tempdir = None  # the task's TMPDIR, not the one the server may have cached
    # sys.path as `python -m` builds it: the working directory, then PYTHONPATH, then the rest.
    sys.path[0] = os.getcwd()
    extra = [p for p in task.env.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[1:1] = [p for p in extra if p not in sys.path]
    importlib.invalidate_caches()
    _fresh_stdio(unbuffered=bool(task.env.get("PYTHONUNBUFFERED")))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.argv = [task.module, *task.args]
    # The task gets a __main__ of its own; this module's functions keep their namespace.
    main_module = sys.modules["__main__"] = types.ModuleType("__main__")
    # runpy warns that a preloaded module "found in sys.modules" runs again as __main__: that
    # is the point of preloading, and the warning would land in every task's stderr.
    warnings.filterwarnings(
        "ignore",
        message=r".*found in sys\.modules after import of package",
        category=RuntimeWarning,
    )
    code = _run_main_module(task.module)
    _exit_like_python(code, main_module)


def _run_main_module(module: str) -> int:
    try:
        # What the interpreter itself runs for `python -m` (Modules/main.c): the module runs in
        # sys.modules["__main__"], sys.argv[0] becomes its path, and a module that cannot be
        # found ends in SystemExit("<python>: No module named ..."), as from the command line.
        run_module_as_main(module)
    except SystemExit as exc:
        if exc.code is None:
            return 0
        if isinstance(exc.code, int):
            return exc.code
        print(exc.code, file=sys.stderr)  # sys.exit("message"), as Python prints it
        return 1
    except KeyboardInterrupt:
        traceback.print_exc()
        return 128 + signal.SIGINT  # Python re-raises SIGINT on itself in this case
    except BaseException:
        sys.excepthook(*sys.exc_info())
        return 1
    return 0


def _exit_like_python(code: int, main_module: types.ModuleType) -> NoReturn:
    """The steps of interpreter shutdown a task can observe, in Py_FinalizeEx's order."""
    join_non_daemon_threads()
    run_exit_handlers()
    # Clear __main__ as the interpreter does (names with one leading underscore first, then
    # the rest, keeping __builtins__): objects die by reference count in a sane order, so a
    # file left open is flushed before it is closed. A gc pass would finalize a file's layers
    # in any order and can lose its buffer.
    namespace = main_module.__dict__
    for private_first in (True, False):
        for name in list(namespace):
            is_private = name.startswith("_") and not name.startswith("__")
            if name != "__builtins__" and is_private == private_first:
                namespace[name] = None
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code & 0xFF)


def _fresh_stdio(*, unbuffered: bool) -> None:
    """New sys.stdin/stdout/stderr on fds 0-2, buffered as a fresh interpreter would do it."""
    encoding = sys.stdout.encoding if sys.stdout is not None else "utf-8"
    buffering = 0 if unbuffered else -1
    sys.stdin = open(0, closefd=False, encoding=encoding)  # noqa: SIM115
    sys.stdout = io.TextIOWrapper(
        open(1, "wb", buffering=buffering, closefd=False),  # noqa: SIM115
        encoding=encoding,
        write_through=unbuffered,
    )
    sys.stderr = io.TextIOWrapper(
        open(2, "wb", buffering=buffering, closefd=False),  # noqa: SIM115
        encoding=encoding,
        errors="backslashreplace",
        line_buffering=True,
        write_through=unbuffered,
    )


def preload(modules: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Import ``modules``; return those imported and, for the others, why they failed."""
    imported: list[str] = []
    failed: dict[str, str] = {}
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # a failed preload only costs speed: the task imports it again
            failed[name] = f"{type(exc).__name__}: {exc}"
            _log(f"could not preload {name!r} ({failed[name]}); tasks will import it themselves")
        else:
            imported.append(name)
    return imported, failed


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m covalent_gcpbatch_array.local.batch.fork_server"
    )
    parser.add_argument("--fd", type=int, required=True, help="connected Unix socket fd")
    parser.add_argument("--parent-pid", type=int, required=True, help="the launcher's pid")
    parser.add_argument("--preload", action="append", default=[], help="module to import")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: preload, then serve; a forked child goes on to run its task."""
    args = _parse_args(argv)
    set_parent_death_signal(signal.SIGTERM, args.parent_pid)
    # Ctrl-C in a terminal reaches the launcher, which shuts the server down itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    control = socket.socket(fileno=args.fd)
    os.set_inheritable(control.fileno(), False)
    imported, failed = preload(args.preload)
    if threading.active_count() > 1:
        names = ", ".join(t.name for t in threading.enumerate())
        _log(f"preloading started threads ({names}); forking may deadlock the tasks")
    # Keep the preloaded objects out of the collector's reach, so children do not copy their
    # pages just by collecting (copy-on-write stays shared).
    gc.collect()
    gc.freeze()
    task = ForkServer(control).serve({"preloaded": imported, "failed": failed})
    if task is not None:
        run_forked_task(task)


if __name__ == "__main__":
    main()
