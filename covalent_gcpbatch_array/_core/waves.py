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
from typing import Any, Protocol

import anyio
import sqlalchemy
from anyio.abc import TaskGroup

from covalent_gcpbatch_array._core import covalent_graph
from covalent_gcpbatch_array._core.coalescer import Batch, BatchPhase, BatchPolicy
from covalent_gcpbatch_array._core.covalent_graph import DispatchGraph, GraphNode
from covalent_gcpbatch_array.config import DEFAULTS, ExecutorConfig, resolve_config
from covalent_gcpbatch_array.exceptions import ConfigError

__all__ = ["DatabaseReader", "GraphReader", "WaveTracker", "node_keys", "server_reader"]

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
        self._dispatches: dict[str, _Dispatch] = {}
        self._watches: dict[str, _Watch] = {}  # open batches, by id
        self._received: dict[tuple[str, int], Batch[Any, Any]] = {}  # node -> its batch
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
        self._received[node] = batch
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

    # -- reading --

    async def _read_snapshot(self, dispatch_id: str, dispatch: _Dispatch) -> None:
        assert self._reader is not None
        try:
            graph = await self._reader.graph(dispatch_id)
            statuses = await self._reader.statuses(dispatch_id)
            keys = {node_id: self._key_of(node) for node_id, node in graph.nodes.items()}
        except Exception as exc:  # whatever went wrong, the timers still work
            logger.debug("dispatch %s: timers only (%s)", dispatch_id, exc)
            dispatch.state = _Known.UNREADABLE
        else:
            dispatch.graph, dispatch.statuses, dispatch.keys = graph, statuses, keys
            dispatch.state = _Known.READY
        self._recompute_dispatch(dispatch_id)

    async def _refresh_loop(self) -> None:
        assert self._reader is not None
        while True:
            await anyio.sleep(self._refresh_interval)
            self._forget_flushed()
            waited_for = {d for watch in self._watches.values() for d in watch.dispatches}
            for dispatch_id in sorted(waited_for):
                dispatch = self._dispatches[dispatch_id]
                if dispatch.state is not _Known.READY:
                    continue
                try:
                    dispatch.statuses = await self._reader.statuses(dispatch_id)
                except Exception as exc:  # whatever went wrong, the timers still work
                    logger.debug("dispatch %s: timers only from now on (%s)", dispatch_id, exc)
                    dispatch.state = _Known.UNREADABLE
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
            self._watches.pop(batch.batch_id, None)
        elif not self._graph_known(watch):
            batch.set_expecting(False)
        elif watch.missing:
            batch.set_expecting(True)
        else:
            self._watches.pop(batch.batch_id, None)
            batch.flush_complete()

    def _graph_known(self, watch: _Watch) -> bool:
        return all(self._dispatches[d].state is _Known.READY for d in watch.dispatches)

    def _expected_nodes(self, dispatch_id: str, watch: _Watch) -> set[tuple[str, int]]:
        dispatch = self._dispatches[dispatch_id]
        assert dispatch.graph is not None
        batch_key = (watch.batch.key, watch.batch.policy)
        coming: dict[int, bool] = {}
        return {
            (dispatch_id, node_id)
            for node_id, node in dispatch.graph.nodes.items()
            if dispatch.keys[node_id] == batch_key
            and dispatch.statuses.get(node_id) in _WAITING
            and (dispatch_id, node_id) not in self._received
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
        received = self._received.get((dispatch_id, node_id))
        if node is None:
            value = False
        elif status == covalent_graph.COMPLETED or node.type == covalent_graph.PARAMETER:
            value = True
        elif status not in _WAITING:
            value = False  # failed, cancelled, reused: its children never run
        elif received is not None:
            value = received.phase is not BatchPhase.OPEN  # in a job being monitored
        elif node.type in covalent_graph.COLLECTIONS:
            value = all(self._coming(dispatch_id, dispatch, p, memo) for p in node.parents)
        else:
            value = False
        memo[node_id] = value
        return value

    def _forget_flushed(self) -> None:
        for batch_id, watch in list(self._watches.items()):
            if watch.batch.phase is not BatchPhase.OPEN:
                del self._watches[batch_id]
