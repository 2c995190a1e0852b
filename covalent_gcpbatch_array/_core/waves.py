"""Graph-aware flushing: a batch flushes the moment every electron of its wave has joined.

Covalent's dispatcher hands electrons over one at a time, 0.1 to 0.7 s apart depending on load,
so timers alone split a wave. Inside a Covalent server the :class:`WaveTracker` knows better:
on the first electron of a dispatch it reads the dispatch's graph (nodes, edges, executors) once,
and for each open batch it computes the electrons *expected* to join it: nodes of the batch's
key (job shape and policy), NEW_OBJECT or RUNNING, not received yet, whose parents are each

- COMPLETED, or a ``parameter`` node, or
- received by this executor in a batch that is no longer open (its result is coming), or
- a collection helper (``electron_list``/``electron_dict``) whose own parents are so.

While some are missing the batch is *expecting* (no idle-gap flush; the window and max_size
still cap it); when the last one joins it flushes (reason WAVE_COMPLETE). About once a second a
status query refreshes the expected sets (ended, cancelled or reused nodes drop out).

Memory follows the work in flight, so a server that is never idle does not grow it: a received
electron is forgotten once a status read shows Covalent recorded its end (the status query, about
once a second, also covers the dispatches whose jobs ended and whose results Covalent has not
recorded yet), and a dispatch's snapshot is dropped once no open batch watches it and none of its
electrons is in flight here (a later wave of it reads a fresh one, in a worker thread).

A batch holding an electron of a dispatch whose graph is unknown (still being read, or
unreadable: outside a server, schema changed, dispatch not found, database error) runs on the
timers alone, exactly as without this module. Pure anyio: the graph comes from a
:class:`GraphReader`, so the tests run it on trio's MockClock.
"""

from __future__ import annotations

import enum
import json
import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, NamedTuple, Protocol

import anyio
import sqlalchemy
from anyio.abc import TaskGroup

from covalent_gcpbatch_array._core import covalent_graph
from covalent_gcpbatch_array._core.coalescer import Batch, BatchPhase, BatchPolicy
from covalent_gcpbatch_array._core.covalent_graph import DispatchGraph, GraphNode
from covalent_gcpbatch_array.config import DEFAULTS, ExecutorConfig, resolve_config
from covalent_gcpbatch_array.exceptions import ConfigError

__all__ = [
    "DatabaseReader",
    "GraphReader",
    "WaveStatistics",
    "WaveTracker",
    "node_keys",
    "server_reader",
]

logger = logging.getLogger(__name__)

#: Seconds between status refreshes of the dispatches that open batches wait for.
REFRESH_INTERVAL = 1.0

_WAITING = (covalent_graph.NEW_OBJECT, covalent_graph.RUNNING)


class GraphReader(Protocol):
    """Where the graph of a dispatch comes from; both raise GraphUnreadable."""

    async def graph(self, dispatch_id: str) -> DispatchGraph: ...

    async def statuses(self, dispatch_id: str) -> dict[int, str]: ...


class DatabaseReader:
    """Reads a Covalent server's database in a worker thread (one at a time)."""

    def __init__(self, engine: sqlalchemy.engine.Engine) -> None:
        self._engine = engine
        self._limiter = anyio.CapacityLimiter(1)

    async def graph(self, dispatch_id: str) -> DispatchGraph:
        return await anyio.to_thread.run_sync(
            covalent_graph.read_graph, self._engine, dispatch_id, limiter=self._limiter
        )

    async def statuses(self, dispatch_id: str) -> dict[int, str]:
        return await anyio.to_thread.run_sync(
            covalent_graph.read_statuses, self._engine, dispatch_id, limiter=self._limiter
        )


def server_reader() -> DatabaseReader | None:
    """A reader of the running Covalent server's database, or None outside a server."""
    engine = covalent_graph.server_engine()
    return None if engine is None else DatabaseReader(engine)


