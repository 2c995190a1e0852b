"""The one change made to covalent-gcpbatch-plugin 0.15.0 so that it talks to LocalCloud.

Copied into the original plugin's virtual environment as ``cga_seed_shim.py``, with a ``.pth``
line that imports it when any Python of that environment starts. With
``CGA_SEED_BATCH_ENDPOINT`` unset (the tasks, any other use) it does nothing. With it set (the
benchmark's executor process, the Covalent server), once ``covalent_gcpbatch_plugin.gcpbatch``
is imported, ``GCPBatchExecutor._get_batch_client`` returns the same
``batch_v1.BatchServiceAsyncClient`` (google-cloud-batch 0.9.0, gRPC) as the original, on an
insecure channel to the emulator's gRPC front end (``HOST:PORT``) instead of Google's endpoint
with default credentials. Like the original, a new client is made for every call.

Nothing else changes: storage goes through the plugin's own ``storage.Client()`` calls, pointed
at fake-gcs-server by ``STORAGE_EMULATOR_HOST``; the tasks run the plugin's own ``exec.py``.

Only the standard library at import time: this module runs in every Python of that environment.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

ENDPOINT_VARIABLE = "CGA_SEED_BATCH_ENDPOINT"
PLUGIN_MODULE = "covalent_gcpbatch_plugin.gcpbatch"


def grpc_batch_client(endpoint: str) -> Any:
    """The plugin's own ``batch_v1.BatchServiceAsyncClient``, on an insecure channel to
    ``endpoint`` (``HOST:PORT``) instead of Google's TLS endpoint with default credentials."""
    import grpc.aio
    from google.cloud import batch_v1
    from google.cloud.batch_v1.services.batch_service.transports import (
        BatchServiceGrpcAsyncIOTransport,
    )

    channel = grpc.aio.insecure_channel(endpoint)
    return batch_v1.BatchServiceAsyncClient(
        transport=BatchServiceGrpcAsyncIOTransport(channel=channel)
    )


def patch(module: ModuleType, endpoint: str) -> None:
    """Make the plugin's executor class build its Batch client for ``endpoint``."""
    module.GCPBatchExecutor._get_batch_client = staticmethod(
        functools.partial(grpc_batch_client, endpoint)
    )


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds the plugin's module as usual, and patches it right after it is executed."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != PLUGIN_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module
        endpoint = self.endpoint

        def exec_module(module: ModuleType) -> None:
            execute(module)
            patch(module, endpoint)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Patch the plugin when it is imported, if ``CGA_SEED_BATCH_ENDPOINT`` is set."""
    endpoint = os.environ.get(ENDPOINT_VARIABLE)
    if endpoint:
        sys.meta_path.insert(0, _PatchOnImport(endpoint))
