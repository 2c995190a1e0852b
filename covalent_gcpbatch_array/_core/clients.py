"""Building the Google API clients, for Google or for another endpoint, by one rule.

``endpoint=""`` means Google's own endpoint with Application Default Credentials. Any other
endpoint is a base URL the client talks to instead; a plain ``http://`` one is an emulator (the
local cloud) and gets anonymous credentials, since no Google credential may travel over plain
HTTP. Every client of the package (executor, runner, CLI, local cloud, benchmarks, tests) is
made here.

The Google libraries (google-auth too) are imported when a client is made: google-cloud-batch
alone takes about a second to import, google.auth.credentials about a second on a busy machine,
which a CLI command or ``import covalent_gcpbatch_array.local`` that makes no client should not
pay.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from covalent_gcpbatch_array.exceptions import CloudApiError, StorageError

if TYPE_CHECKING:
    import google.cloud.storage as storage
    from google.auth.credentials import Credentials
    from google.cloud import batch_v1, logging_v2

__all__ = ["credentials_for", "make_batch_client", "make_logging_client", "make_storage_client"]


def credentials_for(endpoint: str) -> Credentials | None:
    """The credentials a client of ``endpoint`` uses: anonymous for ``http://``, else ``None``.

    ``None`` lets the client find Application Default Credentials as usual.
    """
    from google.auth.credentials import AnonymousCredentials

    return AnonymousCredentials() if endpoint.startswith("http://") else None


def _endpoint_options(endpoint: str) -> dict[str, Any]:
    """The keyword arguments that point a client at ``endpoint`` (none for Google's own)."""
    if not endpoint:
        return {}
    return {
        "credentials": credentials_for(endpoint),
        "client_options": {"api_endpoint": endpoint.rstrip("/")},
    }


def make_batch_client(endpoint: str = "") -> batch_v1.BatchServiceClient:
    """A REST ``BatchServiceClient`` for Google (``endpoint=""``) or another endpoint."""
    from google.cloud import batch_v1

    return batch_v1.BatchServiceClient(transport="rest", **_endpoint_options(endpoint))


def make_storage_client(project_id: str | None, endpoint: str = "") -> storage.Client:
    """A Cloud Storage client for Google, or for the API at ``endpoint``.

    With ``endpoint`` empty the client uses Google's defaults: Application Default Credentials,
    or, when ``STORAGE_EMULATOR_HOST`` is set, anonymous access to that emulator (the client's
    own rule). Otherwise both the JSON API and the upload/download paths go to ``endpoint``.

    :param project_id: the project to bill and to create buckets in; ``None`` or ``""`` for
        none (object reads and writes need no project)
    :param endpoint: ``""`` for Google (or ``STORAGE_EMULATOR_HOST``), else a base URL
    :raises StorageError: no Google credentials could be found
    """
    import google.auth.exceptions
    import google.cloud.storage as storage

    # google-cloud-storage 3.x would GET each bucket's metadata from a background thread of
    # each client, for tracing only: needless requests, counted in no benchmark, and a
    # permission (storage.buckets.get) neither the executor nor the task needs otherwise.
    os.environ.setdefault("DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA", "true")
    try:
        return storage.Client(project=project_id or None, **_endpoint_options(endpoint))
    except google.auth.exceptions.DefaultCredentialsError as exc:
        raise StorageError(
            "no Google credentials found for Cloud Storage: run `gcloud auth application-default "
            "login`, or set GOOGLE_APPLICATION_CREDENTIALS, or run on a VM with a service account "
            "(set storage_api_endpoint to use an emulator instead)"
        ) from exc


def make_logging_client(project_id: str, endpoint: str = "") -> logging_v2.Client:
    """A google-cloud-logging client for Google (``endpoint=""``) or another endpoint.

    Another endpoint (the local cloud's Batch emulator also serves the Logging API) is spoken
    to in JSON over HTTP, the transport an emulator serves.

    :raises CloudApiError: no Google credentials could be found
    """
    import google.auth.exceptions
    from google.cloud import logging_v2

    options = _endpoint_options(endpoint)
    if options:
        options["_use_grpc"] = False
    try:
        return logging_v2.Client(project=project_id, **options)
    except google.auth.exceptions.DefaultCredentialsError as exc:
        raise CloudApiError(
            "no Google credentials found for Cloud Logging: run `gcloud auth application-default "
            "login` or set GOOGLE_APPLICATION_CREDENTIALS"
        ) from exc