def node_keys(
    policy_of: Callable[[ExecutorConfig], BatchPolicy],
) -> Callable[[GraphNode], Hashable | None]:
    """``key_of`` for the executor: a node's ``(job shape, policy)``, resolved as the server
    builds its executor (an object's attributes, else the config file, else the defaults);
    None for another executor, an invalid config, or ``graph_aware = false``."""
    from covalent._shared_files.config import get_config

    def read_config_file(key: str) -> Any:
        return get_config(f"executors.gcpbatch_array.{key}")

    keys: dict[str, Hashable | None] = {}  # validated once per distinct executor data

    def key_of(node: GraphNode) -> Hashable | None:
        if node.executor != "gcpbatch_array":
            return None
        given = {k: v for k, v in (node.attributes or {}).items() if k in DEFAULTS}
        cache_key = json.dumps(given, sort_keys=True, default=repr)
        if cache_key not in keys:
            try:
                config = ExecutorConfig.from_values(resolve_config(given, read_config_file))
            except ConfigError:
                keys[cache_key] = None
            else:
                keys[cache_key] = (config.shape, policy_of(config)) if config.graph_aware else None
        return keys[cache_key]

    return key_of


class _Known(enum.Enum):
    READING = "reading"  # the snapshot is being read
    READY = "ready"  # graph and statuses known
    UNREADABLE = "unreadable"  # fall back to the timers for this dispatch


class WaveStatistics(NamedTuple):
    """A snapshot of what a :class:`WaveTracker` holds: all of it bounded by the work in flight."""

    watched_batches: int  # open batches whose expected electrons it computes
    graphs: int  # dispatch snapshots: those of the dispatches an open batch watches
    dispatches: int  # dispatches it holds anything of (a snapshot or received electrons)
    nodes: int  # electrons received whose end Covalent has not recorded yet


@dataclass
class _Dispatch:
    state: _Known = _Known.READING
    graph: DispatchGraph | None = None
    statuses: dict[int, str] = field(default_factory=dict)
    keys: dict[int, Hashable | None] = field(default_factory=dict)  # node -> batch key


@dataclass
class _Watch:
    batch: Batch[Any, Any]
    dispatches: set[str] = field(default_factory=set)
    joined: set[tuple[str, int]] = field(default_factory=set)
    missing: set[tuple[str, int]] = field(default_factory=set)


