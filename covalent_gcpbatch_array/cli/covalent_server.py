"""A private Covalent server for tests, the demo and benchmarks.

``CovalentServer`` runs ``covalent start`` with a temporary ``HOME`` (so its config, database,
logs and caches are its own and the user's ``~/.config/covalent`` is never touched) on a free
port, and stops it at exit even when the block fails::

    with LocalCloud() as cloud, CovalentServer(executor_config=cloud.executor_config()) as server:
        dispatch_id = ct.dispatch(workflow, dispatcher_addr=server.address)(...)
        result = server.result(dispatch_id)  # ct.get_result(..., wait=True) from this server

``executor_config`` is written into ``[executors.gcpbatch_array]`` of the server's config file
before it starts, so electrons with ``executor="gcpbatch_array"`` use it.

Starting takes ``covalent start --no-cluster --no-triggers`` (the fastest flags: no Dask
cluster, no triggers server): 5 to 30 s depending on load. Stopping does what ``covalent stop``
does, a SIGINT to the server so that it cancels running dispatches, without the seconds
``covalent stop`` spends importing covalent; then the server's whole process group is killed.
A small watchdog process kills that group too if this process dies without stopping it.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import toml

from covalent_gcpbatch_array.cli.covalent_config import (
    read_executor_config,
    write_executor_config,
)
from covalent_gcpbatch_array.exceptions import LocalCloudError
from covalent_gcpbatch_array.local.process import (
    Lifecycle,
    OneShotService,
    free_port,
    process_gone,
    read_tail,
)

if TYPE_CHECKING:
    from covalent._results_manager.result import Result

__all__ = ["CovalentServer"]

START_FLAGS: Final = ("--no-cluster", "--no-triggers")
_READY_PATH: Final = "/api/v2/dispatches"  # answers once the dispatcher's API is mounted
_PROBE_INTERVAL: Final = 0.1  # seconds between readiness probes after `covalent start` returned
# Variables that would send covalent's files somewhere other than the private HOME.
_PATH_VARIABLES: Final = ("XDG_CONFIG_DIR", "XDG_CACHE_HOME", "XDG_DATA_HOME")

# Kills the server's process group (and removes its temporary HOME) once its stdin closes:
# when the owner stops the server, or when the owner dies without doing so.
_WATCHDOG: Final = """
import os, shutil, signal, sys
sys.stdin.buffer.read()
try:
    os.killpg(int(sys.argv[1]), signal.SIGKILL)
except (ProcessLookupError, PermissionError):
    pass
if sys.argv[2]:
    shutil.rmtree(sys.argv[2], ignore_errors=True)
