"""The exceptions this package raises.

Every error says what went wrong and how to fix it, and names the configuration key or the
electron it is about. The hierarchy::

    GCPBatchArrayError
    ├── ConfigError                 a missing or bad configuration value (also a ValueError)
    ├── ElectronInputError          an electron's call cannot be sent to a task (not a call, or
    │                               its function or arguments cannot be pickled)
    ├── ElectronResultError         an electron's return value cannot be sent back (unpicklable
    │                               in the task, or not loadable on the Covalent server)
    ├── CloudApiError               Google Batch or Cloud Storage refused or failed a request
    │   ├── BatchApiError           ... the Batch API (quota, permission, bad job definition)
    │   └── StorageError            ... Cloud Storage (missing bucket, permission)
    ├── TaskInfrastructureError     a task ended without writing a result or an error
    │   └── TimeLimitExceeded       ... because it ran past `time_limit`
    ├── RemoteTaskError             the user's function raised, and its exception could not be
    │                               rebuilt here (unpicklable); carries type, message, traceback
    ├── TaskEnvironmentError        the task image does not match the server (Python, covalent)
    ├── ResultIntegrityError        an object in the bucket failed its integrity check
    ├── ElectronCancelledError      the electron was cancelled before its result arrived
    ├── BatchLaunchError            the code that runs the electron's batch failed (cause chained)
    ├── CoalescerClosedError        the executor shut down before the electron ran
    └── LocalCloudError             the local cloud (Batch emulator, fake-gcs-server) failed

A user function that raises an ordinary (picklable) exception is not wrapped in any of these:
the executor raises covalent's ``TaskRuntimeError`` chained to the original exception object.
"""

from __future__ import annotations

import functools

__all__ = [
    "BatchApiError",
    "BatchLaunchError",
    "CloudApiError",
    "CoalescerClosedError",
    "ConfigError",
    "ElectronCancelledError",
    "ElectronInputError",
    "ElectronResultError",
    "GCPBatchArrayError",
    "LocalCloudError",
    "RemoteTaskError",
    "ResultIntegrityError",
    "StorageError",
    "TaskEnvironmentError",
    "TaskInfrastructureError",
    "TimeLimitExceeded",
]


class GCPBatchArrayError(Exception):
    """Base class of every error raised by covalent-gcpbatch-array."""


class ConfigError(GCPBatchArrayError, ValueError):
    """A configuration value is missing or invalid.

    :param key: the configuration key at fault
    :param problem: what is wrong with it
    :param hint: how to fix it (defaults to the two ways of setting a key)
    """

    def __init__(self, key: str, problem: str, hint: str | None = None) -> None:
        self.key = key
        self.problem = problem
        if hint is None:
            hint = (
                f"pass {key}=... to GCPBatchArrayExecutor(...), or set {key} under "
                f"[executors.gcpbatch_array] in the Covalent config file"
            )
        self.hint = hint
        super().__init__(f"gcpbatch_array config key {key!r}: {problem}; fix: {hint}")

    def __reduce__(self) -> tuple[object, ...]:
        return type(self), (self.key, self.problem, self.hint)


class ElectronInputError(GCPBatchArrayError):
    """An electron's call cannot be sent to a task: its function or arguments cannot be pickled,
    or it is not a call at all (the function is not callable, the arguments are malformed)."""


class ElectronResultError(GCPBatchArrayError):
    """An electron's return value cannot be sent back: the task cannot pickle it, or the
    Covalent server cannot unpickle it (a module the result needs is missing there)."""


class CloudApiError(GCPBatchArrayError):
    """A Google Cloud API refused or failed a request, after the retries allowed."""


class BatchApiError(CloudApiError):
    """The Google Batch API refused or failed a request."""


class StorageError(CloudApiError):
    """Cloud Storage refused or failed a request."""


class TaskInfrastructureError(GCPBatchArrayError):
    """A task ended without a result or an error from the user's function.

    Preemption, a lost VM, a killed process or an exhausted retry budget end here. The message
    carries Batch's status events and the last exit code.

    :param message: what happened
    :param exit_code: the task's last exit code, if Batch reported one
    :param events: Batch's status event descriptions for the task, oldest first
    """

    def __init__(
        self, message: str, *, exit_code: int | None = None, events: tuple[str, ...] = ()
    ) -> None:
        self.reason = message
        self.exit_code = exit_code
        self.events = events
        detail = "".join(f"\n  - {event}" for event in events)
        super().__init__(message + (f"\nBatch status events:{detail}" if detail else ""))

    def __reduce__(self) -> tuple[object, ...]:
        rebuild = functools.partial(type(self), exit_code=self.exit_code, events=self.events)
        return rebuild, (self.reason,)


class TimeLimitExceeded(TaskInfrastructureError):
    """A task ran past the executor's ``time_limit`` and Batch stopped it."""


class RemoteTaskError(GCPBatchArrayError):
    """The user's function raised an exception that could not be sent back as an object.

    :param type_name: the qualified name of the original exception type
    :param message: ``str()`` of the original exception
    :param traceback_text: the remote traceback
    """

    def __init__(self, type_name: str, message: str, traceback_text: str = "") -> None:
        self.type_name = type_name
        self.message = message
        self.traceback_text = traceback_text
        super().__init__(f"{type_name}: {message}")

    def __reduce__(self) -> tuple[object, ...]:
        return type(self), (self.type_name, self.message, self.traceback_text)


class TaskEnvironmentError(GCPBatchArrayError):
    """The task image cannot run this electron (Python or covalent version differ, ...)."""


class ResultIntegrityError(GCPBatchArrayError):
    """An object read from the bucket failed its integrity check and was not unpickled."""


class ElectronCancelledError(GCPBatchArrayError):
    """The electron was cancelled before its result arrived."""


class BatchLaunchError(GCPBatchArrayError):
    """The launch code of the electron's batch failed; the cause is chained."""


class CoalescerClosedError(GCPBatchArrayError):
    """The coalescer was torn down (the executor is shutting down) before the electron ran."""


class LocalCloudError(GCPBatchArrayError):
    """The local cloud (fake-gcs-server or the Batch emulator) failed to start or answer."""
