"""ListJobs' ``filter`` and ``orderBy``, in Google's list-filter syntax (AIP-160).

A filter is comparisons joined by ``AND`` (binding first) and ``OR``, optionally with ``NOT`` or
``-`` before a comparison. A comparison is ``FIELD OP VALUE`` with ``OP`` one of ``= != < <= > >=
:`` and the value quoted or bare; ``labels.KEY:*`` asks for the label to be present. The fields:
``name``, ``uid``, ``status.state`` (also ``state``), ``labels.KEY``, ``create_time`` and
``update_time`` (RFC 3339, compared as times). Anything else is refused with 400 naming it, never
ignored. ``orderBy`` takes what Google documents: ``name``, ``name desc``, ``create_time``,
``create_time desc``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from covalent_gcpbatch_array.local.api_errors import ApiError
from covalent_gcpbatch_array.local.batch.state import JobRecord

__all__ = ["JobFilter", "order_jobs"]

_COMPARISON = re.compile(
    r"""^(?P<negate>NOT\s+|-)?\s*(?P<field>[A-Za-z_][\w.-]*)\s*(?P<op><=|>=|!=|=|<|>|:)\s*
    (?:"(?P<quoted>(?:[^"\\]|\\.)*)"|(?P<bare>[^\s"()]+))$""",
    re.X,
)
_TIME_FIELDS = {"create_time": "create_time", "update_time": "update_time"}
_ORDERS: dict[str, Callable[[JobRecord], Any]] = {
    "name": lambda job: job.name,
    "create_time": lambda job: (job.create_time, job.seq),
}


class JobFilter:
    """A parsed ``filter``: call :meth:`matches` on a job.

    :raises ApiError: 400 naming the clause that is not understood
    """

    def __init__(self, text: str) -> None:
        self._alternatives: list[list[tuple[bool, str, str, str]]] = []
        if not text.strip():
            return
        for alternative in re.split(r"\s+OR\s+", text.strip()):
            clauses = []
            for clause in re.split(r"\s+AND\s+", alternative.strip().strip("()").strip()):
                clauses.append(self._parse(clause.strip().strip("()").strip(), text))
            self._alternatives.append(clauses)

    @staticmethod
    def _parse(clause: str, text: str) -> tuple[bool, str, str, str]:
        match = _COMPARISON.match(clause)
        if match is None:
            raise _refuse(text, f"{clause!r} is not FIELD OP VALUE")
        field, op = match["field"], match["op"]
        if field.lower() in ("state", "status.state"):
            field = "state"
        value = match["quoted"] if match["quoted"] is not None else match["bare"]
        known = field in ("name", "uid", "state") or field in _TIME_FIELDS
        if not known and not (field.startswith("labels.") and len(field) > len("labels.")):
            raise _refuse(
                text,
                f"unknown field {field!r}; use name, uid, status.state, labels.KEY, create_time "
                f"or update_time",
            )
        if field in _TIME_FIELDS:
            _time(value, text)
        elif op not in ("=", "!=", ":"):
            raise _refuse(text, f"{field} compares with =, != or :, not {op}")
        return bool(match["negate"]), field, op, value

    def matches(self, job: JobRecord) -> bool:
        """Whether ``job`` passes the filter (an empty filter passes every job)."""
        if not self._alternatives:
            return True
        return any(
            all(negate != _compare(job, field, op, value) for negate, field, op, value in clauses)
            for clauses in self._alternatives
        )


def order_jobs(jobs: Sequence[JobRecord], order_by: str) -> list[JobRecord]:
    """``jobs`` in ``orderBy`` order (creation order when empty). :raises ApiError: 400"""
    words = order_by.split()
    if not words:
        return list(jobs)
    descending = words[1:] == ["desc"]
    if words[0] not in _ORDERS or not (len(words) == 1 or descending):
        raise ApiError.invalid_argument(
            "order_by",
            f"unsupported orderBy {order_by!r}: Google supports 'name', 'name desc', "
            f"'create_time' and 'create_time desc'",
        )
    return sorted(jobs, key=_ORDERS[words[0]], reverse=descending)


def _compare(job: JobRecord, field: str, op: str, value: str) -> bool:
    if field in _TIME_FIELDS:
        actual: Any = _time(getattr(job, _TIME_FIELDS[field]), "")
        wanted: Any = _time(value, "")
    elif field.startswith("labels."):
        label = job.spec.labels.get(field[len("labels.") :])
        if op == ":" and value == "*":
            return label is not None
        actual, wanted = label, value
    elif field == "state":
        actual, wanted = job.state.value, value.upper()
    else:
        actual, wanted = getattr(job, field), value
        if field == "name" and "/" not in value:
            actual = job.job_id
    if actual is None:
        return op == "!="
    operations: dict[str, Callable[[Any, Any], bool]] = {
        "=": lambda a, b: a == b,
        ":": lambda a, b: a == b,
        "!=": lambda a, b: a != b,
        "<": lambda a, b: a < b,
        "<=": lambda a, b: a <= b,
        ">": lambda a, b: a > b,
        ">=": lambda a, b: a >= b,
    }
    return operations[op](actual, wanted)


def _time(value: str, text: str) -> datetime:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise _refuse(text, f"{value!r} is not an RFC 3339 time") from None


def _refuse(text: str, why: str) -> ApiError:
    return ApiError.invalid_argument(
        "filter",
        f'unsupported filter {text!r}: {why} (e.g. \'labels.env="prod" AND '
        f'create_time>"2024-01-01T00:00:00Z"\')',
    )