"""


class CovalentServer(OneShotService):
    """A Covalent server of its own: temporary HOME, free port, stopped at exit.

    :param executor_config: values for ``[executors.gcpbatch_array]`` in its config file
        (e.g. ``LocalCloud.executor_config()``), written before it starts
    :param home: its HOME (default: a temporary folder, removed at stop)
    :param port: its port (``0``: a free one)
    :param environment: extra environment variables for the server process
    :param startup_timeout: seconds ``covalent start`` gets
    :param stop_timeout: seconds the server gets to shut down after SIGINT before it is killed
    :param python: the Python whose ``covalent`` runs the server (default: this one), e.g.
        another venv's, with other executor plugins installed
    """

    def __init__(
        self,
        executor_config: Mapping[str, Any] | None = None,
        *,
        home: str | os.PathLike[str] | None = None,
        port: int = 0,
        environment: Mapping[str, str] | None = None,
        startup_timeout: float = 180.0,
        stop_timeout: float = 30.0,
        python: str | os.PathLike[str] | None = None,
    ) -> None:
        self.executor_config = dict(executor_config) if executor_config is not None else None
        self.requested_port = port
        self.extra_environment = dict(environment or {})
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.python = str(python) if python is not None else sys.executable
        self._given_home = Path(home) if home is not None else None
        self._home: Path | None = None  # the HOME in use
        self._port: int | None = None  # the port the server listens on
        self._cli: subprocess.Popen[bytes] | None = None  # `covalent start`, to reap it
        self._group: int | None = None  # the server's process group (`covalent start`'s pid)
        self._server_pid: int | None = None  # the uvicorn process (`python app.py`)
        self._watchdog: subprocess.Popen[bytes] | None = None
        self.state = Lifecycle.NEW

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> CovalentServer:
        """Run ``covalent start`` in the private HOME; return once the API answers.

        :raises LocalCloudError: the server did not start (the message has its log tail)
        """
        self._start_once(self._start)
        return self

    def stop(self) -> None:
        """Stop the server and kill its process group; remove a temporary HOME. Idempotent."""
        try:
            if self._server_pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self._server_pid, signal.SIGINT)
                _wait_gone(self._server_pid, self.stop_timeout)
            if self._group is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self._group, signal.SIGKILL)
            if self._cli is not None:
                self._cli.wait()  # reaps it (it was killed above if it still ran)
            if self._watchdog is not None:
                _close_watchdog(self._watchdog)
        finally:
            self.state = Lifecycle.STOPPED
            self._server_pid = self._group = self._watchdog = self._cli = None
            if self._given_home is None and self._home is not None:
                shutil.rmtree(self._home, ignore_errors=True)

    def _start(self) -> None:
        if self._given_home is not None:
            self._given_home.mkdir(parents=True, exist_ok=True)
            self._home = self._given_home.resolve()
        else:
            self._home = Path(tempfile.mkdtemp(prefix="cga-covalent-")).resolve()
        if self.executor_config is not None:
            write_executor_config(self.config_file, self.executor_config)
        port = self.requested_port or free_port()
        start_log = self._home / "covalent-start.log"
        deadline = time.monotonic() + self.startup_timeout
        with start_log.open("wb") as log:
            cli = subprocess.Popen(
                [*_covalent_command(self.python), "start", *START_FLAGS, "--port", str(port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._home,
                env=self.environment(),
                # A group of its own, inherited by the server it leaves behind: one killpg
                # stops everything, and a Ctrl-C in our terminal does not reach it.
                start_new_session=True,
            )
        self._cli, self._group = cli, cli.pid
        self._watchdog = _start_watchdog(cli.pid, self._home if self._given_home is None else None)
        try:
            returncode = cli.wait(timeout=self.startup_timeout)
        except subprocess.TimeoutExpired:
            raise LocalCloudError(
                f"`covalent start` did not finish within {self.startup_timeout:g} s; {self._logs()}"
            ) from None
        if returncode != 0:
            raise LocalCloudError(f"`covalent start` exited with code {returncode}; {self._logs()}")
        self._port = int(self._read_config()["dispatcher"]["port"])
        self._server_pid = self._find_server_pid()
        self._wait_ready(deadline)

    def _find_server_pid(self) -> int:
        pid_file = self.home / ".cache" / "covalent" / "ui.pid"
        try:
            shell_pid = int(pid_file.read_text().split()[0])
        except (FileNotFoundError, IndexError, ValueError):
            raise LocalCloudError(f"`covalent start` wrote no server pid; {self._logs()}") from None
        # `covalent start` runs `sh -c "python app.py ... >> log"`: the server is the shell's child.
        children = _children(shell_pid)
        if len(children) != 1:
            raise LocalCloudError(
                f"the Covalent server (shell {shell_pid}) is not running; {self._logs()}"
            )
        return children[0]

    def _wait_ready(self, deadline: float) -> None:
        while not self._answers():
            if time.monotonic() > deadline:
                raise LocalCloudError(
                    f"the Covalent server at {self.address} did not answer within "
                    f"{self.startup_timeout:g} s; {self._logs()}"
                )
            if not self.is_running():
                raise LocalCloudError(f"the Covalent server exited while starting; {self._logs()}")
            time.sleep(_PROBE_INTERVAL)

    # -- where things are -----------------------------------------------------------------

    @property
    def home(self) -> Path:
        """The server's HOME: its config, database, logs and caches are under it."""
        if self._home is None:
            raise LocalCloudError("this CovalentServer has not been started")
        return self._home

    @property
    def port(self) -> int:
        """The port the server listens on."""
        if self._port is None or self.state is not Lifecycle.RUNNING:
            raise LocalCloudError(f"this CovalentServer is {self.state.value}, not running")
        return self._port

    @property
    def address(self) -> str:
        """``http://localhost:PORT``: the ``dispatcher_addr`` for ``ct.dispatch`` and friends."""
        return f"http://localhost:{self.port}"

    @property
    def config_file(self) -> Path:
        """The server's Covalent config file."""
        return self.home / ".config" / "covalent" / "covalent.conf"

    @property
    def results_dir(self) -> Path:
        """A folder for ``ct.get_result(..., results_dir=...)`` downloads, inside HOME."""
        return self.home / "results"

    @property
    def log_file(self) -> Path:
        """The server's log (``covalent_ui.log``)."""
        return self.home / ".cache" / "covalent" / "covalent_ui.log"

    @property
    def pid(self) -> int:
        """The server process's id (uvicorn running ``app.py``)."""
        if self._server_pid is None:
            raise LocalCloudError(f"this CovalentServer is {self.state.value}, not running")
        return self._server_pid

    def environment(self) -> dict[str, str]:
        """The environment of the server: ours, with HOME private and covalent's overrides gone.

        Run ``covalent`` commands with it to reach this server (``covalent status``, ...).
        """
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("COVALENT_") and key not in _PATH_VARIABLES
        }
        env["HOME"] = str(self.home)
        env.update(self.extra_environment)
        return env

    def is_running(self) -> bool:
        """Whether the server process is alive."""
        return (
            self.state is Lifecycle.RUNNING
            and self._server_pid is not None
            and not process_gone(self._server_pid)
        )

    # -- its config -----------------------------------------------------------------------

    def read_executor_config(self) -> dict[str, Any] | None:
        """``[executors.gcpbatch_array]`` of the server's config file (``None`` if absent)."""
        return read_executor_config(self.config_file)

    def write_executor_config(self, values: Mapping[str, Any]) -> None:
        """Set keys of ``[executors.gcpbatch_array]``; the server reads the file again each
        time it makes an executor by its short name."""
        write_executor_config(self.config_file, values)

    def result(self, dispatch_id: str, **options: Any) -> Result:
        """The dispatch's result once it finished: ``ct.get_result(dispatch_id, wait=True)``
        from this server, downloading into :attr:`results_dir`.

        :param options: other keywords of ``ct.get_result`` (e.g. ``intermediate_outputs``)
        """
        import covalent as ct

        result: Result = ct.get_result(
            dispatch_id,
            wait=True,
            dispatcher_addr=self.address,
            results_dir=str(self.results_dir),
            **options,
        )
        return result

    def log_tail(self, max_bytes: int = 4000) -> str:
        """The end of the server's log."""
        return read_tail(self.log_file, max_bytes)

    # -- internals ------------------------------------------------------------------------

    def _read_config(self) -> dict[str, Any]:
        try:
            config: dict[str, Any] = toml.loads(self.config_file.read_text())
        except (OSError, toml.TomlDecodeError) as exc:
            raise LocalCloudError(f"cannot read {self.config_file}: {exc}; {self._logs()}") from exc
        return config

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.address + _READY_PATH, timeout=5):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    def _logs(self) -> str:
        start_log = read_tail(self.home / "covalent-start.log", 2000) if self._home else ""
        server_log = read_tail(self.log_file, 4000) if self._home else ""
        return (
            f"`covalent start` printed:\n{start_log}\n"
            f"--- the server's log {self.log_file if self._home else ''} ---\n{server_log}"
        )


