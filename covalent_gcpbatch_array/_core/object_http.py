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
"""

from __future__ import annotations

import base64
import json
import os
import urllib.parse
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

__all__ = ["BucketNotFound", "ObjectHttp"]

#: Seconds to connect, and between bytes of an answer (the client's default, 60).
_TIMEOUT = urllib3.Timeout(connect=60, read=60)
#: What Cloud Storage says, in a 404, when the bucket (not the object) is missing.
_NO_BUCKET = "bucket does not exist"


class BucketNotFound(api_exceptions.NotFound):
    """A 404 that says the bucket, not the object, is missing."""


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


def _api_error(method: str, name: str, response: urllib3.BaseHTTPResponse) -> Exception:
    """The google-api-core exception of an error answer, with Google's message in it."""
    body = response.data
    try:
        message = str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = body.decode(errors="replace").strip()[:500] or response.reason or ""
    text = f"{method} {name}: {message}"
    if response.status == 404 and _NO_BUCKET in message.lower():
        return BucketNotFound(text)
    return api_exceptions.from_http_status(response.status, text)


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

    def _send(
        self, method: str, name: str, url: str, body: bytes | None = None, headers: Any = None
    ) -> urllib3.BaseHTTPResponse:
        response = self._http.urlopen(
            method, url, body=body, headers=headers, retries=False, timeout=_TIMEOUT
        )
        if response.status >= 300:
            raise _api_error(method, name, response)
        return response
