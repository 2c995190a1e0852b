"""A subset of the Cloud Logging query language, enough for the filters Batch users write.

The emulator's ``entries:list`` accepts filters such as::

    logName="projects/p/logs/batch_task_logs" AND labels.job_uid="j-1" AND labels.task_id="j-1-group0-3"
    resource.type=generic_task OR resource.type="batch.googleapis.com/Job"
    severity>=ERROR timestamp>="2024-05-01T00:00:00Z" "Traceback"

Grammar (Google's precedence: ``NOT`` binds tightest, then ``OR``, then ``AND``, and two
terms side by side mean ``AND``)::

    query      := conjunct (["AND"] conjunct)*
    conjunct   := negation ("OR" negation)*
    negation   := ("NOT" | "-") negation | "(" query ")" | comparison | value
    comparison := field ("=" | "!=" | ":" | ">" | "<" | ">=" | "<=") value
    value      := "quoted string" | bare-word

A field is a dotted path into the entry (``labels.task_id``, ``resource.labels.location``); a
missing field matches nothing but ``!=``. ``severity`` compares by level (``DEBUG < INFO <
ERROR``), ``timestamp`` by time, everything else as text (``=`` exact, ``:`` substring, case
folded). A lone value matches entries where any text field contains it. Anything else (regular
expressions ``=~``, functions, ``*`` wildcards) is refused with :class:`FilterError` rather
than ignored, so a test never passes on a filter the emulator did not understand.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
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

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>"(?:[^"\\]|\\.)*")
      | (?P<op>>=|<=|!=|=~|!~|[=:<>()])
      | (?P<negate>-)(?=[\w"(])
      | (?P<word>[^\s"=:<>()!]+)
    )""",
    re.VERBOSE,
)
_COMPARISONS = ("=", "!=", ":", ">", "<", ">=", "<=")


class FilterError(ValueError):
    """The filter is not valid, or uses a part of the language the emulator does not know."""


@dataclass(frozen=True)
class _Token:
    kind: str  # "string", "op" or "word"
    text: str  # the value (strings unquoted and unescaped)


