"""The private attributes of other libraries this package needs, in one place.

Each function below reaches into a library where no public API does the job; everything else
uses public APIs only. ``tests/test_compat.py`` calls each against the installed libraries,
so an upgrade that moves one of them fails there, loudly, instead of somewhere downstream.

- google-cloud-storage: a client's credentials (to name the account in a permission error);
- google-cloud-batch: a REST client's authorized session and endpoint (to list task states
  without its per-task protobuf conversion, :mod:`.task_states`);
- google-api-core: a ``Retry``'s predicate (to judge the calls of a batch request as the
  client would judge a request of their own);
- covalent: the per-task output buffers of an executor, which Covalent's ``execute()`` sets
  before it calls ``run()`` (for the benchmarks and tests that call ``run()`` themselves);
- covalent-dispatcher: whether this process is a running Covalent server (the server's startup
  sets its dispatcher's ``_global_status_queue``; no public flag says so);
- the standard library (the Batch emulator's fork server, which runs a task's module in a
  forked child as ``python -m`` would): :mod:`runpy`'s ``-m`` entry point, and the steps of
  interpreter shutdown that :mod:`threading` and :mod:`atexit` run.
"""

from __future__ import annotations

import atexit
import io
import runpy
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import google.cloud.storage as storage
    from covalent.executor.base import AsyncBaseExecutor
    from google.api_core.retry import Retry
    from google.auth.credentials import Credentials
    from google.auth.transport.requests import AuthorizedSession
    from google.cloud import batch_v1

__all__ = [
    "batch_rest_session",
    "give_task_streams",
    "in_covalent_server",
    "join_non_daemon_threads",
    "retry_predicate",
    "run_exit_handlers",
    "run_module_as_main",
    "storage_credentials",
]


def storage_credentials(client: storage.Client) -> Credentials:
    """The credentials a Cloud Storage client sends (``Client._credentials``)."""
    credentials: Credentials = client._credentials
    return credentials


def batch_rest_session(client: batch_v1.BatchServiceClient) -> tuple[AuthorizedSession, str]:
    """A REST Batch client's session and endpoint URL (``transport._session``, ``._host``).

    The session carries the client's credentials (anonymous for an ``http://`` endpoint), its
    mTLS setting and its connection pool; the URL has its scheme (``https://batch.googleapis.com``).

    :raises TypeError: ``client`` does not speak REST
    """
    from google.cloud.batch_v1.services.batch_service.transports.rest import (
        BatchServiceRestTransport,
    )

    transport = client.transport
    if not isinstance(transport, BatchServiceRestTransport):
        raise TypeError(f"a REST BatchServiceClient is needed, not one over {transport.kind}")
    return transport._session, transport._host


def retry_predicate(retry: Retry) -> Callable[[Exception], Any]:
    """The predicate a ``google.api_core.retry.Retry`` retries on (``Retry._predicate``)."""
    predicate: Callable[[Exception], Any] = retry._predicate
    return predicate


def give_task_streams(executor: AsyncBaseExecutor) -> tuple[io.StringIO, io.StringIO]:
    """Give ``executor`` fresh stdout and stderr buffers for its task, and return them.

    Covalent's ``AsyncBaseExecutor.execute()`` sets ``_task_stdout`` and ``_task_stderr`` before
    it calls ``run()`` (the public ``task_stdout`` and ``task_stderr`` only read them); a caller
    of ``run()`` outside Covalent does it here.
    """
    streams = io.StringIO(), io.StringIO()
    executor._task_stdout, executor._task_stderr = streams
    return streams


def in_covalent_server() -> bool:
    """Whether this process is a running Covalent server (its dispatcher has started).

    The server's startup (``covalent_dispatcher._service.app``'s lifespan) gives the dispatcher
    its status queue, ``covalent_dispatcher._core.dispatcher._global_status_queue``, which is
    ``None`` until then. Only an already imported module is looked at: importing Covalent's
    dispatcher elsewhere would create its database file.
    """
    dispatcher = sys.modules.get("covalent_dispatcher._core.dispatcher")
    return getattr(dispatcher, "_global_status_queue", None) is not None


def run_module_as_main(module: str) -> None:
    """Run ``module`` as ``python -m module`` does: in ``sys.modules["__main__"]`` itself.

    ``runpy.run_module(module, run_name="__main__", alter_sys=True)`` runs it in a temporary
    module instead, and puts the old ``__main__`` back when it returns.
    """
    runpy._run_module_as_main(module)  # type: ignore[attr-defined]


def join_non_daemon_threads() -> None:
    """Wait for the non-daemon threads, as the interpreter does first when it shuts down."""
    shutdown: Callable[[], None] = threading._shutdown  # type: ignore[attr-defined]
    shutdown()


def run_exit_handlers() -> None:
    """Run (and clear) the :mod:`atexit` handlers, as the interpreter does when it shuts down."""
    atexit._run_exitfuncs()