def _covalent_command(python: str) -> list[str]:
    """The ``covalent`` CLI of ``python`` (its console script, else the module it runs)."""
    script = Path(python).with_name("covalent")
    if script.is_file():
        return [str(script)]
    return [python, "-c", "from covalent_dispatcher._cli.cli import cli; cli()"]


def _start_watchdog(group: int, home: Path | None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-S", "-c", _WATCHDOG, str(group), str(home or "")],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _close_watchdog(watchdog: subprocess.Popen[bytes]) -> None:
    assert watchdog.stdin is not None
    with contextlib.suppress(OSError):
        watchdog.stdin.close()
    try:
        watchdog.wait(timeout=10.0)
    except subprocess.TimeoutExpired:
        watchdog.kill()
        watchdog.wait()


def _children(pid: int) -> list[int]:
    pids: list[int] = []
    with contextlib.suppress(FileNotFoundError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):
                pids += [int(child) for child in (task / "children").read_text().split()]
    return pids


def _wait_gone(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` s for a process that is not our child to exit."""
    try:
        # A pidfd becomes readable when the process exits: no polling needed.
        descriptor = os.pidfd_open(pid)
    except (ProcessLookupError, FileNotFoundError):
        return True
    except (AttributeError, OSError):  # no pidfd (old kernel or not Linux): poll /proc
        deadline = time.monotonic() + timeout
        while not process_gone(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        return process_gone(pid)
    try:
        readable, _, _ = select.select([descriptor], [], [], timeout)
        return bool(readable)
    finally:
        os.close(descriptor)
