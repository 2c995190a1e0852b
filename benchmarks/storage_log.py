"""Counting Cloud Storage operations from fake-gcs-server's request log.

Both sides touch the bucket: the executor (inputs, results, clean-up) and the tasks, which are
other processes. fake-gcs-server sees them all, and at log level ``info`` it writes one line per
request. Reading that log costs the benchmark nothing while it runs, unlike a counting proxy in
the request path, which would add a hop (and CPU) to every request on a 2-core machine.

LocalCloud starts fake-gcs-server at level ``warn`` and has no setting for it, so
:func:`logging_every_request` raises the level for the clouds started inside it.
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from covalent_gcpbatch_array.local import cloud as cloud_module
from covalent_gcpbatch_array.local.gcs.fake_gcs import GcsEmulator

__all__ = ["StorageLog", "classify", "logging_every_request"]

LOG_NAME = "fake-gcs-server.log"

# One access-log line: ... "METHOD PATH HTTP/1.1" STATUS SIZE
_REQUEST_RE = re.compile(r'\\?"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[0-9.]+\\?" (?P<status>\d{3})')


class _GcsLoggingEveryRequest(GcsEmulator):
    """fake-gcs-server started at log level ``info``, which logs each request."""

    @classmethod
    def start(cls, **kwargs: Any) -> GcsEmulator:
        kwargs["log_level"] = "info"
        return super().start(**kwargs)


@contextlib.contextmanager
def logging_every_request() -> Iterator[None]:
    """Make the LocalClouds started inside this block log every storage request."""
    original = cloud_module.GcsEmulator
    cloud_module.GcsEmulator = _GcsLoggingEveryRequest  # type: ignore[misc]
    try:
        yield
    finally:
        cloud_module.GcsEmulator = original  # type: ignore[misc]


def classify(method: str, path: str, status: int) -> str:
    """The kind of a storage request, e.g. ``upload``, ``download`` or ``list``.

    A download answered 404 (reading an object that is not there, such as ``error.pkl`` of a
    task that succeeded) is ``download_missing``: it costs a request all the same.
    """
    path = path.split("?", 1)[0]
    if path.startswith("/upload/"):
        return "upload"
    if path.startswith("/download/"):
        return "download" if status < 400 else "download_missing"
    if path.startswith("/storage/v1/b/"):
        rest = path[len("/storage/v1/b/") :]
        objects = rest.partition("/")[2]
        if not objects:
            return "get_bucket"
        if objects == "o":
            return "list" if method == "GET" else "other"
        if method == "DELETE":
            return "delete"
        if method == "GET":
            return "get_object"
        return "other"
    return "other"


class StorageLog:
    """The request log of one LocalCloud's fake-gcs-server, read from a starting point.

    :param path: the log file (``cloud.workdir / "fake-gcs-server.log"``)
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._start = path.stat().st_size if path.exists() else 0

    @classmethod
    def of(cls, workdir: Path) -> StorageLog:
        """The log of the cloud whose workdir is ``workdir``, counted from now on."""
        return cls(workdir / LOG_NAME)

    def operations(self) -> dict[str, int]:
        """Requests logged since this object was made, by kind (see :func:`classify`)."""
        counts: Counter[str] = Counter()
        with self.path.open("rb") as log:
            log.seek(self._start)
            for raw in log:
                match = _REQUEST_RE.search(raw.decode(errors="replace"))
                if match:
                    kind = classify(match["method"], match["path"], int(match["status"]))
                    counts[kind] += 1
        return dict(sorted(counts.items()))
