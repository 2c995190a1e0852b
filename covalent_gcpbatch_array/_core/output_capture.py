"""Capture of a task's stdout and stderr at the file-descriptor level, echoed live.

Redirecting ``sys.stdout`` would miss what subprocesses (pip run by ``DepsPip``, shell commands
of ``DepsBash``) and C extensions write, so the runner points file descriptors 1 and 2 at pipes
instead. A thread per pipe copies every chunk both to the original descriptor (Cloud Logging
reads the container's output, and should see it while the task runs, not only at the end) and
to a temporary file that becomes the task's ``stdout`` / ``stderr`` object.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
from types import TracebackType

__all__ = ["OutputCapture"]

# A subprocess that outlives the function keeps the pipe open: do not wait for it forever.
_DRAIN_SECONDS = 2.0
_CHUNK = 64 * 1024


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _flush_python_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


class _FdTee:
    """Points one file descriptor at a pipe and copies what arrives to the original and a file."""

    def __init__(self, fd: int) -> None:
        self._fd = fd  # the descriptor captured (1 or 2)
        self._original = os.dup(fd)  # where the echo goes: the process's real output
        # Everything captured, on disk not in memory; closed in restore(), not in a block.
        self._sink = tempfile.TemporaryFile()  # noqa: SIM115
        self._lock = threading.Lock()  # guards _sink between the pump and snapshot()
        read_end, write_end = os.pipe()
        self._read_end = read_end
        os.dup2(write_end, fd)  # children inherit fd as their stdout / stderr
        os.close(write_end)
        self._pump_thread = threading.Thread(
            target=self._pump, name=f"cga-capture-fd{fd}", daemon=True
        )
        self._pump_thread.start()

    def _pump(self) -> None:
        echo = True
        while chunk := os.read(self._read_end, _CHUNK):
            with self._lock:
                self._sink.write(chunk)
            if echo:
                try:
                    _write_all(self._original, chunk)
                except OSError:
                    echo = False  # the real output is gone; keep capturing anyway

    def snapshot(self) -> bytes:
        """Everything captured so far."""
        with self._lock:
            self._sink.flush()
            position = self._sink.tell()
            self._sink.seek(0)
            data = self._sink.read()
            self._sink.seek(position)
        return data

    def restore(self) -> bytes:
        """Give the descriptor back and return everything captured."""
        os.dup2(self._original, self._fd)  # drops our last handle on the pipe's write end
        self._pump_thread.join(_DRAIN_SECONDS)
        data = self.snapshot()
        if not self._pump_thread.is_alive():
            # Otherwise a leftover child still writes: leave the pump its descriptors.
            os.close(self._read_end)
            os.close(self._original)
            self._sink.close()
        return data


class OutputCapture:
    """Captures file descriptors 1 and 2 inside a ``with`` block.

    After the block, :attr:`stdout` and :attr:`stderr` hold the bytes written to each.
    """

    def __init__(self) -> None:
        self.stdout = b""  # captured standard output, after the block
        self.stderr = b""  # captured standard error, after the block
        self._tees: tuple[_FdTee, _FdTee] | None = None
        self._line_buffered: bool | None = None

    def __enter__(self) -> OutputCapture:
        _flush_python_streams()
        self._tees = (_FdTee(1), _FdTee(2))
        # print() output should reach the echo while the task runs, not when a buffer fills.
        if hasattr(sys.stdout, "reconfigure") and hasattr(sys.stdout, "line_buffering"):
            self._line_buffered = bool(sys.stdout.line_buffering)
            sys.stdout.reconfigure(line_buffering=True)
        return self

    def snapshot(self) -> tuple[bytes, bytes]:
        """What was captured so far, while the block still runs: (stdout, stderr)."""
        if self._tees is None:
            return self.stdout, self.stderr
        return self._tees[0].snapshot(), self._tees[1].snapshot()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _flush_python_streams()
        if self._line_buffered is not None:
            with contextlib.suppress(Exception):
                sys.stdout.reconfigure(line_buffering=self._line_buffered)  # type: ignore[union-attr]
        assert self._tees is not None
        out_tee, err_tee = self._tees
        self._tees = None
        self.stdout = out_tee.restore()
        self.stderr = err_tee.restore()
