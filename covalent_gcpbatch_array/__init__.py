"""Covalent executor that coalesces electrons into Google Cloud Batch array jobs.

``GCPBatchArrayExecutor`` imports covalent (seconds), so it is loaded on first use;
``LocalCloud`` lives in :mod:`covalent_gcpbatch_array.local`, which needs the ``[local]`` extra:
``pip install 'covalent-gcpbatch-array[local]'``.
"""

from __future__ import annotations

from importlib import metadata
from typing import TYPE_CHECKING, Any

from covalent_gcpbatch_array.config import ExecutorConfig, JobShape
from covalent_gcpbatch_array.exceptions import (
    BatchApiError,
    BatchLaunchError,
    CloudApiError,
    CoalescerClosedError,
    ConfigError,
    ElectronCancelledError,
    ElectronInputError,
    ElectronResultError,
    GCPBatchArrayError,
    LocalCloudError,
    RemoteTaskError,
    ResultIntegrityError,
    StorageError,
    TaskEnvironmentError,
    TaskInfrastructureError,
    TimeLimitExceeded,
)

if TYPE_CHECKING:
    from covalent_gcpbatch_array.gcpbatch_array import GCPBatchArrayExecutor

__version__ = metadata.version("covalent-gcpbatch-array")

__all__ = [
    "BatchApiError",
    "BatchLaunchError",
    "CloudApiError",
    "CoalescerClosedError",
    "ConfigError",
    "ElectronCancelledError",
    "ElectronInputError",
    "ElectronResultError",
    "ExecutorConfig",
    "GCPBatchArrayError",
    "GCPBatchArrayExecutor",
    "JobShape",
    "LocalCloudError",
    "RemoteTaskError",
    "ResultIntegrityError",
    "StorageError",
    "TaskEnvironmentError",
    "TaskInfrastructureError",
    "TimeLimitExceeded",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name == "GCPBatchArrayExecutor":
        from covalent_gcpbatch_array.gcpbatch_array import GCPBatchArrayExecutor

        return GCPBatchArrayExecutor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
