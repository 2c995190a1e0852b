"""Response field masks, as Google's API front end applies them, for the Batch emulator.

Every Google REST API takes the *system parameter* ``$fields`` (query ``$fields`` or ``fields``,
or the header ``X-Goog-FieldMask``): a field mask that trims the response to the fields it names
(https://cloud.google.com/apis/docs/system-parameters). Its syntax
(https://developers.google.com/checks/guide/api/field-masks):

- paths separated by commas: ``tasks.name,nextPageToken``;
- ``.`` (or ``/``) steps into a message, and into every element of a repeated one;
- ``a(b,c)`` is ``a.b,a.c``, nested as deep as needed; ``*`` is every field (as the last step
  of a path only: the local cloud refuses ``a.*.b`` with 400);
- a path that stops at a message keeps all of it.

A mask is checked against the response's protobuf message; a path naming no field is refused
with 400 INVALID_ARGUMENT naming the path (Google refuses unknown fields too, rather than
return an answer that silently lacks them). Paths may use the JSON (camelCase) or proto
(snake_case) names. Into a map field the next step is a map key.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Union

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from covalent_gcpbatch_array.local.api_errors import ApiError

__all__ = ["FieldMask", "field_mask_text"]

#: A selection: JSON key -> what to keep of its value (None: all of it).
Selection = dict[str, Union["Selection", None]]

_TOKEN = re.compile(r"\s*(?:([A-Za-z_][A-Za-z0-9_]*|\*)|([.,()/]))")
#: Google's well-known types render as JSON scalars (Timestamp, Duration...): no sub-fields.
_LEAF_PACKAGE = "google.protobuf."


def field_mask_text(headers: Any, query: Any) -> str:
    """The mask a request carries: header ``X-Goog-FieldMask``, else ``$fields`` or ``fields``."""
    for value in (headers.get("x-goog-fieldmask"), query.get("$fields"), query.get("fields")):
        if value is not None:
            return str(value)
    return ""


class FieldMask:
    """A parsed, checked field mask for one response message type.

    :param selection: what to keep, keyed by JSON names (map keys as given)
    """

    def __init__(self, selection: Selection) -> None:
        self.selection = selection

    @staticmethod
    def parse(text: str, message: Descriptor) -> FieldMask | None:
        """The mask ``text`` for responses of type ``message``; None when it keeps everything.

        :raises ApiError: 400 when the text is not a field mask or names an unknown field
        """
        return _parse_cached(text.strip(), message)

    def apply(self, body: dict[str, Any]) -> dict[str, Any]:
        """``body`` (a response in JSON form) trimmed to the mask's fields."""
        trimmed = _trim(self.selection, body)
        assert isinstance(trimmed, dict)
        return trimmed


@functools.lru_cache(maxsize=256)
def _parse_cached(text: str, message: Descriptor) -> FieldMask | None:
    if not text:
        return None
    selection = _Parser(text).parse()
    if selection is None:
        return None
    return FieldMask(_checked(selection, message, ""))


class _Parser:
    """Recursive descent over ``list := item (',' item)*``, ``item := path ['(' list ')']``."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens: list[str] = []
        position = 0
        while position < len(text):
            match = _TOKEN.match(text, position)
            if match is None:
                if not text[position:].strip():
                    break
                self.fail(f"unexpected character {text[position]!r} at position {position}")
            assert match is not None
            self.tokens.append(match.group(1) or match.group(2))
            position = match.end()
        self.at = 0

    def fail(self, why: str) -> None:
        raise ApiError.invalid_argument("fields", f"{why} in field mask {self.text!r}")

    def peek(self) -> str | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def take(self) -> str | None:
        token = self.peek()
        self.at += 1
        return token

    def parse(self) -> Selection | None:
        selection = self.items()
        if self.peek() is not None:
            self.fail(f"unexpected {self.peek()!r}")
        return selection

    def items(self) -> Selection | None:
        selection: Selection | None = {}
        while True:
            selection = _merge(selection, self.item())
            if self.peek() != ",":
                return selection
            self.take()

    def item(self) -> Selection | None:
        path = [self.name()]
        while self.peek() in (".", "/"):
            self.take()
            path.append(self.name())
        if "*" in path[:-1]:
            self.fail("a '*' before the last step is not supported by the local cloud")
        below: Selection | None = None
        if self.peek() == "(":
            self.take()
            below = self.items()
            if self.take() != ")":
                self.fail("missing ')'")
        for step in reversed(path):
            below = None if step == "*" else {step: below}
        return below

    def name(self) -> str:
        token = self.take()
        if token is None or token in ".,()/":
            self.fail(f"expected a field name, got {token or 'the end'!r}")
        assert token is not None
        return token


def _merge(left: Selection | None, right: Selection | None) -> Selection | None:
    """Both selections at once; None (everything) absorbs any sub-selection."""
    if left is None or right is None:
        return None
    merged = dict(left)
    for key, below in right.items():
        merged[key] = _merge(merged[key], below) if key in merged else below
    return merged


def _checked(selection: Selection, message: Descriptor, prefix: str) -> Selection:
    """``selection`` keyed by JSON names, every step checked against ``message``."""
    checked: Selection = {}
    for step, below in selection.items():
        path = prefix + step
        field = _field(message, step)
        if field is None:
            known = ", ".join(sorted(f.json_name for f in message.fields))
            raise ApiError.invalid_argument(
                "fields",
                f"field mask path {path!r} names no field: {message.full_name} has no field "
                f"{step!r} (its fields: {known})",
            )
        if below is not None:
            below = _checked_below(field, below, path)
        key = field.json_name
        checked[key] = _merge(checked[key], below) if key in checked else below
    return checked


def _checked_below(field: FieldDescriptor, below: Selection, path: str) -> Selection:
    kind = field.message_type
    if kind is None or kind.full_name.startswith(_LEAF_PACKAGE):
        raise ApiError.invalid_argument(
            "fields",
            f"field mask path {path!r} goes inside {field.json_name!r}, which has no fields",
        )
    if not kind.GetOptions().map_entry:
        return _checked(below, kind, path + ".")
    # A map: the step after the field is a key, then a path into the value if it is a message.
    value = kind.fields_by_name["value"]
    return {
        key: None if inner is None else _checked_below(value, inner, f"{path}.{key}")
        for key, inner in below.items()
    }


def _field(message: Descriptor, step: str) -> FieldDescriptor | None:
    by_name: FieldDescriptor | None = message.fields_by_name.get(step)
    if by_name is not None:
        return by_name
    return next((field for field in message.fields if field.json_name == step), None)


def _trim(selection: Selection, value: Any) -> Any:
    if isinstance(value, list):
        return [_trim(selection, item) for item in value]
    if not isinstance(value, dict):
        return value
    return {
        key: value[key] if below is None else _trim(below, value[key])
        for key, below in selection.items()
        if key in value
    }
