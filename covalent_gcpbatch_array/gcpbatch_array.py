"""Covalent plugin module: ``GCPBatchArrayExecutor``, short name ``gcpbatch_array``.

Each electron's ``run()`` joins the process's coalescer, uploads its input while its batch is
open, and waits for its own task of the batch's array job; see :mod:`._core.runtime` and
:mod:`._core.job_monitor` for what happens in between.
"""

from __future__ import annotations

import sys

if "covalent" not in sys.modules:
    # Covalent's first import loads every executor plugin through its entry point, this module
    # among them. Imported from here, half-way through this module, it would find no plugin
    # class: Covalent would warn that the module "does not seem to have a well-defined plugin
    # class" and leave ct.executor.GCPBatchArrayExecutor unset for the whole process. So this
    # module steps out of sys.modules while covalent loads: the loader imports a whole copy,
    # and the import system hands that copy to whoever imported this one (an import returns
    # what sys.modules holds when the module's code ends).
    _half_made = sys.modules.pop(__name__)
    import covalent  # noqa: F401

    sys.modules.setdefault(__name__, _half_made)  # kept when covalent loaded no plugins

import contextlib
import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

import anyio
from covalent._shared_files.config import get_config
from covalent._shared_files.exceptions import TaskCancelledError, TaskRuntimeError
from covalent._shared_files.util_classes import RESULT_STATUS
from covalent.executor.base import AsyncBaseExecutor
from covalent.executor.schemas import TaskUpdate

from covalent_gcpbatch_array._core import compat
from covalent_gcpbatch_array._core.coalescer import Member
from covalent_gcpbatch_array._core.contract import TaskRef
from covalent_gcpbatch_array._core.envelopes import ElectronOrigin, encode_input
from covalent_gcpbatch_array._core.outcome import ElectronOutcome
from covalent_gcpbatch_array._core.runtime import ExecutorRuntime
from covalent_gcpbatch_array._core.storage import AsyncTaskStore
from covalent_gcpbatch_array.config import DEFAULTS, ExecutorConfig, resolve_config

# `covalent deploy up gcpbatch_array` looks these two models up on the plugin module.
from covalent_gcpbatch_array.deploy import ExecutorInfraDefaults, ExecutorPluginDefaults
from covalent_gcpbatch_array.exceptions import (
    ConfigError,
    ElectronCancelledError,
    ElectronInputError,
    GCPBatchArrayError,
)

__all__ = [
    "EXECUTOR_PLUGIN_NAME",
    "ExecutorInfraDefaults",
    "ExecutorPluginDefaults",
    "GCPBatchArrayExecutor",
]

EXECUTOR_PLUGIN_NAME = "GCPBatchArrayExecutor"

#: Written by Covalent into ``[executors.gcpbatch_array]`` of its config file.
_EXECUTOR_PLUGIN_DEFAULTS = copy.deepcopy(DEFAULTS)


def _read_config_file(key: str) -> Any:
    return get_config(f"executors.gcpbatch_array.{key}")


#: The original plugin's keys: always attributes of the executor itself.
_ORIGINAL_KEYS = tuple(DEFAULTS)[:11]
#: The other keys' validated defaults, held by the class: an executor holds only those that
#: differ. Its attributes then stay within the 30 keys CPython shares between the instance
#: dicts of a class (34 would give every executor a dict of its own: 1.6 KB against 0.3 KB).
_CLASS_DEFAULTS = {
    key: value
    for key, value in dataclasses.asdict(
        ExecutorConfig.from_values(DEFAULTS, require=False)
    ).items()
    if key not in _ORIGINAL_KEYS and key != "labels"
}


def _is_class_default(key: str, value: Any) -> bool:
    if key not in _CLASS_DEFAULTS:
        return False
    default = _CLASS_DEFAULTS[key]
    return type(value) is type(default) and value == default


