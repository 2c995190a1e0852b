"""Child-process plumbing shared by the local cloud's launchers.

Every emulator process we start must die with us, even when we are SIGKILLed and get no chance
to clean up. Linux's ``PR_SET_PDEATHSIG`` does that from the kernel side. It fires when the
*thread* that forked the child exits, not the whole process, so processes must be spawned from a
thread that lives as long as they do (the main thread or the event loop's thread, never a
short-lived worker thread).

:class:`OneShotService` is the lifecycle of a service made of such processes (``LocalCloud``,
``CovalentServer``): it starts once, stops idempotently, and is its own context manager, a
:class:`StoppedOnExit` (as is a started ``GcsEmulator``).
"""

from __future__ import annotations

import abc
import contextlib
import ctypes
import enum
import functools
import os
import selectors
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol, TypeVar

from covalent_gcpbatch_array.exceptions import LocalCloudError

__all__ = [
    "Lifecycle",
    "OneShotService",
    "Spawner",
    "StoppedOnExit",
    "die_with_parent",
    "free_port",
    "process_gone",
    "read_ready_line",
    "read_tail",
    "set_parent_death_signal",
    "spawn_process",
    "stop_process",
]

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


@functools.cache
def _prctl() -> Callable[..., int]:
    return ctypes.CDLL(None, use_errno=True).prctl


def set_parent_death_signal(sig: int, parent_pid: int) -> None:
    """Ask Linux to send ``sig`` to this process when the thread that forked it exits.

    Called in the child. If the parent is already gone (it may die before the request is made),
    the process signals itself at once, as if the kernel had.

    :param parent_pid: the pid the parent had when it forked us
    :raises OSError: prctl refused (not Linux, or a seccomp policy): the child would outlive us
    """
    if _prctl()(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(errno)}")
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), int(sig))


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None]:
    """Return a ``preexec_fn`` that calls :func:`set_parent_death_signal` in the child.

    :param sig: the signal the kernel sends to the child when the forking thread exits
    """
    parent_pid = os.getpid()
    _prctl()  # resolve it before forking: dlopen in a forked child of a threaded process can hang
    return functools.partial(set_parent_death_signal, sig, parent_pid)


class Spawner(Protocol):
    """Something that starts a server process like :func:`spawn_process` does."""

    def __call__(
        self,
        argv: Sequence[str],
        *,
        stdout: int | IO[Any],
        stderr: int | IO[Any],
        pdeathsig: signal.Signals = ...,
    ) -> subprocess.Popen[bytes]: ...


def spawn_process(
    argv: Sequence[str],
    *,
    stdout: int | IO[Any],
    stderr: int | IO[Any],
    pdeathsig: signal.Signals = signal.SIGTERM,
) -> subprocess.Popen[bytes]:
    """Start a server process that dies with the calling thread and ignores our terminal.

    :param pdeathsig: the signal it gets when the calling thread (or process) ends
    """
    return subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        # Its own session: a Ctrl-C in the terminal reaches only us, and we stop it in order.
        start_new_session=True,
        preexec_fn=die_with_parent(pdeathsig),
    )


def read_ready_line(
    process: subprocess.Popen[bytes], timeout: float, *, what: str, log_path: Path
) -> str:
    """Wait for the first line ``process`` prints on its stdout pipe, and return it.

    :param what: the server's name, for error messages
    :param log_path: the server's log file, whose tail goes into error messages
    :raises LocalCloudError: it exited, or printed no full line within ``timeout`` seconds
    """
    assert process.stdout is not None, "start the process with stdout=subprocess.PIPE"
    fd = process.stdout.fileno()
    deadline = time.monotonic() + timeout
    received = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while b"\n" not in received:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LocalCloudError(
                    f"{what} did not report ready within {timeout:.0f} s (printed "
                    f"{received!r}); its log:\n{read_tail(log_path)}"
                )
            if not selector.select(remaining):
                continue
            chunk = os.read(fd, 4096)
            if not chunk:  # end of file: it exited (or closed stdout)
                returncode = process.wait(timeout=5.0)
                raise LocalCloudError(
                    f"{what} exited with code {returncode} before it was ready; "
                    f"its log:\n{read_tail(log_path)}"
                )
            received += chunk
    return received.split(b"\n", 1)[0].decode(errors="replace").strip()


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free a moment ago (callers must cope with a bind race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def stop_process(process: subprocess.Popen[bytes], timeout: float = 5.0) -> int:
    """Stop ``process``: SIGTERM, then SIGKILL after ``timeout`` seconds; reap it.

    :returns: the process's return code
    """
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait()
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            stream.close()
    return process.returncode


def process_gone(pid: int) -> bool:
    """Whether ``pid`` no longer runs (a zombie waiting to be reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    # The state letter follows the parenthesised command name, which may contain spaces.
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def read_tail(path: Path, max_bytes: int = 4000) -> str:
    """Return the last ``max_bytes`` of a log file as text ("" if it does not exist)."""
    try:
        with path.open("rb") as file:
            file.seek(0, os.SEEK_END)
            file.seek(max(0, file.tell() - max_bytes))
            return file.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


class Lifecycle(enum.Enum):
    """Where a :class:`OneShotService` is in its one-way lifecycle."""

    NEW = "new"  # constructed, nothing started
    RUNNING = "running"  # started, its processes answered
    STOPPED = "stopped"  # stopped (or failed to start); cannot be started again


_Stopped = TypeVar("_Stopped", bound="StoppedOnExit")
_Service = TypeVar("_Service", bound="OneShotService")


class StoppedOnExit(abc.ABC):
    """Local processes that a ``with`` block stops when it ends."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop whatever was started; callable at any point, and more than once."""

    def __enter__(self: _Stopped) -> _Stopped:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class OneShotService(StoppedOnExit):
    """A service of local processes that starts once (on entering a ``with`` block too)."""

    state: Lifecycle = Lifecycle.NEW

    @abc.abstractmethod
    def start(self: _Service) -> _Service:
        """Start the service (through :meth:`_start_once`) and return it."""

    def _start_once(self, start_up: Callable[[], None]) -> None:
        """Run ``start_up``, the first time only; if it fails, stop what it started.

        :raises LocalCloudError: the service was started before
        """
        if self.state is not Lifecycle.NEW:
            raise LocalCloudError(
                f"this {type(self).__name__} is {self.state.value}; it starts once: make a new one"
            )
        self.state = Lifecycle.RUNNING
        try:
            start_up()
        except BaseException:
            self.stop()
            raise

    def __enter__(self: _Service) -> _Service:
        return self.start()
