"""The poll's ListTasks as plain JSON: each task's index and state, and no protobuf.

Over REST, ``BatchServiceClient.list_tasks`` turns every listed task into a protobuf message
in pure Python (``json_format.Parse``): about 19 ms of CPU per listing of 1,000 tasks even with
only names and states asked for, and the executor lists a job's finished tasks each time more
of them finish (issue 16).
:class:`TaskStateReader` sends the same ``GET .../tasks`` (page size, filter, the
``X-Goog-FieldMask`` header) over the client's own authorized session, to the client's own
endpoint, and reads each page with :func:`json.loads` into ``{index: state name}``: about
5 ms (``python -m benchmarks.batch_transport``, which compares the two and gRPC). An error
answer raises what the client would (``google.api_core.exceptions.from_http_response``), so
the caller's retry and error mapping treat both paths alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from google.api_core import exceptions as api_exceptions

from covalent_gcpbatch_array._core.compat import batch_rest_session
from covalent_gcpbatch_array._core.contract import task_index_of

if TYPE_CHECKING:
    import requests
    from google.api_core.retry import Retry
    from google.cloud import batch_v1

__all__ = ["FIELD_MASK_HEADER", "TaskStateReader", "TaskStates"]

#: Task index -> the name of its state ("PENDING", "RUNNING", "SUCCEEDED", ...).
TaskStates = dict[int, str]
#: The response field mask travels as the ``X-Goog-FieldMask`` header, the header form of the
#: ``$fields`` system parameter every Google API takes
#: (https://cloud.google.com/apis/docs/system-parameters). The REST transport sends a call's
#: ``metadata`` pairs as HTTP headers, so it rides along on every page of the client's listings
#: too.
FIELD_MASK_HEADER = "x-goog-fieldmask"
#: Seconds one page may take, the client's own default for ListTasks.
PAGE_TIMEOUT = 60.0
#: A task whose state is the enum's zero value has none in proto3 JSON.
_NO_STATE = "STATE_UNSPECIFIED"


@dataclass(frozen=True)
class TaskStateReader:
    """Lists the states of a task group's tasks over a Batch client's REST session."""

    session: requests.Session  # the client's AuthorizedSession: its credentials and pool
    host: str  # the client's endpoint with its scheme, e.g. "https://batch.googleapis.com"

    @classmethod
    def of(cls, client: batch_v1.BatchServiceClient) -> TaskStateReader:
        """The reader that speaks for ``client`` (a REST client, see ``make_batch_client``)."""
        return cls(*batch_rest_session(client))

    def read(
        self,
        parent: str,
        *,
        filter_text: str,
        page_size: int,
        fields: Sequence[str],
        retry: Retry,
    ) -> TaskStates:
        """Every task of the task group ``parent`` that ``filter_text`` selects, page by page.

        :param parent: ``projects/P/locations/R/jobs/J/taskGroups/G``
        :param filter_text: the ListTasks filter (e.g. ``State=SUCCEEDED OR State=FAILED``)
        :param page_size: tasks per page
        :param fields: the response field mask; it must keep ``nextPageToken``
        :param retry: the retry policy of each page's request
        :raises google.api_core.exceptions.GoogleAPICallError: Batch answered an error
        """
        page = retry(self._page)
        states: TaskStates = {}
        token = ""
        while True:
            found, token = page(parent, filter_text, page_size, ",".join(fields), token)
            states.update(found)
            if not token:
                return states

    def _page(
        self, parent: str, filter_text: str, page_size: int, mask: str, token: str
    ) -> tuple[TaskStates, str]:
        params: dict[str, str | int] = {"pageSize": page_size}
        if filter_text:
            params["filter"] = filter_text
        if token:
            params["pageToken"] = token
        response = self.session.get(
            f"{self.host}/v1/{parent}/tasks",
            params=params,
            headers={FIELD_MASK_HEADER: mask},
            timeout=PAGE_TIMEOUT,
        )
        if response.status_code >= 400:
            raise api_exceptions.from_http_response(response)
        body = response.json()
        states = {
            task_index_of(task["name"]): task.get("status", {}).get("state", _NO_STATE)
            for task in body.get("tasks", ())
        }
        return states, body.get("nextPageToken", "")
