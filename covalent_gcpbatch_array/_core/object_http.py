"""Object writes and reads in one plain HTTP request each: the executor's hot path.

Through google-cloud-storage, a small upload or download costs about 1.1-1.4 ms of CPU, most of
it in ``requests``' per-call work (cookies, ``.netrc`` and proxy look-ups in the environment,
hooks) and in the Blob, resumable-media and tracing layers above it. The same request through
google-auth's urllib3 transport costs about half (``benchmarks/findings.md``). The executor
makes two such requests per electron (its input, its outcome), so :class:`TaskStore` sends
those two here; everything else stays on the client.

The requests are Cloud Storage's JSON API ones the client sends (a media upload, an
``alt=media`` download), with the client's credentials (refreshed and sent by
``AuthorizedHttp``), endpoint, and the proxy and CA bundle ``requests`` would use. Integrity as
the client's: an upload declares its CRC32C (``X-Goog-Hash``), which Cloud Storage checks, and a
download is checked against the CRC32C Cloud Storage sends (``DataCorruption`` if it differs,
which the job monitor reads again and the runner leaves to Batch's retry). Failures are raised
as google-api-core exceptions, the ones the client raises, so the same retry policy and the
same translation to ``StorageError`` apply.

Deleting a job's objects is here too (:meth:`ObjectHttp.delete_many`): the client's ``Batch``
builds and parses each batch request with the ``email`` package and a ``Blob`` per call, about
15 ms of CPU per batch request of 100 deletes; the same request built and read with plain string
work costs about 1.5 ms.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import urllib.parse
from collections.abc import Sequence
from typing import Any

import google.cloud.storage as storage
import google_crc32c
import requests
import requests.adapters
import requests.certs
import urllib3
from google.api_core import exceptions as api_exceptions
from google.auth.transport.urllib3 import AuthorizedHttp

from covalent_gcpbatch_array._core.compat import storage_credentials

try:
    from google.cloud.storage.exceptions import DataCorruption
except ImportError:  # pragma: no cover  (google-cloud-storage 2.x)
    from google.resumable_media.common import DataCorruption

__all__ = ["BatchUnsupported", "BucketNotFound", "ObjectHttp"]

#: Seconds to connect, and between bytes of an answer (the client's default, 60).
_TIMEOUT = urllib3.Timeout(connect=60, read=60)
#: What Cloud Storage says, in a 404, when the bucket (not the object) is missing.
_NO_BUCKET = "bucket does not exist"


#: A part's head and the HTTP answer in it, or an answer's head and body: split at a blank line.
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")


class BucketNotFound(api_exceptions.NotFound):
    """A 404 that says the bucket, not the object, is missing."""


class BatchUnsupported(Exception):
    """The endpoint has no batch API (an emulator without one): a 404 or 405, or an answer
    that is not multipart/mixed."""


def _connection_pool(endpoint: str, size: int) -> urllib3.PoolManager:
    """Connections to ``endpoint`` through the proxy, and checked against the CA bundle, that
    ``requests`` (so the storage client) would use: ``HTTPS_PROXY``, ``NO_PROXY``,
    ``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE``, looked up once."""
    settings = requests.Session().merge_environment_settings(endpoint, {}, None, None, None)
    verify = settings["verify"]
    tls: dict[str, Any] = {"cert_reqs": "CERT_REQUIRED"}
    if verify is False:
        tls = {"cert_reqs": "CERT_NONE"}
    elif isinstance(verify, str) and os.path.isdir(verify):
        tls["ca_cert_dir"] = verify
    else:
        tls["ca_certs"] = verify if isinstance(verify, str) else requests.certs.where()
    proxy = requests.utils.select_proxy(endpoint, settings["proxies"])
    if proxy:
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=size)
        return adapter.proxy_manager_for(proxy, **tls)
    return urllib3.PoolManager(maxsize=size, **tls)


def _crc32c(data: bytes) -> str:
    """The CRC32C of ``data`` as Cloud Storage writes it (base64 of 4 big-endian bytes)."""
    return base64.b64encode(google_crc32c.Checksum(data).digest()).decode()


def _api_error(method: str, name: str, status: int, body: bytes, reason: str = "") -> Exception:
    """The google-api-core exception of an error answer, with Google's message in it."""
    try:
        message = str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = body.decode(errors="replace").strip()[:500] or reason
    text = f"{method} {name}: {message}"
    if status == 404 and _NO_BUCKET in message.lower():
        return BucketNotFound(text)
    return api_exceptions.from_http_status(status, text)


def _boundary(content_type: str) -> str | None:
    """The boundary of a multipart/mixed Content-Type (quoted or not), or None if it is not."""
    kind, *params = content_type.split(";")
    if kind.strip().lower() != "multipart/mixed":
        return None
    for param in params:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary" and value:
            return value.strip('"')
    return None


def _split_head(block: bytes) -> tuple[bytes, bytes]:
    """What comes before the first blank line, and what after it (b"" if there is none)."""
    head, *rest = _BLANK_LINE.split(block, 1)
    return head, rest[0] if rest else b""


