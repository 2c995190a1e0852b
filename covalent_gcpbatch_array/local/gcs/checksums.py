"""Upload checksums, checked as Cloud Storage checks them (fake-gcs-server does not).

An upload may declare the object's CRC32C or MD5: in a multipart upload's metadata part
(``"crc32c"``, ``"md5Hash"``, base64 of the big-endian digest, as google-cloud-storage sends by
default) or in an ``X-Goog-Hash: crc32c=...,md5=...`` header. Cloud Storage refuses an upload
whose bytes do not match with 400; the GCS proxy (:mod:`.proxy`) calls :func:`upload_mismatch`
on the uploads it reads whole (multipart, and single-request media uploads carrying the header),
and :func:`stored_mismatch` on a resumable upload sent in several chunks, once it completes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping

import google_crc32c

__all__ = [
    "HashHeaderError",
    "declared_in_header",
    "multipart_parts",
    "stored_mismatch",
    "upload_mismatch",
]

_BOUNDARY = re.compile(rb'boundary="?([^";]+)"?')


class HashHeaderError(ValueError):
    """An ``X-Goog-Hash`` header Cloud Storage would not accept."""


def _crc32c(data: bytes) -> str:
    return base64.b64encode(google_crc32c.Checksum(data).digest()).decode()


def _md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


#: Each checksum: (metadata key, X-Goog-Hash name, its name in Google's message, how to compute)
_CHECKSUMS = (("crc32c", "crc32c", "CRC32C", _crc32c), ("md5Hash", "md5", "MD5 hash", _md5))


def multipart_parts(content_type: bytes, body: bytes) -> tuple[dict[str, object], bytes] | None:
    """A multipart/related upload's metadata and media, or None if it is not one."""
    found = _BOUNDARY.search(content_type)
    if found is None:
        return None
    delimiter = b"--" + found[1]
    parts = body.split(delimiter)
    # "", metadata part, media part, "--" (and whatever follows the close delimiter)
    if len(parts) < 4 or not parts[3].startswith(b"--"):
        return None
    blocks = []
    for part in parts[1:3]:
        _, separator, content = part.partition(b"\r\n\r\n")
        if not separator or not content.endswith(b"\r\n"):
            return None
        blocks.append(content[:-2])
    try:
        metadata = json.loads(blocks[0])
    except ValueError:
        return None
    return (metadata, blocks[1]) if isinstance(metadata, dict) else None


def declared_in_header(value: str) -> dict[str, str]:
    """``X-Goog-Hash: crc32c=...,md5=...`` as {"crc32c": ..., "md5Hash": ...}.

    :raises HashHeaderError: a part that is not ``crc32c=`` or ``md5=``
    """
    names = {header_name: key for key, header_name, _, _ in _CHECKSUMS}
    declared = {}
    for item in value.split(","):
        name, separator, digest = item.strip().partition("=")
        if not separator or name not in names:
            raise HashHeaderError(f"X-Goog-Hash {value!r}: give crc32c=... and/or md5=...")
        declared[names[name]] = digest.strip()
    return declared


def upload_mismatch(declared: dict[str, object], data: bytes) -> str | None:
    """Google's message for the first declared checksum ``data`` does not have, else None."""
    computed = {key: compute(data) for key, _, _, compute in _CHECKSUMS if key in declared}
    return stored_mismatch(declared, computed)


def stored_mismatch(declared: Mapping[str, object], stored: Mapping[str, object]) -> str | None:
    """Google's message for the first declared checksum the stored object's differs from.

    :param stored: the object's checksums (``crc32c``, ``md5Hash``) as fake-gcs-server
        reports them (for a resumable upload, whose chunks the proxy never holds at once)
    """
    for key, _, label, _ in _CHECKSUMS:
        wanted = declared.get(key)
        if wanted is not None and wanted != stored.get(key):
            actual = stored.get(key)
            return f'Provided {label} "{wanted}" doesn\'t match calculated {label} "{actual}".'
    return None
