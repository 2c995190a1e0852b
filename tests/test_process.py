"""The local cloud's one parent-death rule (local/process.py), as its launchers use it."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable

import pytest

from covalent_gcpbatch_array.local.process import set_parent_death_signal


def test_a_spawned_child_dies_when_its_parent_is_sigkilled(
    wait_process_gone: Callable[[int], bool],
) -> None:
    script = textwrap.dedent(
        """
        import subprocess, threading
        from covalent_gcpbatch_array.local.process import spawn_process
        child = spawn_process(["sleep", "300"], stdout=subprocess.DEVNULL, stderr=None)
        print(child.pid, flush=True)
        threading.Event().wait()
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert wait_process_gone(child_pid)
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()  # type: ignore[union-attr]


def test_a_child_whose_parent_is_already_gone_gets_the_signal_at_once() -> None:
    """The parent may die before the child asks: the child must not live on as an orphan."""
    script = textwrap.dedent(
        """
        import signal, sys, time
        from covalent_gcpbatch_array.local.process import set_parent_death_signal
        set_parent_death_signal(signal.SIGTERM, parent_pid=int(sys.argv[1]))
        time.sleep(300)
        """
    )
    not_our_parent = 1  # what getppid() would not say if our parent were alive
    child = subprocess.run([sys.executable, "-c", script, str(not_our_parent)], timeout=120)
    assert child.returncode == -signal.SIGTERM


def test_the_signal_is_the_one_asked_for() -> None:
    script = textwrap.dedent(
        """
        import signal, sys
        from covalent_gcpbatch_array.local.process import set_parent_death_signal
        signal.signal(signal.SIGUSR1, lambda *_: sys.exit(42))
        set_parent_death_signal(signal.SIGUSR1, parent_pid=1)
        signal.pause()
        """
    )
    child = subprocess.run([sys.executable, "-c", script], timeout=120)
    assert child.returncode == 42


def test_a_refused_request_raises() -> None:
    """prctl with an invalid signal number fails: the caller hears it instead of an orphan."""
    with pytest.raises(OSError, match="PR_SET_PDEATHSIG"):
        set_parent_death_signal(999, parent_pid=1)