def _batch_answers(content_type: str, body: bytes) -> dict[str, tuple[int, bytes]]:
    """The calls' answers in a batch answer: Content-ID (without ``<response-`` and ``>``) to
    the status and body of the HTTP answer in that part.

    :raises BatchUnsupported: the answer is not multipart/mixed
    """
    boundary = _boundary(content_type)
    if boundary is None:
        raise BatchUnsupported(f"the batch answer is {content_type!r}, not multipart/mixed")
    answers = {}
    # Parts sit between delimiter lines; before the first is the preamble, after "--" the end.
    for part in body.split(b"--" + boundary.encode("latin-1"))[1:]:
        if part.startswith(b"--"):
            break
        head, answer = _split_head(part)
        content_id = ""
        for line in head.decode("latin-1").splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() == "content-id":
                content_id = value.strip().removeprefix("<response-").removesuffix(">")
        status_line, _, rest = answer.partition(b"\n")
        answer_body = _split_head(rest)[1].removesuffix(b"\r\n")
        with contextlib.suppress(ValueError, IndexError):
            answers[content_id] = (int(status_line.split()[1]), answer_body)
    return answers


class ObjectHttp:
    """Media uploads and downloads of one bucket's objects, with a storage client's settings.

    :param client: the client whose credentials and endpoint the requests use
    :param bucket_name: the bucket
    :param connections: connections kept open (one per thread that calls at once)
    """

    def __init__(self, client: storage.Client, bucket_name: str, connections: int = 32) -> None:
        endpoint = str(client.api_endpoint).rstrip("/")
        bucket = urllib.parse.quote(bucket_name, safe="")
        self._upload_url = f"{endpoint}/upload/storage/v1/b/{bucket}/o?uploadType=media&name="
        self._download_url = f"{endpoint}/download/storage/v1/b/{bucket}/o/"
        self._batch_url = f"{endpoint}/batch/storage/v1"
        # An inner call's target: a path, as Google's guide writes them (the endpoint's path,
        # if it has one, first).
        self._object_path = f"{urllib.parse.urlsplit(endpoint).path}/storage/v1/b/{bucket}/o/"
        self._http = AuthorizedHttp(
            storage_credentials(client), http=_connection_pool(endpoint, connections)
        )

    def put(self, name: str, data: bytes, content_type: str) -> None:
        """Write object ``name`` (replacing it): one POST.

        :raises google.api_core.exceptions.GoogleAPICallError: an error answer
        :raises urllib3.exceptions.HTTPError: no answer (not retried here)
        """
        url = self._upload_url + urllib.parse.quote(name, safe="")
        headers = {"Content-Type": content_type, "X-Goog-Hash": f"crc32c={_crc32c(data)}"}
        self._send("POST", name, url, data, headers)

    def get(self, name: str) -> bytes:
        """The bytes of object ``name``: one GET.

        :raises google.api_core.exceptions.NotFound: no such object
        :raises BucketNotFound: no such bucket
        :raises DataCorruption: the bytes are not those Cloud Storage's CRC32C says it sent
        """
        url = f"{self._download_url}{urllib.parse.quote(name, safe='')}?alt=media"
        response = self._send("GET", name, url)
        data: bytes = response.data
        for part in response.headers.get("X-Goog-Hash", "").split(","):
            kind, _, sent = part.strip().partition("=")
            if kind == "crc32c" and sent != _crc32c(data):
                raise DataCorruption(
                    response, f"GET {name}: CRC32C {_crc32c(data)} of the bytes read, {sent} sent"
                )
        return data

    def delete_many(self, names: Sequence[str]) -> list[Exception | None]:
        """Delete up to 100 objects in one Cloud Storage batch request (not retried here).

        The request is the one Google documents (https://cloud.google.com/storage/docs/batch):
        multipart/mixed, one ``application/http`` part per call, each with a ``Content-ID``
        that its answer's part names.

        :returns: per name, in order: ``None`` if deleted, else the google-api-core exception
            of its call's answer (``NotFound`` if it was not there; an ``InternalServerError``
            if the batch answer holds no answer to it)
        :raises BatchUnsupported: the endpoint has no batch API
        :raises google.api_core.exceptions.GoogleAPICallError: the batch request itself failed
        :raises urllib3.exceptions.HTTPError: no answer
        """
        tag = secrets.token_hex(8)
        boundary = f"batch_{tag}"
        body = "".join(
            f"--{boundary}\r\nContent-Type: application/http\r\n"
            f"Content-Transfer-Encoding: binary\r\nContent-ID: <{tag}+{index}>\r\n\r\n"
            f"DELETE {self._object_path}{urllib.parse.quote(name, safe='')} HTTP/1.1\r\n\r\n"
            # The line end before a delimiter is the delimiter's (RFC 2046), not the call's.
            "\r\n"
            for index, name in enumerate(names)
        )
        body += f"--{boundary}--\r\n"
        headers = {"Content-Type": f"multipart/mixed; boundary={boundary}"}
        what = f"a batch of {len(names)} deletes"
        try:
            response = self._send("POST", what, self._batch_url, body.encode(), headers)
        except (api_exceptions.NotFound, api_exceptions.MethodNotAllowed) as exc:
            raise BatchUnsupported(str(exc)) from exc
        answers = _batch_answers(response.headers.get("Content-Type", ""), response.data)
        results: list[Exception | None] = []
        for index, name in enumerate(names):
            status, answer = answers.get(f"{tag}+{index}", (500, b"no answer in the batch"))
            ok = 200 <= status < 300
            results.append(None if ok else _api_error("DELETE", name, status, answer))
        return results

    def _send(
        self, method: str, name: str, url: str, body: bytes | None = None, headers: Any = None
    ) -> urllib3.BaseHTTPResponse:
        response = self._http.urlopen(
            method, url, body=body, headers=headers, retries=False, timeout=_TIMEOUT
        )
        if response.status >= 300:
            raise _api_error(method, name, response.status, response.data, response.reason or "")
        return response