class GCPBatchArrayExecutor(AsyncBaseExecutor):
    """Runs electrons as tasks of shared Google Cloud Batch array jobs.

    Every keyword can also be set under ``[executors.gcpbatch_array]`` in the Covalent config
    file; a value given here wins, then the config file, then the default. See the README for
    every key.

    :raises ConfigError: a required key is missing or a value is invalid; the message names
        the key and how to set it
    """

    def __init__(
        self,
        project_id: str | None = None,
        region: str | None = None,
        bucket_name: str | None = None,
        container_image_uri: str | None = None,
        service_account_email: str | None = None,
        vcpus: float | None = None,
        memory: int | None = None,
        retries: int | None = None,
        time_limit: float | None = None,
        poll_freq: float | None = None,
        cache_dir: str | None = None,
        *,
        batch_window: float | None = None,
        batch_idle_gap: float | None = None,
        max_tasks_per_job: int | None = None,
        graph_aware: bool | None = None,
        batch_api_endpoint: str | None = None,
        storage_api_endpoint: str | None = None,
        machine_type: str | None = None,
        provisioning_model: str | None = None,
        accelerator_type: str | None = None,
        accelerator_count: int | None = None,
        boot_disk_size_gb: int | None = None,
        network: str | None = None,
        subnetwork: str | None = None,
        labels: dict[str, str] | None = None,
        task_count_per_node: int | None = None,
        parallelism: int | None = None,
        bucket_prefix: str | None = None,
        keep_objects: bool | None = None,
        queue_timeout: float | None = None,
        orphan_timeout: float | None = None,
        upload_timeout: float | None = None,
        log_stdout: str = "",
        log_stderr: str = "",
    ) -> None:
        explicit = {key: value for key, value in locals().items() if key in DEFAULTS}
        values = resolve_config(explicit, _read_config_file)
        # A missing required key is the user's error, raised here where they wrote it. Only
        # inside Covalent's server may one be empty: its executor manager builds every executor
        # from the server's config file, then copies the client's attributes in (`from_dict`);
        # `run()` checks them then.
        config = ExecutorConfig.from_values(values, require=not compat.in_covalent_server())
        super().__init__(
            log_stdout=log_stdout,
            log_stderr=log_stderr,
            cache_dir=config.cache_dir,
            time_limit=config.time_limit,
            retries=config.retries,
        )
        # Plain attributes: Covalent copies them (to_dict / from_dict) to the server. Those
        # the class holds (see _CLASS_DEFAULTS) are set only where they differ.
        for key in DEFAULTS:
            value = getattr(config, key)
            if not _is_class_default(key, value):
                setattr(self, key, dict(value) if key == "labels" else value)

    def to_dict(self) -> dict[str, Any]:
        """Covalent's copy of this executor: every key, those left at the class's too."""
        data: dict[str, Any] = super().to_dict()
        attributes = data["attributes"]
        for key, value in _CLASS_DEFAULTS.items():
            attributes.setdefault(key, value)
        return data

    @property
    def config(self) -> ExecutorConfig:
        """This executor's validated configuration."""
        return ExecutorConfig.from_values({key: getattr(self, key) for key in DEFAULTS})

    async def run(
        self, function: Any, args: list[Any], kwargs: dict[str, Any], task_metadata: dict[str, Any]
    ) -> Any:
        """Run one electron as a task of a shared array job and return its result.

        :raises TaskRuntimeError: the electron failed; ``__cause__`` is the function's own
            exception, or a :class:`GCPBatchArrayError` that says what went wrong
        :raises TaskCancelledError: the electron was cancelled
        """
        origin = _origin(task_metadata, _name(function))
        try:
            config = self.config
        except ConfigError as exc:
            raise TaskRuntimeError(f"{origin} failed: {exc}") from exc
        if problem := _bad_call(function, args, kwargs):
            # Refused before it takes a slot in a job: a task could only fail the same way.
            error = ElectronInputError(f"{origin}: {problem}")
            self._print(f"{origin} failed: {error}\n", stream="stderr")
            raise TaskRuntimeError(f"{origin} failed: {error}") from error
        if await self._cancel_requested():
            raise TaskCancelledError(f"{origin} was cancelled before it was submitted")
        service = await ExecutorRuntime.current()
        member = service.join(config, origin)
        uploading = False  # once True, the input may be in the bucket
        try:
            with member:
                ref = TaskRef(member.batch_id, member.index)
                await self._set_job_handle({"job_id": ref.job_id, "task_index": ref.index})
                # ct.cancel reads the job handles right after it flags the electrons: one
                # flagged before our handle was stored is not cancelled through cancel().
                if await self._cancel_requested():
                    raise ElectronCancelledError(f"{origin} was cancelled before it was submitted")
                store = service.clients.store(config)
                # Encoded only once it can be sent: a burst of thousands of electrons holds a
                # few dozen encoded inputs (and upload tasks) at a time, not thousands.
                async with store.input_slots:
                    if not member.done:  # not cancelled or withdrawn while it waited
                        member.set_uploading()  # upload_timeout counts from here
                        data = encode_input(
                            function,
                            tuple(args),
                            kwargs,
                            key=service.job_key(member),
                            task=ref,
                            origin=origin,
                        )
                        uploading = True
                        await _upload_unless_withdrawn(store, ref, data, member)
                        del data
                member.set_ready()
                outcome = await member.wait()
        except ElectronCancelledError as exc:
            raise TaskCancelledError(str(exc)) from exc
        except Exception as exc:
            # Every error reaches Covalent as a TaskRuntimeError with its cause; ours say what
            # went wrong, anything else is named by its type.
            text = str(exc) if isinstance(exc, GCPBatchArrayError) else f"{exc!r}"
            self._print(f"{origin} failed: {text}\n", stream="stderr")
            raise TaskRuntimeError(f"{origin} failed: {text}") from exc
        finally:
            service.leave(member)
            if uploading:
                await service.discard_unlaunched(config, member)
        return self._deliver(outcome)

    def _deliver(self, outcome: ElectronOutcome) -> Any:
        """Hand the task's streams to Covalent, then return its result or raise its error."""
        self._print(outcome.stdout, stream="stdout")
        self._print(outcome.stderr, stream="stderr")
        if outcome.error is not None:
            self._print(outcome.traceback_text, stream="stderr")
            raise TaskRuntimeError(outcome.traceback_text) from outcome.error
        return outcome.result

    def _print(self, text: str, *, stream: str) -> None:
        target = self.task_stdout if stream == "stdout" else self.task_stderr
        if target is not None and text:
            print(text, end="", file=target)

    async def cancel(self, task_metadata: dict[str, Any], job_handle: Any) -> bool:
        """Cancel one electron: its task skips or stops; its job-mates are untouched.

        Writes the task's ``cancelled`` marker (a pending task then skips, a running one
        stops within seconds) and wakes the electron's ``run()``; the job is deleted once
        none of its electrons is still waiting.

        :return: True once the cancellation is recorded, False without a job handle
        """
        if not isinstance(job_handle, dict) or "job_id" not in job_handle:
            return False
        ref = TaskRef(str(job_handle["job_id"]), int(job_handle["task_index"]))
        await ExecutorRuntime.cancel_task(self.config, ref)
        return True

    async def receive(self, task_group_metadata: dict[str, Any], data: Any) -> list[TaskUpdate]:
        """Report electrons that ``ct.cancel`` stopped before they were submitted: CANCELLED.

        Covalent 0.240's dispatcher calls ``receive(metadata, None)`` for them, even on an
        executor without managed execution (whose other electrons never come here); the base
        class would raise ``NotImplementedError`` and mark them FAILED.
        """
        if data is not None:
            raise NotImplementedError(
                "GCPBatchArrayExecutor does not use Covalent's managed execution (send/poll)"
            )
        return [
            TaskUpdate(
                dispatch_id=task_group_metadata["dispatch_id"],
                node_id=node_id,
                status=RESULT_STATUS.CANCELLED,
                assets={},
            )
            for node_id in task_group_metadata["node_ids"]
        ]

    # Covalent's runtime hooks exist only when Covalent's runner drives the executor.

    def _in_covalent_runtime(self) -> bool:
        # Not `in self.__dict__`: reading it gives every executor a dict object of its own.
        return getattr(self, "_send_queue", None) is not None

    async def _cancel_requested(self) -> bool:
        return bool(self._in_covalent_runtime() and await self.get_cancel_requested())

    async def _set_job_handle(self, handle: dict[str, Any]) -> None:
        if self._in_covalent_runtime():
            await self.set_job_handle(handle)