class WaveTracker:
    """Tells open batches which electrons are still coming, and flushes complete waves.

    Use as ``async with WaveTracker(reader, key_of) as tracker:`` around the coalescer's life
    (it owns the snapshot reads and the refresh loop), and call :meth:`joined` right after each
    join.

    :param reader: the graph's source; None turns tracking off (every batch on its timers)
    :param key_of: a node's batch key ``(key, policy)`` as the coalescer groups it, or None for
        a node that does not run on this executor
    """

    def __init__(
        self,
        reader: GraphReader | None,
        key_of: Callable[[GraphNode], Hashable | None],
        *,
        refresh_interval: float = REFRESH_INTERVAL,
    ) -> None:
        self._reader = reader
        self._key_of = key_of
        self._refresh_interval = refresh_interval
        self._dispatches: dict[str, _Dispatch] = {}  # snapshots of the watched dispatches
        self._watches: dict[str, _Watch] = {}  # open batches, by id
        # dispatch -> node -> its batch, until a status read shows Covalent recorded its end
        self._received: dict[str, dict[int, Batch[Any, Any]]] = {}
        self._task_group: TaskGroup | None = None

    async def __aenter__(self) -> WaveTracker:
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        if self._reader is not None:
            self._task_group.start_soon(self._refresh_loop, name="wave tracker refresh")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        assert self._task_group is not None
        self._task_group.cancel_scope.cancel()
        return await self._task_group.__aexit__(exc_type, exc, traceback)

    def joined(self, batch: Batch[Any, Any], dispatch_id: str, node_id: int) -> None:
        """Record that node ``node_id`` of ``dispatch_id`` joined ``batch``; flush if complete."""
        if self._reader is None:
            return
        node = (dispatch_id, node_id)
        self._received.setdefault(dispatch_id, {})[node_id] = batch
        dispatch = self._dispatches.get(dispatch_id)
        if dispatch is None:
            dispatch = self._dispatches[dispatch_id] = _Dispatch()
            assert self._task_group is not None
            self._task_group.start_soon(self._read_snapshot, dispatch_id, dispatch)
        watch = self._watches.get(batch.batch_id)
        if watch is None:
            watch = self._watches[batch.batch_id] = _Watch(batch)
        watch.joined.add(node)
        if dispatch_id in watch.dispatches:
            watch.missing.discard(node)
            self._settle(watch)
        else:
            watch.dispatches.add(dispatch_id)
            self._recompute(watch)

    def expected(self, batch: Batch[Any, Any]) -> set[tuple[str, int]] | None:
        """The nodes the open ``batch`` still waits for, or None if it runs on its timers."""
        watch = self._watches.get(batch.batch_id)
        if watch is None or not self._graph_known(watch):
            return None
        return set(watch.missing)

    def statistics(self) -> WaveStatistics:
        """What the tracker holds now."""
        return WaveStatistics(
            watched_batches=len(self._watches),
            graphs=len(self._dispatches),
            dispatches=len(self._dispatches.keys() | self._received.keys()),
            nodes=sum(len(nodes) for nodes in self._received.values()),
        )

    # -- reading --

    async def _read_snapshot(self, dispatch_id: str, dispatch: _Dispatch) -> None:
        assert self._reader is not None
        try:
            graph = await self._reader.graph(dispatch_id)
            statuses = await self._reader.statuses(dispatch_id)
            keys = {node_id: self._key_of(node) for node_id, node in graph.nodes.items()}
        except Exception as exc:  # whatever went wrong, the timers still work
            logger.debug("dispatch %s: timers only for this wave (%s)", dispatch_id, exc)
            dispatch.state = _Known.UNREADABLE
        else:
            dispatch.graph, dispatch.statuses, dispatch.keys = graph, statuses, keys
            dispatch.state = _Known.READY
            self._forget_recorded(dispatch_id, statuses)
        if self._dispatches.get(dispatch_id) is dispatch:  # still watched
            self._recompute_dispatch(dispatch_id)

    async def _refresh_loop(self) -> None:
        assert self._reader is not None
        while True:
            await anyio.sleep(self._refresh_interval)
            self._forget_flushed()
            # The watched dispatches, and those whose ended jobs' results Covalent has not
            # recorded yet (until it has, they still count as coming for the next wave).
            ended = {
                dispatch_id
                for dispatch_id, nodes in self._received.items()
                if any(batch.phase is BatchPhase.DONE for batch in nodes.values())
            }
            for dispatch_id in sorted(self._watched() | ended):
                dispatch = self._dispatches.get(dispatch_id)
                if dispatch is not None and dispatch.state is not _Known.READY:
                    continue  # its snapshot is being read, or it runs on the timers
                try:
                    statuses = await self._reader.statuses(dispatch_id)
                except Exception as exc:  # whatever went wrong, the timers still work
                    logger.debug("dispatch %s: timers only for this wave (%s)", dispatch_id, exc)
                    if dispatch is not None:
                        dispatch.state = _Known.UNREADABLE
                    self._forget_ended(dispatch_id)  # or a dispatch gone would be read for ever
                else:
                    if dispatch is not None:
                        dispatch.statuses = statuses
                    self._forget_recorded(dispatch_id, statuses)
                self._recompute_dispatch(dispatch_id)

    # -- deciding --

    def _recompute_dispatch(self, dispatch_id: str) -> None:
        for watch in list(self._watches.values()):
            if dispatch_id in watch.dispatches:
                self._recompute(watch)

    def _recompute(self, watch: _Watch) -> None:
        if watch.batch.phase is BatchPhase.OPEN and self._graph_known(watch):
            watch.missing = set()
            for dispatch_id in watch.dispatches:
                watch.missing |= self._expected_nodes(dispatch_id, watch)
            watch.missing -= watch.joined
        self._settle(watch)

    def _settle(self, watch: _Watch) -> None:
        batch = watch.batch
        if batch.phase is not BatchPhase.OPEN:
            self._unwatch(watch)
        elif not self._graph_known(watch):
            batch.set_expecting(False)
        elif watch.missing:
            batch.set_expecting(True)
        else:
            self._unwatch(watch)
            batch.flush_complete()

    def _graph_known(self, watch: _Watch) -> bool:
        return all(self._dispatches[d].state is _Known.READY for d in watch.dispatches)

    def _expected_nodes(self, dispatch_id: str, watch: _Watch) -> set[tuple[str, int]]:
        dispatch = self._dispatches[dispatch_id]
        assert dispatch.graph is not None
        batch_key = (watch.batch.key, watch.batch.policy)
        received = self._received.get(dispatch_id, {})
        coming: dict[int, bool] = {}
        return {
            (dispatch_id, node_id)
            for node_id, node in dispatch.graph.nodes.items()
            if dispatch.keys[node_id] == batch_key
            and dispatch.statuses.get(node_id) in _WAITING
            and node_id not in received
            and all(self._coming(dispatch_id, dispatch, p, coming) for p in node.parents)
        }

    def _coming(
        self, dispatch_id: str, dispatch: _Dispatch, node_id: int, memo: dict[int, bool]
    ) -> bool:
        """Whether a parent's value is there or on its way without another wave first."""
        if node_id in memo:
            return memo[node_id]
        memo[node_id] = False  # a cycle (impossible in a DAG) counts as not coming
        assert dispatch.graph is not None
        node = dispatch.graph.nodes.get(node_id)
        status = dispatch.statuses.get(node_id)
        received = self._received.get(dispatch_id, {}).get(node_id)
        if node is None:
            value = False
        elif status == covalent_graph.COMPLETED or node.type == covalent_graph.PARAMETER:
            value = True
        elif status not in _WAITING:
            value = False  # failed, cancelled, reused: its children never run
        elif received is not None:
            value = received.phase is not BatchPhase.OPEN  # in our job, or its result recording
        elif node.type in covalent_graph.COLLECTIONS:
            value = all(self._coming(dispatch_id, dispatch, p, memo) for p in node.parents)
        else:
            value = False
        memo[node_id] = value
        return value

    # -- forgetting --

    def _watched(self) -> set[str]:
        return {d for watch in self._watches.values() for d in watch.dispatches}

    def _unwatch(self, watch: _Watch) -> None:
        """Stop watching a batch no longer open; drop the snapshots nothing needs any more."""
        self._watches.pop(watch.batch.batch_id, None)
        for dispatch_id in watch.dispatches:
            self._drop_snapshot_if_idle(dispatch_id)

    def _drop_snapshot_if_idle(self, dispatch_id: str) -> None:
        """Drop a dispatch's snapshot once no open batch watches it and none of its electrons
        is still in flight here. While one is, its next wave is forming (Covalent starts it as
        that electron's result is recorded) and must find the graph known at once: a fresh read
        then would leave the wave's first electrons on the timers for the read's duration, long
        enough under load for the idle gap to split the wave."""
        if dispatch_id not in self._watched() and dispatch_id not in self._received:
            self._dispatches.pop(dispatch_id, None)

    def _forget_flushed(self) -> None:
        for watch in list(self._watches.values()):
            if watch.batch.phase is not BatchPhase.OPEN:
                self._unwatch(watch)

    def _forget_recorded(self, dispatch_id: str, statuses: dict[int, str]) -> None:
        """Forget the received electrons whose end Covalent recorded: their status alone now
        says they are neither expected nor coming."""
        self._forget(dispatch_id, lambda node_id, _: statuses.get(node_id) not in _WAITING)

    def _forget_ended(self, dispatch_id: str) -> None:
        """Forget the received electrons whose job ended (their status cannot be read)."""
        self._forget(dispatch_id, lambda _, batch: batch.phase is BatchPhase.DONE)

    def _forget(self, dispatch_id: str, done: Callable[[int, Batch[Any, Any]], bool]) -> None:
        nodes = self._received.get(dispatch_id, {})
        for node_id in [node_id for node_id, batch in nodes.items() if done(node_id, batch)]:
            del nodes[node_id]
        if not nodes:
            self._received.pop(dispatch_id, None)
            self._drop_snapshot_if_idle(dispatch_id)
