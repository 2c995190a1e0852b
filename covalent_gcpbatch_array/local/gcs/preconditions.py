"""Cloud Storage's request preconditions on objects, which fake-gcs-server mostly ignores.

Cloud Storage honours ``ifGenerationMatch``, ``ifGenerationNotMatch``, ``ifMetagenerationMatch``
and ``ifMetagenerationNotMatch`` on every object request (the Storage v1 discovery document:
``objects.insert``, ``get``, ``delete``, ``patch``, ``update``). fake-gcs-server honours only the
two generation ones, and only on multipart uploads: a media or resumable upload, a download, a
metadata read or a delete whose condition does not hold goes ahead there. The proxy checks them
here first (:class:`ObjectLocks` makes check-then-act atomic per object) and answers as Google
does: 412 ``conditionNotMet``, or 304 without a body for a read whose ``...NotMatch`` fails.
"""

from __future__ import annotations

import contextlib
import re
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import anyio

__all__ = [
    "NOT_MET_MESSAGE",
    "ObjectKey",
    "ObjectLocks",
    "ObjectState",
    "conditions_in",
    "failed_status",
    "is_final_chunk",
    "object_of",
    "unsupported",
]

#: Cloud Storage's message when a precondition does not hold (with reason ``conditionNotMet``).
NOT_MET_MESSAGE = "At least one of the pre-conditions you specified did not hold."
_NAMES = (
    "ifGenerationMatch",
    "ifGenerationNotMatch",
    "ifMetagenerationMatch",
    "ifMetagenerationNotMatch",
)
#: ``/storage/v1/b/B/o/NAME`` (metadata) and ``/download/storage/v1/b/B/o/NAME`` (media).
_OBJECT_PATH = re.compile(r"^(?:/download)?/storage/v1/b/([^/]+)/o/(.+)$")
_UPLOAD_PATH = re.compile(r"^/upload/storage/v1/b/([^/]+)/o$")


@dataclass(frozen=True)
class ObjectKey:
    """One object of one bucket."""

    bucket: str
    name: str

    def metadata_target(self) -> bytes:
        """The request target that reads this object's metadata."""
        quoted = (urllib.parse.quote(part, safe="") for part in (self.bucket, self.name))
        return "/storage/v1/b/{}/o/{}".format(*quoted).encode()


@dataclass(frozen=True)
class ObjectState:
    """What the preconditions compare: a live object's generation and metageneration."""

    generation: int
    metageneration: int


def conditions_in(query: str) -> dict[str, int]:
    """The preconditions a request's query string declares, by parameter name.

    :raises ValueError: a precondition that is not an integer (Google answers 400)
    """
    declared = {}
    for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if name in _NAMES:
            try:
                declared[name] = int(value)
            except ValueError:
                raise ValueError(f"Invalid value for {name}: {value!r} is not an integer") from None
    return declared


def unsupported(target: str) -> str | None:
    """Why the local cloud cannot check this request's preconditions, or None if it can.

    A compose, copy or rewrite (whose conditions name its source and destination), or a
    request on an object's older ``generation``, would be checked against the wrong object.
    """
    split = urllib.parse.urlsplit(target)
    params = {name for name, _ in urllib.parse.parse_qsl(split.query)}
    declared = {n for n in params if n.startswith(("ifGeneration", "ifMetageneration", "ifSource"))}
    if not declared:
        return None
    match = _OBJECT_PATH.match(split.path)
    if match is None or ("/" not in match[2] and "generation" not in params):
        return None
    return (
        f"{', '.join(sorted(declared))} on a compose, copy, rewrite or older generation "
        "is not supported by the local cloud"
    )


def object_of(method: str, target: str, upload_name: str | None) -> ObjectKey | None:
    """The object a request acts on, or None when it names no single object.

    :param target: the request target, undecoded
    :param upload_name: the name in an upload's metadata (multipart body or resumable start)
    """
    split = urllib.parse.urlsplit(target)
    if match := _OBJECT_PATH.match(split.path):
        if "/" in match[2]:  # a name's slashes are escaped: this is compose, rewriteTo, acl...
            return None
        return ObjectKey(urllib.parse.unquote(match[1]), urllib.parse.unquote(match[2]))
    if method in ("POST", "PUT") and (match := _UPLOAD_PATH.match(split.path)):
        named = dict(urllib.parse.parse_qsl(split.query)).get("name") or upload_name
        return ObjectKey(urllib.parse.unquote(match[1]), named) if named else None
    return None


def failed_status(method: str, conditions: Mapping[str, int], state: ObjectState | None) -> int:
    """The status Google answers when a condition does not hold against ``state``, else 0.

    :param state: the live object, or None if there is none (an upload creating it)
    """
    for name, wanted in conditions.items():
        if name == "ifGenerationMatch":
            held = wanted == (state.generation if state else 0)
        elif state is None:  # nothing to compare a metageneration or a "not" with: it fails
            held = False
        elif name == "ifGenerationNotMatch":
            held = state.generation != wanted
        elif name == "ifMetagenerationMatch":
            held = state.metageneration == wanted
        else:
            held = state.metageneration != wanted
        if not held:
            read = method in ("GET", "HEAD")
            return 304 if read and name.endswith("NotMatch") else 412
    return 0


def is_final_chunk(content_range: str) -> bool:
    """Whether a resumable upload's PUT completes it: its last bytes with the total, or an
    empty object's ``bytes */0`` (``bytes */N`` asks how far an upload got: not checked)."""
    return bool(re.fullmatch(r"bytes (?:\d+-\d+/\d+|\*/0)", content_range.strip()))


class ObjectLocks:
    """One lock per object name, held while a request checks a precondition and acts on it.

    A lock exists only while some request holds or awaits it, so the table stays small.
    """

    def __init__(self) -> None:
        self._locks: dict[ObjectKey, tuple[anyio.Lock, int]] = {}  # key -> (lock, users)

    @contextlib.asynccontextmanager
    async def hold(self, key: ObjectKey) -> AsyncIterator[None]:
        """Hold ``key``'s lock for the body of the ``async with``."""
        lock, users = self._locks.get(key, (anyio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)
