"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest

from covalent_gcpbatch_array.cli.covalent_server import CovalentServer
from covalent_gcpbatch_array.local import LocalCloud
from covalent_gcpbatch_array.local.process import process_gone
from tests.polling import wait_until

if TYPE_CHECKING:
    import google.cloud.storage as storage
    from google.cloud import batch_v1


@pytest.fixture
def anyio_backend() -> str:
    """Run async tests on asyncio, the loop the Covalent server uses; modules may override."""
    return "asyncio"


@pytest.fixture(scope="session")
def local_cloud() -> Iterator[LocalCloud]:
    """One LocalCloud for the whole session (default knobs, default fork-server preload).

    Shared: a test that changes its knobs with ``configure()`` restores them, and a test that
    plans faults (``fail_calls``/``fail_task``) uses them up or names its own job. Tests that
    need a cloud of their own make one with ``with LocalCloud(...)``.
    """
    with LocalCloud() as cloud:
        yield cloud


#: What the session's Covalent server adds to the cloud's settings in its config: quick polls
#: and a window that still gathers a few electrons started one by one by Covalent's dispatcher.
COVALENT_SERVER_SETTINGS = {"poll_freq": 0.3, "batch_window": 3.0, "batch_idle_gap": 1.5}


@pytest.fixture(scope="session")
def covalent_server(local_cloud: LocalCloud) -> Iterator[CovalentServer]:
    """One private Covalent server for the session (temporary HOME, free port), whose config
    points ``[executors.gcpbatch_array]`` at the session's local cloud.

    Started only by the tests that ask for it (about 5 to 30 s), stopped at the end.
    """
    settings = local_cloud.executor_config() | COVALENT_SERVER_SETTINGS
    with CovalentServer(executor_config=settings) as server:
        yield server


@pytest.fixture(scope="session")
def batch_client(local_cloud: LocalCloud) -> batch_v1.BatchServiceClient:
    """The real google-cloud-batch REST client, pointed at the session's local cloud."""
    return local_cloud.batch_client()


@pytest.fixture(scope="session")
def storage_client(local_cloud: LocalCloud) -> storage.Client:
    """The real google-cloud-storage client, pointed at the session's local cloud."""
    return local_cloud.storage_client()


@pytest.fixture(scope="session")
def wait_process_gone() -> Callable[[int], bool]:
    """A function that waits (up to 30 s) for a pid to disappear (True; else the test fails)."""
    return lambda pid: wait_until(lambda: process_gone(pid), what=f"process {pid} to end")
