"""CovalentServer: a private Covalent server that never outlives its owner."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from covalent_gcpbatch_array.cli.covalent_server import CovalentServer
from covalent_gcpbatch_array.exceptions import LocalCloudError
from covalent_gcpbatch_array.local.process import Lifecycle
from tests.polling import wait_until

pytestmark = pytest.mark.slow


def processes_with_home(home: Path) -> list[int]:
    """Processes whose environment has ``HOME=home``: the server's and its helpers'."""
    marker = f"HOME={home}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            variables = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone, or not ours to read
            continue
        if marker in variables:
            found.append(int(entry.name))
    return found


class TestRunningServer:
    def test_it_lives_in_its_own_home_and_answers(self, covalent_server: CovalentServer) -> None:
        assert covalent_server.state is Lifecycle.RUNNING
        assert covalent_server.config_file.is_relative_to(covalent_server.home)
        assert covalent_server.log_file.is_relative_to(covalent_server.home)
        assert covalent_server.pid in processes_with_home(covalent_server.home)
        url = f"{covalent_server.address}/api/v2/dispatches"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert "dispatches" in json.load(response)
        assert covalent_server.environment()["HOME"] == str(covalent_server.home)
        assert not any(key.startswith("COVALENT_") for key in covalent_server.environment())


class TestCleanup:
    def test_a_start_that_times_out_leaves_nothing_behind(self) -> None:
        server = CovalentServer(startup_timeout=0.5)
        with pytest.raises(LocalCloudError, match=r"did not finish within 0\.5 s"):
            server.start()
        assert server.state is Lifecycle.STOPPED
        home = server._home
        assert home is not None and not home.exists()
        assert wait_until(lambda: not processes_with_home(home), timeout=30)
        with pytest.raises(LocalCloudError, match="starts once"):
            server.start()

    def test_a_killed_owner_leaves_no_server_and_no_home(
        self, wait_process_gone: Callable[[int], bool]
    ) -> None:
        owner_code = (
            "import threading\n"
            "from covalent_gcpbatch_array.cli.covalent_server import CovalentServer\n"
            "server = CovalentServer().start()\n"
            "print(server.pid, server.home, flush=True)\n"
            "threading.Event().wait()\n"
        )
        owner = subprocess.Popen(
            [sys.executable, "-c", owner_code], stdout=subprocess.PIPE, text=True
        )
        try:
            assert owner.stdout is not None
            pid_text, home_text = owner.stdout.readline().split()
            server_pid, home = int(pid_text), Path(home_text)
            assert server_pid in processes_with_home(home)
        finally:
            os.kill(owner.pid, signal.SIGKILL)
            owner.communicate()
        assert wait_process_gone(server_pid)
        assert wait_until(lambda: not processes_with_home(home) and not home.exists())
