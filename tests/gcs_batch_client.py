"""google-cloud-storage's batch requests as the tests read them: the answer to each call.

The package sends its own batch requests (:meth:`ObjectHttp.delete_many`); the tests still
drive the local cloud with the client library's ``Batch``, whose context manager keeps what
``finish()`` returns only as ``Batch._responses``. An upgrade that moves it fails the batch
tests of tests/test_gcs_proxy.py and tests/test_gcs_batch.py, which read it here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import requests
    from google.cloud.storage.batch import Batch


def batch_responses(batch: Batch) -> list[requests.Response]:
    """The responses of a finished batch request, one per call, in order."""
    responses: list[requests.Response] = batch._responses
    return responses