for _key, _default in _CLASS_DEFAULTS.items():
    setattr(GCPBatchArrayExecutor, _key, _default)


def _name(function: Any) -> str:
    """The electron's function name: Covalent passes a partial over its TransportableObject."""
    wrapped = getattr(function, "args", None)
    attrs = getattr(wrapped[0], "attrs", None) if isinstance(wrapped, tuple) and wrapped else None
    if isinstance(attrs, dict) and attrs.get("name"):
        return str(attrs["name"])
    return str(getattr(function, "__name__", ""))


async def _upload_unless_withdrawn(
    store: AsyncTaskStore, ref: TaskRef, data: bytes, member: Member[ElectronOutcome]
) -> None:
    """Upload the input, giving up as soon as the batch withdraws the member (too slow).

    Giving up stops the upload's retries at once and waits for an attempt in flight: nothing
    writes the input after this returns, so ``run()``'s clean-up deletes whatever landed.

    :raises StorageError: the upload failed (raised as itself, not in an exception group)
    """
    failed: list[Exception] = []
    async with anyio.create_task_group() as tg:

        async def upload() -> None:
            try:
                await store.upload_input(ref, data)
            except Exception as exc:
                failed.append(exc)
            tg.cancel_scope.cancel()

        tg.start_soon(upload)
        # Before set_ready() the member is settled only by leaving: withdrawn or cancelled.
        with contextlib.suppress(Exception):  # its error is raised by member.wait() later
            await member.wait()
        tg.cancel_scope.cancel()
    if failed:
        raise failed[0]


