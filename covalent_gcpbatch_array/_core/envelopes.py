"""The bytes of the input, result and error objects, signed with HMAC-SHA256.

The objects in the bucket are executable pickles, so each one is an *envelope* that binds it
to its job's secret key and to its own place in the job::

    b"CGAE" | header length (4 bytes, big-endian) | header (UTF-8 JSON) | body | HMAC-SHA256 (32 bytes)

The MAC covers every byte before it. The header names the envelope's kind (input, result,
error), its job id and task index, so a valid object copied to another task's path, or a
result put where an error belongs, is refused too. The key is 32 random bytes per job, made by
the executor (:func:`new_job_key`); it reaches the task through the job definition's
environment, never through the bucket. Every ``decode_*`` verifies the MAC and the header
*before* unpickling anything; on failure it raises
:class:`~covalent_gcpbatch_array.exceptions.ResultIntegrityError` and unpickles nothing.

Bodies: the input is the cloudpickle of ``(fn, args, kwargs)``; the result, the cloudpickle of
the return value; the error, the cloudpickle of the exception when it survives a round trip
(else empty), with its type name, message and traceback text always in the header. Result and
error bodies start with what the task printed (stdout, then stderr; their lengths are in the
header), so the executor learns everything about a finished task from one download.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import importlib.metadata
import json
import secrets
import struct
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cloudpickle

from covalent_gcpbatch_array._core.contract import TaskRef
from covalent_gcpbatch_array.exceptions import (
    ElectronInputError,
    ElectronResultError,
    RemoteTaskError,
    ResultIntegrityError,
    TaskEnvironmentError,
)

__all__ = [
    "JOB_KEY_BYTES",
    "ElectronOrigin",
    "RuntimeVersions",
    "TaskFailure",
    "TaskInput",
    "TaskResult",
    "decode_error",
    "decode_input",
    "decode_result",
    "encode_error",
    "encode_input",
    "encode_result",
    "new_job_key",
    "parse_job_key",
]

#: Length of a job key, in bytes.
JOB_KEY_BYTES = 32
_MAGIC = b"CGAE"
_FORMAT = 1
_LENGTH = struct.Struct(">I")
_MAC_BYTES = hashlib.sha256().digest_size
_MIN_SIZE = len(_MAGIC) + _LENGTH.size + _MAC_BYTES
_INPUT, _RESULT, _ERROR = "input", "result", "error"


def new_job_key() -> bytes:
    """A fresh random key for one job."""
    return secrets.token_bytes(JOB_KEY_BYTES)


def parse_job_key(hex_text: str) -> bytes:
    """The key from its hex form (as the job's ``CGA_HMAC_KEY`` carries it).

    :raises ValueError: not 64 hex digits; the message does not repeat the value
    """
    try:
        key = bytes.fromhex(hex_text.strip())
    except ValueError:
        key = b""
    if len(key) != JOB_KEY_BYTES:
        raise ValueError(f"a job key must be {JOB_KEY_BYTES * 2} hex digits")
    return key


@dataclass(frozen=True)
class RuntimeVersions:
    """The versions a pickle by value depends on."""

    python: str  # "major.minor" of the interpreter
    covalent: str  # covalent's version, "" when it is not installed
    cloudpickle: str  # cloudpickle's version

    @classmethod
    def current(cls) -> RuntimeVersions:
        """The versions of this process (looked up once: every input envelope carries them,
        and reading covalent's package metadata costs about 0.5 ms of CPU a time)."""
        return _current_versions()


@functools.cache
def _current_versions() -> RuntimeVersions:
    try:
        covalent = importlib.metadata.version("covalent")
    except importlib.metadata.PackageNotFoundError:
        covalent = ""
    return RuntimeVersions(
        python=f"{sys.version_info.major}.{sys.version_info.minor}",
        covalent=covalent,
        cloudpickle=cloudpickle.__version__,
    )


@dataclass(frozen=True)
class ElectronOrigin:
    """The electron a task runs, for messages."""

    dispatch_id: str  # the Covalent dispatch id
    node_id: int  # the electron's node id in that dispatch
    name: str = ""  # the electron's function name, when known (for `gcpbatch-array tasks`)

    def __str__(self) -> str:
        return f"electron {self.node_id} of dispatch {self.dispatch_id}"


@dataclass(frozen=True)
class TaskInput:
    """A verified, unpickled input envelope."""

    fn: Callable[..., Any]  # the function to call (covalent's wrapper when from Covalent)
    args: tuple[Any, ...]  # its positional arguments
    kwargs: dict[str, Any]  # its keyword arguments
    origin: ElectronOrigin  # which electron this is
    versions: RuntimeVersions  # the executor's versions when it made the envelope


@dataclass(frozen=True)
class TaskResult:
    """A verified result envelope: what the user's function returned, and what it printed."""

    value: Any  # the return value
    stdout: str  # what the task printed on standard output
    stderr: str  # what the task printed on standard error


@dataclass(frozen=True)
class TaskFailure:
    """A verified error envelope: what the user's function raised in the task."""

    type_name: str  # module.qualname of the exception's type
    message: str  # str() of the exception
    traceback_text: str  # the remote traceback, formatted
    exception: BaseException | None  # the exception object, if it could be rebuilt here
    stdout: str = ""  # what the task printed on standard output
    stderr: str = ""  # what the task printed on standard error

    def to_exception(self) -> BaseException:
        """The original exception if it was rebuilt, else a :class:`RemoteTaskError`."""
        if self.exception is not None:
            return self.exception
        return RemoteTaskError(self.type_name, self.message, self.traceback_text)


def _seal(kind: str, task: TaskRef, key: bytes, header: dict[str, Any], *body: bytes) -> bytes:
    """The envelope of ``body``, given in parts (joined here, once)."""
    if len(key) != JOB_KEY_BYTES:
        raise ValueError(f"a job key must be {JOB_KEY_BYTES} bytes, not {len(key)}")
    header = {**header, "format": _FORMAT, "kind": kind, "job_id": task.job_id, "index": task.index}
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    head = b"".join((_MAGIC, _LENGTH.pack(len(header_bytes)), header_bytes))
    mac = hmac.new(key, head, hashlib.sha256)
    for part in body:  # bodies may be 100 MB: sign and join them without extra copies
        mac.update(part)
    return b"".join((head, *body, mac.digest()))


def _streams_header(stdout: bytes, stderr: bytes) -> dict[str, int]:
    return {"stdout_bytes": len(stdout), "stderr_bytes": len(stderr)}


def _open_with_streams(
    kind: str, task: TaskRef, key: bytes, data: bytes
) -> tuple[dict[str, Any], str, str, memoryview]:
    """Verify a result or error envelope; split its body into stdout, stderr and the pickle."""
    header, body = _open(kind, task, key, data)
    out_end = int(header.get("stdout_bytes", 0))
    err_end = out_end + int(header.get("stderr_bytes", 0))
    if not 0 <= out_end <= err_end <= len(body):
        raise ResultIntegrityError(
            f"the {kind} object of task {task.index} of job {task.job_id} has stream lengths "
            f"that do not fit its body; it was not unpickled"
        )
    stdout = bytes(body[:out_end]).decode(errors="replace")
    stderr = bytes(body[out_end:err_end]).decode(errors="replace")
    return header, stdout, stderr, body[err_end:]


def _open(kind: str, task: TaskRef, key: bytes, data: bytes) -> tuple[dict[str, Any], memoryview]:
    """Verify an envelope and return its header and its still pickled body."""
    what = f"the {kind} object of task {task.index} of job {task.job_id}"
    view = memoryview(data)
    if len(view) < _MIN_SIZE or view[: len(_MAGIC)] != _MAGIC:
        raise ResultIntegrityError(
            f"{what} is not an envelope written by covalent-gcpbatch-array (wrong size or "
            f"magic bytes); it was not unpickled"
        )
    signed, mac = view[:-_MAC_BYTES], view[-_MAC_BYTES:]
    if not hmac.compare_digest(mac, hmac.new(key, signed, hashlib.sha256).digest()):
        raise ResultIntegrityError(
            f"{what} failed its HMAC-SHA256 check: it was altered in the bucket, or written "
            f"with another job's key; it was not unpickled"
        )
    # From here on the bytes are the executor's or the runner's own: only mistakes remain.
    (header_length,) = _LENGTH.unpack_from(signed, len(_MAGIC))
    header_start = len(_MAGIC) + _LENGTH.size
    header_end = header_start + header_length
    try:
        if header_end > len(signed):
            raise ValueError("header longer than the object")
        header = json.loads(bytes(signed[header_start:header_end]))
        placed = (header["format"], header["kind"], header["job_id"], header["index"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ResultIntegrityError(f"{what} has an unreadable header ({exc})") from exc
    if placed != (_FORMAT, kind, task.job_id, task.index):
        raise ResultIntegrityError(
            f"{what} is signed for another place (format {placed[0]}, {placed[1]} of task "
            f"{placed[3]} of job {placed[2]}): it was copied or swapped; it was not unpickled"
        )
    return header, signed[header_end:]


def _name_unpicklable(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """Which part of an input that cloudpickle refused is at fault, for the message."""
    parts: list[tuple[str, object]] = [("the function", fn)]
    parts += [(f"positional argument {i}", arg) for i, arg in enumerate(args)]
    parts += [(f"keyword argument {name!r}", arg) for name, arg in kwargs.items()]
    for label, part in parts:
        try:
            cloudpickle.dumps(part)
        except Exception:
            return label
    return "the call as a whole"


def encode_input(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    key: bytes,
    task: TaskRef,
    origin: ElectronOrigin,
    versions: RuntimeVersions | None = None,
) -> bytes:
    """The signed input envelope of one electron (executor side).

    :param versions: the versions to record; this process's by default
    :raises ElectronInputError: cloudpickle cannot pickle the function or an argument
    """
    args, kwargs = tuple(args), dict(kwargs)
    try:
        body = cloudpickle.dumps((fn, args, kwargs))
    except Exception as exc:
        part = _name_unpicklable(fn, args, kwargs)
        raise ElectronInputError(
            f"{origin}: {part} cannot be pickled with cloudpickle ({type(exc).__name__}: {exc}), "
            f"so it cannot be sent to a Batch task; pass picklable values (no open files, "
            f"sockets, locks or clients) or create them inside the electron"
        ) from exc
    versions = versions or RuntimeVersions.current()
    header = {
        "python": versions.python,
        "covalent": versions.covalent,
        "cloudpickle": versions.cloudpickle,
        "dispatch_id": origin.dispatch_id,
        "node_id": origin.node_id,
    }
    return _seal(_INPUT, task, key, header, body)


def decode_input(
    data: bytes, *, key: bytes, task: TaskRef, runtime: RuntimeVersions | None = None
) -> TaskInput:
    """Verify and unpickle an input envelope (task side).

    The versions are compared before the body is unpickled: a pickle by value made by
    another Python minor version or another covalent version cannot be trusted to load.

    :param runtime: the versions of the task; this process's by default
    :raises ResultIntegrityError: the envelope does not verify; nothing was unpickled
    :raises TaskEnvironmentError: the versions differ, or the body cannot be unpickled here
    """
    header, body = _open(_INPUT, task, key, data)
    origin = ElectronOrigin(str(header["dispatch_id"]), int(header["node_id"]))
    sent = RuntimeVersions(
        str(header["python"]), str(header["covalent"]), str(header["cloudpickle"])
    )
    here = runtime or RuntimeVersions.current()
    if (sent.python, sent.covalent) != (here.python, here.covalent):
        raise TaskEnvironmentError(
            f"{origin} cannot run in this task image: the Covalent server runs Python "
            f"{sent.python} with covalent {sent.covalent or '(none)'}, the image has Python "
            f"{here.python} with covalent {here.covalent or '(none)'}; build the task image with "
            f"the server's versions (see runner_image/README.md: --build-arg PYTHON_VERSION="
            f"{sent.python} --build-arg COVALENT_VERSION={sent.covalent})"
        )
    try:
        fn, args, kwargs = cloudpickle.loads(body)
    except Exception as exc:
        raise TaskEnvironmentError(
            f"{origin} cannot be loaded in this task image ({type(exc).__name__}: {exc}); "
            f"install the modules it needs in the image (see runner_image/README.md) or use "
            f"DepsPip in the electron"
        ) from exc
    return TaskInput(fn, tuple(args), dict(kwargs), origin, sent)


def encode_result(
    value: Any, *, key: bytes, task: TaskRef, stdout: bytes = b"", stderr: bytes = b""
) -> bytes:
    """The signed result envelope of a return value and the task's streams (task side).

    :raises ElectronResultError: the value cannot be pickled
    """
    try:
        body = cloudpickle.dumps(value)
    except Exception as exc:
        raise ElectronResultError(
            f"the result of task {task.index} of job {task.job_id} cannot be pickled with "
            f"cloudpickle ({type(value).__qualname__}: {type(exc).__name__}: {exc}); return "
            f"picklable values (no open files, sockets, locks, generators or clients)"
        ) from exc
    return _seal(_RESULT, task, key, _streams_header(stdout, stderr), stdout, stderr, body)


def decode_result(data: bytes, *, key: bytes, task: TaskRef) -> TaskResult:
    """Verify and unpickle a result envelope (executor side).

    :raises ResultIntegrityError: the envelope does not verify; nothing was unpickled
    :raises ElectronResultError: it verifies but cannot be unpickled in this process
    """
    _, stdout, stderr, body = _open_with_streams(_RESULT, task, key, data)
    try:
        return TaskResult(cloudpickle.loads(body), stdout, stderr)
    except Exception as exc:
        raise ElectronResultError(
            f"the result of task {task.index} of job {task.job_id} cannot be unpickled on the "
            f"Covalent server ({type(exc).__name__}: {exc}); install on the server the modules "
            f"that define the returned objects, or return plain Python values"
        ) from exc


def _describe(exc: BaseException) -> tuple[str, str]:
    cls = type(exc)
    type_name = f"{cls.__module__}.{cls.__qualname__}"
    try:
        message = str(exc)
    except Exception as str_exc:
        message = f"<str() of the exception raised {type(str_exc).__name__}>"
    return type_name, message


def encode_error(
    exc: BaseException,
    *,
    key: bytes,
    task: TaskRef,
    traceback_text: str | None = None,
    stdout: bytes = b"",
    stderr: bytes = b"",
) -> bytes:
    """The signed error envelope of an exception and the task's streams (task side).

    The exception object goes in only if it pickles *and* unpickles (an exception whose
    ``__init__`` needs other arguments than ``args`` pickles fine but cannot be rebuilt);
    otherwise the executor gets a :class:`RemoteTaskError` with the type, message and traceback.

    :param traceback_text: the traceback to send; formatted from ``exc`` by default
    """
    type_name, message = _describe(exc)
    if traceback_text is None:
        traceback_text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    body, problem = b"", ""
    try:
        pickled = cloudpickle.dumps(exc)
        cloudpickle.loads(pickled)
        body = pickled
    except Exception as pickle_exc:
        problem = f"{type(pickle_exc).__name__}: {pickle_exc}"
    header = {
        "type_name": type_name,
        "message": message,
        "traceback": traceback_text,
        "pickle_problem": problem,
        **_streams_header(stdout, stderr),
    }
    return _seal(_ERROR, task, key, header, stdout, stderr, body)


def decode_error(data: bytes, *, key: bytes, task: TaskRef) -> TaskFailure:
    """Verify an error envelope and rebuild the exception if this process can.

    :raises ResultIntegrityError: the envelope does not verify; nothing was unpickled
    """
    header, stdout, stderr, body = _open_with_streams(_ERROR, task, key, data)
    exception: BaseException | None = None
    if body:
        try:
            loaded = cloudpickle.loads(body)
        except Exception:
            loaded = None  # e.g. its class lives in a module only the task image has
        if isinstance(loaded, BaseException):
            exception = loaded
    return TaskFailure(
        type_name=str(header["type_name"]),
        message=str(header["message"]),
        traceback_text=str(header["traceback"]),
        exception=exception,
        stdout=stdout,
        stderr=stderr,
    )
