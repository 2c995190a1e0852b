"""Summarising a py-spy profile (``py-spy record --format raw``) of the executor process.

The raw format is one line per distinct stack, ``frame;frame;...;frame COUNT``, root first,
each frame ``function (path:line)``. The suite records with ``--gil``: a sample is the stack of
the thread holding the GIL, so the shares below are shares of the executor's Python CPU time
(without ``--gil``, threads blocked on a socket would count as busy).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

__all__ = ["frame_name", "summarise"]

_FRAME_RE = re.compile(r"^(?P<function>.*?) \((?P<path>[^()]*?)(?::\d+)?\)$")
_STDLIB_RE = re.compile(r"lib/python3[.0-9]*/(.*)$")
#: Our own modules, whose inclusive shares say which step of an electron costs what.
_OWN_MODULES = ("covalent_gcpbatch_array/", "benchmarks/")


def _short_path(path: str) -> str:
    if "site-packages/" in path:
        return path.rsplit("site-packages/", 1)[1]
    for own in _OWN_MODULES:
        position = path.rfind(own)
        if position >= 0:
            return path[position:]
    stdlib = _STDLIB_RE.search(path)
    return stdlib[1] if stdlib else path


def frame_name(frame: str) -> str:
    """``function (module/path.py)`` without the line number, the unit of aggregation."""
    match = _FRAME_RE.match(frame.strip())
    if not match:
        return frame.strip()
    return f"{match['function']} ({_short_path(match['path'])})"


def summarise(raw: str, top: int = 20) -> dict[str, Any]:
    """The top functions of a raw py-spy profile, by self and by inclusive samples.

    :param raw: the text py-spy wrote with ``--format raw``
    :param top: how many functions each list keeps
    :returns: ``{"samples": n, "self": [[name, share], ...], "inclusive": [...],
        "own_inclusive": [...]}``, shares as fractions of all samples
    """
    total = 0
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame_name(frame) for frame in stack.split(";") if frame]
        if not frames:
            continue
        total += count
        self_counts[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count

    def shares(counter: Counter[str], keep: int) -> list[list[Any]]:
        return [[name, round(n / total, 4)] for name, n in counter.most_common(keep)]

    own = Counter(
        {name: n for name, n in inclusive.items() if any(m in name for m in _OWN_MODULES)}
    )
    return {
        "samples": total,
        "self": shares(self_counts, top) if total else [],
        "inclusive": shares(inclusive, top) if total else [],
        "own_inclusive": shares(own, top) if total else [],
    }
