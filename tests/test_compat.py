"""The shim over other libraries' private attributes works with the libraries installed.

Each test fails if an upgrade renames or removes what :mod:`covalent_gcpbatch_array._core.compat`
reaches for: fix the shim, nothing else.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from google.api_core import exceptions as api_exceptions
from google.api_core.retry import Retry
from google.auth.credentials import AnonymousCredentials
from google.cloud.storage.retry import DEFAULT_RETRY

from covalent_gcpbatch_array._core import compat
from covalent_gcpbatch_array._core.clients import make_storage_client
from covalent_gcpbatch_array.local import LocalCloud


def test_storage_credentials() -> None:
    client = make_storage_client("p", "http://127.0.0.1:9")
    try:
        assert isinstance(compat.storage_credentials(client), AnonymousCredentials)
    finally:
        client.close()


def test_retry_predicate() -> None:
    def predicate(exc: Exception) -> bool:
        return isinstance(exc, KeyError)

    assert compat.retry_predicate(Retry(predicate=predicate)) is predicate
    judge = compat.retry_predicate(DEFAULT_RETRY)
    assert judge(api_exceptions.ServiceUnavailable("try again"))
    assert not judge(api_exceptions.NotFound("gone"))


def test_the_interpreter_steps_the_fork_server_replays(tmp_path: Path) -> None:
    """Run a module as `-m` does, join its threads, run its exit handlers: in a child."""
    (tmp_path / "compat_probe.py").write_text(
        textwrap.dedent(
            """
            import atexit, sys, threading

            started, done = threading.Event(), []
            def work():
                started.wait()
                done.append("thread joined")
            threading.Thread(target=work).start()
            atexit.register(lambda: print("exit handler ran", flush=True))
            print(__name__, sys.modules["__main__"].__dict__ is globals(), flush=True)
            """
        )
    )
    script = textwrap.dedent(
        """
        import os, sys
        from covalent_gcpbatch_array._core import compat

        compat.run_module_as_main("compat_probe")
        probe = sys.modules["__main__"]
        probe.started.set()
        compat.join_non_daemon_threads()
        print(*probe.done, flush=True)
        compat.run_exit_handlers()
        os._exit(0)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["__main__ True", "thread joined", "exit handler ran"]


def test_in_covalent_server(tmp_path: Path) -> None:
    """False until the dispatcher is imported and the server's startup gives it its queue."""
    script = textwrap.dedent(
        """
        import inspect
        from covalent_gcpbatch_array._core import compat

        assert not compat.in_covalent_server()  # the dispatcher is not even imported
        from covalent_dispatcher._core import dispatcher
        from covalent_dispatcher._service import app

        assert dispatcher._global_status_queue is None
        assert not compat.in_covalent_server()
        startup = inspect.getsource(app.lifespan)
        assert "core_dispatcher._global_status_queue = asyncio.Queue()" in startup, startup
        dispatcher._global_status_queue = object()
        assert compat.in_covalent_server()
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        # Covalent writes its config and database under HOME: a temporary one.
        env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr


def test_give_task_streams() -> None:
    """Covalent's execute() sets the buffers its public task_stdout/task_stderr read."""
    import inspect

    from covalent.executor.base import AsyncBaseExecutor

    from covalent_gcpbatch_array.gcpbatch_array import GCPBatchArrayExecutor

    execute = inspect.getsource(AsyncBaseExecutor.execute)
    assert "self._task_stdout = io.StringIO()" in execute, execute
    assert "self._task_stderr = io.StringIO()" in execute, execute
    executor = GCPBatchArrayExecutor(
        project_id="my-project", bucket_name="my-bucket", container_image_uri="runner:1"
    )
    stdout, stderr = compat.give_task_streams(executor)
    assert (executor.task_stdout, executor.task_stderr) == (stdout, stderr)


def test_batch_rest_session(local_cloud: LocalCloud) -> None:
    from google.auth.transport.requests import AuthorizedSession
    from google.cloud import batch_v1

    session, host = compat.batch_rest_session(local_cloud.batch_client())
    assert isinstance(session, AuthorizedSession)
    assert isinstance(session.credentials, AnonymousCredentials)
    assert host == local_cloud.batch_endpoint.rstrip("/")
    # Google's own endpoint keeps its scheme: the same URL the client's own requests go to.
    google = batch_v1.BatchServiceClient(transport="rest", credentials=AnonymousCredentials())
    assert compat.batch_rest_session(google)[1] == "https://batch.googleapis.com"
    with pytest.raises(TypeError, match="REST"):
        compat.batch_rest_session(local_cloud.batch_grpc_client())