def _tokens(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    position = 0
    while position < len(text):
        if text[position:].strip() == "":
            break
        match = _TOKEN.match(text, position)
        if match is None:
            raise FilterError(f"unexpected character at {position}: {text[position:][:20]!r}")
        position = match.end()
        if match.group("string") is not None:
            raw = match.group("string")[1:-1]
            tokens.append(_Token("string", re.sub(r"\\(.)", r"\1", raw)))
        elif match.group("op") is not None:
            tokens.append(_Token("op", match.group("op")))
        elif match.group("negate") is not None:
            tokens.append(_Token("word", "NOT"))
        else:
            tokens.append(_Token("word", match.group("word")))
    return tokens


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


def _field(entry: Mapping[str, Any], path: str) -> Any:
    value: Any = entry
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _text_values(value: Any) -> Iterator[str]:
    if isinstance(value, Mapping):
        for item in value.values():
            yield from _text_values(item)
    elif isinstance(value, str):
        yield value


def _compare(field: str, op: str, wanted: str) -> Predicate:
    if field == "severity":
        level = SEVERITIES.get(wanted.upper())
        if level is None:
            raise FilterError(f"unknown severity {wanted!r}; use one of {', '.join(SEVERITIES)}")

        def severity_key(entry: Mapping[str, Any]) -> Any:
            return SEVERITIES.get(str(entry.get("severity", "DEFAULT")), 0)

        return _ordered(op, severity_key, level)
    if field in ("timestamp", "receiveTimestamp"):
        moment = parse_timestamp(wanted)

        def time_key(entry: Mapping[str, Any]) -> Any:
            value = entry.get(field)
            return None if value is None else parse_timestamp(value)

        return _ordered(op, time_key, moment)

    folded = wanted.casefold()

    def text_key(entry: Mapping[str, Any]) -> Any:
        value = _field(entry, field)
        return None if value is None or isinstance(value, Mapping) else str(value)

    if op == ":":
        return lambda entry: (value := text_key(entry)) is not None and folded in value.casefold()
    return _ordered(op, text_key, wanted)


def _ordered(op: str, key: Callable[[Mapping[str, Any]], Any], wanted: Any) -> Predicate:
    tests: dict[str, Callable[[Any], bool]] = {
        "=": lambda value: value == wanted,
        ":": lambda value: value == wanted,
        "!=": lambda value: value != wanted,
        ">": lambda value: value > wanted,
        "<": lambda value: value < wanted,
        ">=": lambda value: value >= wanted,
        "<=": lambda value: value <= wanted,
    }
    test = tests[op]

    def predicate(entry: Mapping[str, Any]) -> bool:
        value = key(entry)
        if value is None:
            return op == "!="
        return test(value)

    return predicate


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokens(text)
        self.position = 0

    def peek(self) -> _Token | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def take(self) -> _Token:
        token = self.peek()
        if token is None:
            raise FilterError(f"the filter ends too early: {self.text!r}")
        self.position += 1
        return token

    def is_keyword(self, word: str) -> bool:
        token = self.peek()
        return token is not None and token.kind == "word" and token.text == word

    def query(self) -> Predicate:
        parts = [self.conjunct()]
        while True:
            token = self.peek()
            if token is None or (token.kind == "op" and token.text == ")"):
                break
            if self.is_keyword("AND"):
                self.take()
            parts.append(self.conjunct())
        return parts[0] if len(parts) == 1 else lambda entry: all(p(entry) for p in parts)

    def conjunct(self) -> Predicate:
        parts = [self.negation()]
        while self.is_keyword("OR"):
            self.take()
            parts.append(self.negation())
        return parts[0] if len(parts) == 1 else lambda entry: any(p(entry) for p in parts)

    def negation(self) -> Predicate:
        if self.is_keyword("NOT"):
            self.take()
            inner = self.negation()
            return lambda entry: not inner(entry)
        token = self.take()
        if token.kind == "op" and token.text == "(":
            inner = self.query()
            closing = self.take()
            if closing.kind != "op" or closing.text != ")":
                raise FilterError(f"expected ')' in {self.text!r}")
            return inner
        if token.kind == "op":
            raise FilterError(f"unexpected {token.text!r} in {self.text!r}")
        if token.text in ("AND", "OR"):
            raise FilterError(f"{token.text} needs a term on both sides in {self.text!r}")
        following = self.peek()
        if following is not None and following.kind == "op" and following.text not in "()":
            return self.comparison(token)
        return self.global_value(token.text)

    def comparison(self, field_token: _Token) -> Predicate:
        if field_token.kind != "word" or not re.fullmatch(r"[A-Za-z_][\w.\-/]*", field_token.text):
            raise FilterError(f"{field_token.text!r} is not a field name in {self.text!r}")
        op = self.take().text
        if op not in _COMPARISONS:
            raise FilterError(
                f"operator {op!r} is not supported by the emulator (regular expressions are "
                f"not); use one of {' '.join(_COMPARISONS)}"
            )
        value = self.take()
        if value.kind == "op":
            raise FilterError(f"expected a value after {field_token.text}{op} in {self.text!r}")
        if value.kind == "word" and "*" in value.text:
            raise FilterError(f"wildcards are not supported by the emulator: {value.text!r}")
        return _compare(field_token.text, op, value.text)

    def global_value(self, wanted: str) -> Predicate:
        folded = wanted.casefold()
        return lambda entry: any(folded in text.casefold() for text in _text_values(entry))


def parse_filter(text: str) -> Predicate:
    """Compile a Cloud Logging filter into a predicate over LogEntry JSON objects.

    :raises FilterError: the filter is malformed or uses what the emulator does not support
    """
    if not text.strip():
        return lambda entry: True
    parser = _Parser(text)
    predicate = parser.query()
    if parser.peek() is not None:
        raise FilterError(f"unbalanced ')' in {text!r}")
    return predicate