def _origin(task_metadata: Mapping[str, Any], name: str) -> ElectronOrigin:
    """The electron named by Covalent's ``task_metadata``.

    :raises TaskRuntimeError: the metadata is not what Covalent passes (e.g. a node id "1/2")
    """
    try:
        node_id = task_metadata["node_id"]
        if isinstance(node_id, bool) or not isinstance(node_id, int | str):
            raise TypeError(f"node_id is a {type(node_id).__name__}")
        return ElectronOrigin(str(task_metadata["dispatch_id"]), int(node_id), name)
    except (KeyError, TypeError, ValueError) as exc:
        raise TaskRuntimeError(
            "run() needs task_metadata with a dispatch_id and an integer node_id, as Covalent "
            f"passes them; got {dict(task_metadata)!r} ({type(exc).__name__}: {exc})"
        ) from exc


def _bad_call(function: Any, args: Any, kwargs: Any) -> str:
    """What makes a call impossible to run anywhere, or "" when nothing does."""
    if not callable(function):
        return (
            f"its function is a {type(function).__name__}, which cannot be called; pass the "
            "electron's function to run()"
        )
    if not isinstance(args, list | tuple):
        return f"its positional arguments must be a list or tuple, not a {type(args).__name__}"
    if not isinstance(kwargs, Mapping) or not all(isinstance(name, str) for name in kwargs):
        return "its keyword arguments must be a mapping of argument names (str) to values"
    return ""
