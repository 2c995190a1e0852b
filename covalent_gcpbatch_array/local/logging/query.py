"""The part of the Cloud Logging query language the local cloud answers: ANDed comparisons.

What the CLI (``logs``), the executor and a Batch user's ordinary query send::

    logName="projects/p/logs/batch_task_logs" AND labels.job_uid="j-1" AND labels.task_id="j-1-group0-3"
    resource.type="batch.googleapis.com/Job" severity>=ERROR timestamp>="2024-05-01T00:00:00Z"

A query is comparisons joined by ``AND`` (or side by side, which Google reads as ``AND``). A
comparison is ``field OP value``: a field is a dotted path into the entry
(``resource.labels.location``), a value a quoted string or a bare word. ``=`` and ``!=`` compare
text exactly (a missing field is unequal to everything); ``<``, ``<=``, ``>``, ``>=`` (and ``=``)
compare ``severity`` by level (``DEBUG < INFO < ERROR``) and ``timestamp`` /
``receiveTimestamp`` by time, as Google documents.

Everything else in Google's language (``OR``, ``NOT``, parentheses, the ``:`` has-operator,
regular expressions, wildcards, global text search, functions) raises :class:`FilterError`
naming it, which the API answers with 400: a query the emulator cannot answer never returns an
empty list.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

__all__ = ["SEVERITIES", "FilterError", "Predicate", "parse_filter", "parse_timestamp"]

#: Cloud Logging's severity levels (``google.logging.type.LogSeverity``).
SEVERITIES: Mapping[str, int] = {
    "DEFAULT": 0,
    "DEBUG": 100,
    "INFO": 200,
    "NOTICE": 300,
    "WARNING": 400,
    "ERROR": 500,
    "CRITICAL": 600,
    "ALERT": 700,
    "EMERGENCY": 800,
}

Predicate = Callable[[Mapping[str, Any]], bool]

_NOT_SUPPORTED = "is not supported by the local cloud"
_FIELD = r"[A-Za-z_][\w.\-/]*"
_VALUE = r'"(?:[^"\\]|\\.)*"|[^\s"()]+'
# One comparison, then optional white space; ``=~``/``!~`` come first so they are not ``=``.
_COMPARISON = re.compile(
    rf"\s*(?P<field>{_FIELD})\s*(?P<op>=~|!~|>=|<=|!=|[=:<>])\s*(?P<value>{_VALUE})?\s*"
)
_ORDERED = {
    "=": lambda a, b: a == b,
    ">": lambda a, b: a > b,
    "<": lambda a, b: a < b,
    ">=": lambda a, b: a >= b,
    "<=": lambda a, b: a <= b,
}
_TIME_FIELDS = ("timestamp", "receiveTimestamp")


class FilterError(ValueError):
    """The filter is not valid, or uses a part of the language the emulator does not know."""


def parse_timestamp(text: str) -> datetime:
    """An RFC 3339 time as Cloud Logging writes and accepts it (``Z`` or an offset).

    :raises FilterError: ``text`` is not such a time
    """
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    # Python before 3.11 takes at most 6 fractional digits; Google may send 9.
    value = re.sub(r"(\.\d{6})\d+", r"\1", value)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise FilterError(f"{text!r} is not an RFC 3339 timestamp") from None
    if moment.tzinfo is None:
        raise FilterError(f"timestamp {text!r} needs a time zone, e.g. a trailing Z")
    return moment


def _text(field: str, entry: Mapping[str, Any]) -> str | None:
    value: Any = entry
    for part in field.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return None if isinstance(value, Mapping) else str(value)


def _time(field: str, entry: Mapping[str, Any]) -> datetime | None:
    value = entry.get(field)
    return None if value is None else parse_timestamp(value)


def _severity(entry: Mapping[str, Any]) -> int:
    return SEVERITIES.get(str(entry.get("severity")), 0)


def _unsupported(text: str, position: int) -> FilterError:
    """Name the construct at ``position`` that the emulator does not answer."""
    rest = text[position:].lstrip()
    word = rest.split(maxsplit=1)[0] if rest else ""
    if word == "AND":
        return FilterError("AND needs a comparison on each side")
    if word in ("OR", "NOT") or word.startswith("-"):
        what = f"the {'NOT' if word.startswith('-') else word} operator"
    elif word.startswith("("):
        what = "a parenthesised expression"
    elif word.startswith('"') or re.fullmatch(r"[\w.]+", word):
        what = f"a global restriction (a value without a field: {word!r})"
    else:
        what = f"{rest[:30]!r}"
    return FilterError(
        f"{what} {_NOT_SUPPORTED}: it answers comparisons (field = value) joined by AND"
    )


def _compare(field: str, op: str, raw: str) -> Predicate:
    if op in ("=~", "!~"):
        raise FilterError(f"regular expressions ({field}{op}...) are {_NOT_SUPPORTED[3:]}")
    if op == ":":
        raise FilterError(f"the has operator ({field}:...) {_NOT_SUPPORTED}; use =")
    quoted = raw.startswith('"')
    wanted = re.sub(r"\\(.)", r"\1", raw[1:-1]) if quoted else raw
    if not quoted and "*" in wanted:
        raise FilterError(f"wildcards ({raw!r}) are {_NOT_SUPPORTED[3:]}")
    key: Callable[[Mapping[str, Any]], Any]
    target: Any
    if field == "severity":
        target = SEVERITIES.get(wanted.upper())
        if target is None:
            raise FilterError(f"unknown severity {wanted!r}; use one of {', '.join(SEVERITIES)}")
        key = _severity
    elif field in _TIME_FIELDS:
        key, target = functools.partial(_time, field), parse_timestamp(wanted)
    elif op in ("=", "!="):
        key, target = functools.partial(_text, field), wanted
    else:
        raise FilterError(
            f"{op} on {field} {_NOT_SUPPORTED}: it orders only severity and timestamps"
        )
    if op == "!=":
        return lambda entry: key(entry) != target
    test = _ORDERED[op]
    return lambda entry: (value := key(entry)) is not None and test(value, target)


def parse_filter(text: str) -> Predicate:
    """Compile a Cloud Logging filter into a predicate over LogEntry JSON objects.

    :raises FilterError: the filter is malformed or uses what the emulator does not support
    """
    parts: list[Predicate] = []
    position = 0
    while text[position:].strip():
        joined = re.match(r"\s*AND\s", text[position:]) if parts else None
        if joined is not None:
            position += joined.end()
        match = _COMPARISON.match(text, position)
        if match is None:
            raise _unsupported(text, position)
        if match.group("value") is None:
            raise FilterError(f"expected a value after {match.group('field')}{match.group('op')}")
        parts.append(_compare(match.group("field"), match.group("op"), match.group("value")))
        position = match.end()
    return lambda entry: all(part(entry) for part in parts)
