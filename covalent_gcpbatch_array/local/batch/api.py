"""The Batch emulator's HTTP layer: Google's v1 REST paths and the ``/_emulator`` admin paths.

The RPC routes answer exactly what ``google-cloud-batch``'s REST transport sends and expects:
camelCase JSON, int64 values as strings, enums as names, errors as Google's error JSON (so the
client raises ``NotFound``, ``InvalidArgument``, ``ServiceUnavailable``, ...). Every RPC call is
counted, and a call planned to fail with ``/_emulator/fail_calls`` fails before it does anything.

Every RPC honours the response field mask (system parameter ``$fields`` / ``X-Goog-FieldMask``,
see :mod:`covalent_gcpbatch_array.local.field_mask`): a poller asking ``ListTasks`` for
``tasks.name,tasks.status.state,nextPageToken`` gets neither status events nor timestamps.
The RPCs themselves, shared with the gRPC front end, are :class:`.rpcs.BatchRpcs`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from covalent_gcpbatch_array.local.api_errors import ApiError, error_response, json_object
from covalent_gcpbatch_array.local.batch.attempt import attempt_output
from covalent_gcpbatch_array.local.batch.rpcs import BatchRpcs
from covalent_gcpbatch_array.local.field_mask import field_mask_text
from covalent_gcpbatch_array.local.logging.api import logging_routes

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

_LOCATION = "/v1/projects/{project}/locations/{location}"
_JOB = _LOCATION + "/jobs/{job}"
_TASKS = _JOB + "/taskGroups/{group}/tasks"
_OPERATION = _LOCATION + "/operations/{operation}"

Handler = Callable[[Request], Awaitable[Response]]
#: An RPC's handler returns its response message in JSON form.
RpcHandler = Callable[[Request], Awaitable[dict[str, Any]]]


def create_app(rpcs: BatchRpcs) -> Starlette:
    """The ASGI application serving ``rpcs`` over Google's REST API.

    It also answers Cloud Logging's ``entries:list`` with the jobs' task output (see
    :mod:`covalent_gcpbatch_array.local.logging.api`).
    """
    scheduler = rpcs.scheduler

    def rpc(method: str, handler: RpcHandler) -> Handler:
        async def endpoint(request: Request) -> Response:
            try:
                mask = rpcs.begin(method, field_mask_text(request.headers, request.query_params))
                body = await handler(request)
            except ApiError as exc:
                return error_response(exc)
            return JSONResponse(body if mask is None else mask.apply(body))

        return endpoint

    async def create_job(request: Request) -> dict[str, Any]:
        query = request.query_params
        return rpcs.create_job(
            _parent(request), query.get("jobId"), query.get("requestId"), await request.body()
        )

    async def get_job(request: Request) -> dict[str, Any]:
        return rpcs.get_job(_job_name(request))

    async def list_jobs(request: Request) -> dict[str, Any]:
        query = request.query_params
        return rpcs.list_jobs(
            _parent(request),
            query.get("filter", ""),
            query.get("orderBy", ""),
            _page_size(request),
            query.get("pageToken", ""),
        )

    async def delete_job(request: Request) -> dict[str, Any]:
        return rpcs.delete_job(_job_name(request))

    async def cancel_job(request: Request) -> dict[str, Any]:
        await json_object(request, "CancelJobRequest")  # only requestId, which is optional
        return rpcs.cancel_job(_job_name(request))

    async def get_operation(request: Request) -> dict[str, Any]:
        return rpcs.get_operation(
            f"{_parent(request)}/operations/{request.path_params['operation']}"
        )

    async def list_tasks(request: Request) -> dict[str, Any]:
        return rpcs.list_tasks(
            _job_name(request),
            request.path_params["group"],
            request.query_params.get("filter", ""),
            _page_size(request),
            request.query_params.get("pageToken", ""),
        )

    async def get_task(request: Request) -> dict[str, Any]:
        params = request.path_params
        return rpcs.get_task(_job_name(request), params["group"], params["task"])

    # -- admin ----------------------------------------------------------------------------

    def admin(handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except ApiError as exc:
                return error_response(exc)
            except (ValueError, TypeError) as exc:
                return error_response(ApiError(400, str(exc)))

        return endpoint

    async def stats(request: Request) -> Response:
        return JSONResponse(scheduler.stats.to_json())

    async def fail_calls(request: Request) -> Response:
        body = await json_object(request, "the admin request")
        method = _get(body, "method", str)
        status = _get(body, "status", int)
        count = _get(body, "count", int, 1)
        scheduler.call_faults.add(method, status, count)
        return JSONResponse({"pending": scheduler.call_faults.pending()})

    async def fail_task(request: Request) -> Response:
        body = await json_object(request, "the admin request")
        scheduler.task_faults.add(
            index=_get(body, "index", int),
            attempt=_get(body, "attempt", int, 0),
            exit_code=_get(body, "exit_code", int, 50001),
            job_id=_get(body, "job_id", str, None),
            after_seconds=float(_get(body, "after_seconds", (int, float), 0.0)),
        )
        return JSONResponse({"planned": True})

    async def settings(request: Request) -> Response:
        if request.method == "GET":
            return JSONResponse(scheduler.settings_json())
        return JSONResponse(scheduler.configure(await json_object(request, "the admin request")))

    async def task_output(request: Request) -> Response:
        params = request.path_params
        stream = params["stream"]
        if stream not in ("stdout", "stderr"):
            raise ApiError.not_found(f"unknown stream {stream!r}: use stdout or stderr")
        folder = scheduler.output_dir(params["job_id"], params["index"], params["attempt"])
        text = None if folder is None else attempt_output(folder, stream)
        if text is None:
            raise ApiError.not_found(
                f"no output for attempt {params['attempt']} of task {params['index']} of job "
                f"{params['job_id']}: the job is unknown or that attempt never ran a process"
            )
        return PlainTextResponse(text)

    routes = [
        Route(_LOCATION + "/jobs", rpc("CreateJob", create_job), methods=["POST"]),
        Route(_LOCATION + "/jobs", rpc("ListJobs", list_jobs), methods=["GET"]),
        Route(_JOB + ":cancel", rpc("CancelJob", cancel_job), methods=["POST"]),
        Route(_JOB, rpc("GetJob", get_job), methods=["GET"]),
        Route(_JOB, rpc("DeleteJob", delete_job), methods=["DELETE"]),
        Route(_TASKS, rpc("ListTasks", list_tasks), methods=["GET"]),
        Route(_TASKS + "/{task}", rpc("GetTask", get_task), methods=["GET"]),
        Route(_OPERATION, rpc("GetOperation", get_operation), methods=["GET"]),
        # Methods of Google's discovery document the emulator does not reproduce: 501, loudly.
        Route("/v1/projects/{project}/locations", _not_reproduced, methods=["GET"]),
        Route(_LOCATION, _not_reproduced, methods=["GET"]),
        Route(_LOCATION + "/operations", _not_reproduced, methods=["GET"]),
        Route(_OPERATION + ":cancel", _not_reproduced, methods=["POST"]),
        Route(_OPERATION, _not_reproduced, methods=["DELETE"]),
        Route(_LOCATION + "/state:report", _not_reproduced, methods=["POST"]),
        Route("/_emulator/stats", admin(stats), methods=["GET"]),
        Route("/_emulator/fail_calls", admin(fail_calls), methods=["POST"]),
        Route("/_emulator/fail_task", admin(fail_task), methods=["POST"]),
        Route("/_emulator/settings", admin(settings), methods=["GET", "POST"]),
        Route(
            "/_emulator/tasks/{job_id}/{index:int}/{attempt:int}/{stream}",
            admin(task_output),
            methods=["GET"],
        ),
        *logging_routes(rpcs.task_logs),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={HTTPException: _http_error, Exception: _internal_error},
    )


async def _not_reproduced(request: Request) -> Response:
    return error_response(
        ApiError(
            501,
            f"Method {request.method} {request.url.path} is not implemented by the emulator "
            f"(not supported by the local cloud; see docs/local-cloud.md)",
        )
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 (unknown path or method), in Google's error JSON."""
    assert isinstance(exc, HTTPException)
    code = exc.status_code if exc.status_code in (404, 405) else 400
    if code == 405:
        error = ApiError(
            501, f"Method {request.method} {request.url.path} is not implemented by the emulator"
        )
    else:
        error = ApiError(404, f"Unknown path {request.url.path}: not a Batch v1 resource")
    return error_response(error)


async def _internal_error(request: Request, exc: Exception) -> Response:
    logger.exception("error answering %s %s", request.method, request.url.path)
    return error_response(ApiError(500, f"Internal error in the Batch emulator: {exc!r}"))


def _parent(request: Request) -> str:
    params = request.path_params
    return f"projects/{params['project']}/locations/{params['location']}"


def _job_name(request: Request) -> str:
    return f"{_parent(request)}/jobs/{request.path_params['job']}"


def _page_size(request: Request) -> int:
    text = request.query_params.get("pageSize", "0")
    if not text.isdigit():
        raise ApiError.invalid_argument("page_size", f"must be an integer >= 0, got {text!r}")
    return int(text)


_MISSING = object()


def _get(body: dict[str, Any], key: str, kind: Any, default: Any = _MISSING) -> Any:
    """``body[key]`` checked against ``kind`` (bool is never an int); ``default`` if absent."""
    if key not in body or (body[key] is None and default is None):
        if default is _MISSING:
            raise ApiError(400, f"missing field {key!r}")
        return default
    value = body[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ApiError(400, f"field {key!r} has the wrong type: {value!r}")
    return value
