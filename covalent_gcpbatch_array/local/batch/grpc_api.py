"""The Batch emulator's gRPC front end: Google's default transport, on the REST side's state.

Google's Batch clients speak gRPC by default (``BatchServiceAsyncClient`` only gRPC). This
module serves ``google.cloud.batch.v1.BatchService`` and ``google.longrunning.Operations`` (so
``delete_job(...).result()`` polls GetOperation) with grpcio's generic handlers over the client's
own messages: requests are read with ``batch_v1.GetJobRequest.deserialize`` and the like, and
the answers of :class:`.rpcs.BatchRpcs` (the same calls, stats, faults and jobs as the REST side)
are turned from Google's JSON into ``batch_v1.Job``, ``ListTasksResponse`` or
``operations_pb2.Operation`` messages.

A refused call gets the gRPC status Google's front end gives (NOT_FOUND, INVALID_ARGUMENT,
ALREADY_EXISTS, RESOURCE_EXHAUSTED for the job-creation quota, UNIMPLEMENTED for the methods the
local cloud does not reproduce, ...) with the same ``google.rpc`` details (``BadRequest``,
``ErrorInfo``) in ``grpc-status-details-bin``, which ``google.api_core`` reads. The response
field mask is the ``x-goog-fieldmask`` metadata, as on Google's gRPC endpoints.

Answers are converted from JSON with ``json_format.ParseDict``, which walks a message field by
field in Python (about 60 us for a whole task); a ListTasks or ListJobs answer converts each
task or job once per distinct content (:class:`_ListConverter`), as a poller lists the same
finished tasks again and again.

The server is ``grpc.aio``'s, on the emulator's own event loop: handlers run between the REST
handlers and the scheduler's tasks, never in a thread of ours. It listens without TLS; clients
reach it through an insecure channel (see ``LocalCloud.batch_grpc_client``).
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import grpc
import grpc.aio
from google.cloud import batch_v1
from google.longrunning import operations_pb2
from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from covalent_gcpbatch_array.local.api_errors import ApiError
from covalent_gcpbatch_array.local.batch.rpcs import BatchRpcs

__all__ = ["BATCH_SERVICE", "OPERATIONS_SERVICE", "grpc_server"]

logger = logging.getLogger(__name__)

BATCH_SERVICE = "google.cloud.batch.v1.BatchService"
OPERATIONS_SERVICE = "google.longrunning.Operations"
#: The response field mask, as metadata (the gRPC form of the ``$fields`` system parameter).
FIELD_MASK_KEY = "x-goog-fieldmask"
#: Methods the clients have that the local cloud does not reproduce (REST answers them 501).
NOT_REPRODUCED = (
    "/google.cloud.location.Locations/GetLocation",
    "/google.cloud.location.Locations/ListLocations",
    f"/{OPERATIONS_SERVICE}/ListOperations",
    f"/{OPERATIONS_SERVICE}/CancelOperation",
    f"/{OPERATIONS_SERVICE}/DeleteOperation",
)
# The details ApiError carries must be known to the JSON parser when a status is built.
_DETAIL_TYPES = (error_details_pb2.BadRequest, error_details_pb2.ErrorInfo)

# Converted list elements kept (a whole task's message and key take about 3 KB).
_CONVERTED_ELEMENTS = 10_000

#: An RPC's body: the request message in, the response in Google's JSON form out.
Body = Callable[[Any], dict[str, Any]]
Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Message]]
#: Turns an answer in JSON form into a new response message.
Converter = Callable[[dict[str, Any]], Message]


class _ListConverter:
    """A list answer's JSON to its message, each element converted once per distinct content.

    :param response_type: the response message (``ListTasksResponse``'s protobuf)
    :param field: its repeated field of elements (``tasks``)
    :param element_type: that field's message (``Task``'s protobuf)
    """

    def __init__(
        self, response_type: type[Message], field: str, element_type: type[Message]
    ) -> None:
        self._response_type = response_type
        self._field = field
        self._element_type = element_type
        self._converted: OrderedDict[str, Message] = OrderedDict()  # by JSON text, LRU order

    def __call__(self, answer: dict[str, Any]) -> Message:
        rest = {key: value for key, value in answer.items() if key != self._field}
        response = json_format.ParseDict(rest, self._response_type())
        getattr(response, self._field).extend(
            self._element(element) for element in answer.get(self._field, ())
        )
        return response

    def _element(self, element: dict[str, Any]) -> Message:
        key = json.dumps(element)  # about a tenth of ParseDict's time
        message = self._converted.get(key)
        if message is None:
            message = json_format.ParseDict(element, self._element_type())
            self._converted[key] = message
            if len(self._converted) > _CONVERTED_ELEMENTS:
                self._converted.popitem(last=False)
        else:
            self._converted.move_to_end(key)
        return message


def _parse_dict(response_type: type[Message]) -> Converter:
    return lambda answer: json_format.ParseDict(answer, response_type())


def grpc_server(rpcs: BatchRpcs) -> grpc.aio.Server:
    """A ``grpc.aio`` server answering the Batch and Operations services from ``rpcs``.

    Add a port and start it on the running event loop (``server.add_insecure_port("H:0")``,
    ``await server.start()``).
    """
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((*_handlers(rpcs), _NotReproduced()))
    return server


def _handlers(rpcs: BatchRpcs) -> tuple[grpc.GenericRpcHandler, ...]:
    def rpc(
        method: str,
        request_type: Any,
        response_type: Any,
        body: Body,
        convert: Converter | None = None,
    ) -> Any:
        to_message = convert or _parse_dict(response_type)

        async def handler(request: Any, context: grpc.aio.ServicerContext) -> Message:
            try:
                mask = rpcs.begin(method, _metadata(context, FIELD_MASK_KEY))
                answer = body(request)
            except ApiError as exc:
                await _abort(context, exc)
            except Exception as exc:
                logger.exception("error answering %s", method)
                await _abort(
                    context, ApiError(500, f"Internal error in the Batch emulator: {exc!r}")
                )
            if mask is not None:
                answer = mask.apply(answer)
            return to_message(answer)

        return grpc.unary_unary_rpc_method_handler(
            handler,
            request_deserializer=request_type.deserialize,
            response_serializer=response_type.SerializeToString,
        )

    job = batch_v1.Job.pb()
    operation = operations_pb2.Operation
    batch = {
        "CreateJob": rpc(
            "CreateJob",
            batch_v1.CreateJobRequest,
            job,
            lambda r: rpcs.create_job(
                r.parent,
                r.job_id or None,
                r.request_id or None,
                json_format.MessageToJson(batch_v1.Job.pb(r.job)).encode(),
            ),
        ),
        "GetJob": rpc("GetJob", batch_v1.GetJobRequest, job, lambda r: rpcs.get_job(r.name)),
        "ListJobs": rpc(
            "ListJobs",
            batch_v1.ListJobsRequest,
            batch_v1.ListJobsResponse.pb(),
            lambda r: rpcs.list_jobs(r.parent, r.filter, r.order_by, r.page_size, r.page_token),
            _ListConverter(batch_v1.ListJobsResponse.pb(), "jobs", job),
        ),
        "DeleteJob": rpc(
            "DeleteJob", batch_v1.DeleteJobRequest, operation, lambda r: rpcs.delete_job(r.name)
        ),
        "CancelJob": rpc(
            "CancelJob", batch_v1.CancelJobRequest, operation, lambda r: rpcs.cancel_job(r.name)
        ),
        "ListTasks": rpc(
            "ListTasks",
            batch_v1.ListTasksRequest,
            batch_v1.ListTasksResponse.pb(),
            lambda r: rpcs.list_tasks(*_task_group(r.parent), r.filter, r.page_size, r.page_token),
            _ListConverter(batch_v1.ListTasksResponse.pb(), "tasks", batch_v1.Task.pb()),
        ),
        "GetTask": rpc(
            "GetTask",
            batch_v1.GetTaskRequest,
            batch_v1.Task.pb(),
            lambda r: rpcs.get_task(*_task_group(r.name.rsplit("/tasks/", 1)[0]), _last(r.name)),
        ),
    }
    operations = {
        "GetOperation": rpc(
            "GetOperation",
            _ProtoRequest(operations_pb2.GetOperationRequest),
            operation,
            lambda r: rpcs.get_operation(r.name),
        ),
    }
    return (
        grpc.method_handlers_generic_handler(BATCH_SERVICE, batch),
        grpc.method_handlers_generic_handler(OPERATIONS_SERVICE, operations),
    )


class _ProtoRequest:
    """A plain protobuf request type with the ``deserialize`` of proto-plus ones."""

    def __init__(self, message: type[Message]) -> None:
        self.deserialize = message.FromString


class _NotReproduced(grpc.GenericRpcHandler):
    """Every other method: UNIMPLEMENTED, saying so loudly (the REST side answers 501)."""

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        what = "not supported by the local cloud" if method in NOT_REPRODUCED else "unknown"

        async def refuse(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            await _abort(
                context,
                ApiError(
                    501,
                    f"Method {method} is not implemented by the emulator ({what}; see "
                    f"docs/local-cloud.md)",
                ),
            )

        return grpc.unary_unary_rpc_method_handler(refuse)


async def _abort(context: grpc.aio.ServicerContext, exc: ApiError) -> NoReturn:
    """End the call with ``exc`` as Google's gRPC front end would: code, message, details."""
    code = grpc.StatusCode[exc.status]
    status = json_format.ParseDict(
        {**exc.to_json()["error"], "code": code.value[0]},
        status_pb2.Status(),
        ignore_unknown_fields=True,  # the JSON form's "status" name is the code here
    )
    await context.abort(
        code,
        exc.message,
        trailing_metadata=(("grpc-status-details-bin", status.SerializeToString()),),
    )
    raise AssertionError("grpc.aio's abort() raises")  # pragma: no cover


def _metadata(context: grpc.aio.ServicerContext, key: str) -> str:
    for name, value in context.invocation_metadata() or ():
        if name == key:
            return str(value)
    return ""


def _task_group(name: str) -> tuple[str, str]:
    """(job name, group id) of ``projects/P/locations/L/jobs/J/taskGroups/G``."""
    job_name, _, group = name.partition("/taskGroups/")
    return job_name, group


def _last(name: str) -> str:
    return name.rsplit("/", 1)[-1]
