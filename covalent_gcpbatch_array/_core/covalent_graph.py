"""Covalent's database, read-only: the one module that knows its schema (Covalent 0.240.0).

Inside a Covalent server the executor reads the transport graph of a dispatch straight from the
server's database, through its own SQL on the server's engine, never through the dispatcher's
data-module calls (they queue on its single database thread and slow every dispatch). Three
tables matter::

    lattices            id, dispatch_id                     one row per (sub)dispatch
    electrons           id, parent_lattice_id, transport_graph_node_id, type, status,
                        executor, executor_data (JSON), is_active
    electron_dependency electron_id, parent_electron_id, is_active   (electron ids, not node ids)

:func:`check_schema` compares these with the real database once per engine; a Covalent upgrade
that changes them makes the graph unreadable (the executor falls back to its timers) and fails
``tests/test_covalent_graph.py``. Every function here blocks: call it in a worker thread.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import sqlalchemy
from sqlalchemy import column, select, table

from covalent_gcpbatch_array._core import compat

__all__ = [
    "DispatchGraph",
    "GraphNode",
    "GraphUnreadable",
    "check_schema",
    "read_graph",
    "read_statuses",
    "server_engine",
]

logger = logging.getLogger(__name__)

#: Node statuses (``str(RESULT_STATUS.X)``) that matter here.
NEW_OBJECT: Final = "NEW_OBJECT"  # parents unfinished, or ready and not yet submitted
RUNNING: Final = "RUNNING"  # written just before the executor's run() is called
COMPLETED: Final = "COMPLETED"
#: Node types whose value needs no executor.
PARAMETER: Final = "parameter"  # a constant argument; marked COMPLETED late
COLLECTIONS: Final = frozenset({"electron_list", "electron_dict"})  # built on the server

_LATTICES = table("lattices", column("id"), column("dispatch_id"))
_ELECTRONS = table(
    "electrons",
    column("id"),
    column("parent_lattice_id"),
    column("transport_graph_node_id"),
    column("type"),
    column("status"),
    column("executor"),
    column("executor_data"),
    column("is_active"),
)
_DEPENDENCIES = table(
    "electron_dependency",
    column("electron_id"),
    column("parent_electron_id"),
    column("is_active"),
)
_TABLES: Final = (_LATTICES, _ELECTRONS, _DEPENDENCIES)

_schema_checked: dict[str, str] = {}  # engine URL -> "" (as expected) or the problem


class GraphUnreadable(Exception):
    """The graph cannot be read: not in a server, schema changed, dispatch unknown, DB error."""


@dataclass(frozen=True)
class GraphNode:
    """One node of a dispatch's transport graph."""

    node_id: int
    type: str  # "function", "parameter", "electron_list", "sublattice", ...
    executor: str  # the executor's short name ("gcpbatch_array", "local", ...)
    attributes: dict[str, Any] | None  # an executor object's attributes; None: by short name
    parents: tuple[int, ...]  # node ids of its parents


@dataclass(frozen=True)
class DispatchGraph:
    """The static part of a dispatch's graph: nodes, their executors and edges."""

    dispatch_id: str
    nodes: dict[int, GraphNode]


def server_engine() -> sqlalchemy.engine.Engine | None:
    """The running Covalent server's database engine, or None outside a server.

    Looks only at modules already imported: importing Covalent's datastore elsewhere would
    create a database file.
    """
    datastore = sys.modules.get("covalent_dispatcher._db.datastore")
    if datastore is None or not compat.in_covalent_server():
        return None
    engine: sqlalchemy.engine.Engine = datastore.workflow_db.engine
    return engine


def check_schema(engine: sqlalchemy.engine.Engine) -> str:
    """``""`` if the database has every table and column read here, else what is missing.

    Checked once per database; the first result is logged at debug level and remembered.
    """
    url = str(engine.url)
    if url not in _schema_checked:
        try:
            inspector = sqlalchemy.inspect(engine)
            problem = ""
            for wanted in _TABLES:
                found = {c["name"] for c in inspector.get_columns(wanted.name)}
                missing = sorted(c.name for c in wanted.columns if c.name not in found)
                if missing:
                    problem = f"table {wanted.name} lacks columns {', '.join(missing)}"
                    break
        except sqlalchemy.exc.SQLAlchemyError as exc:
            problem = f"cannot inspect it: {exc}"
        if problem:
            logger.debug(
                "Covalent's database is not as covalent-gcpbatch-array expects (%s): batches "
                "flush by their timers only (batch_window, batch_idle_gap)",
                problem,
            )
        else:
            logger.debug("Covalent's database schema is as expected: graph-aware coalescing on")
        _schema_checked[url] = problem
    return _schema_checked[url]


def read_graph(engine: sqlalchemy.engine.Engine, dispatch_id: str) -> DispatchGraph:
    """The nodes and edges of a dispatch (one query each).

    :raises GraphUnreadable: schema not as expected, dispatch not found, or a database error
    """
    electron = _ELECTRONS.c
    nodes_query = (
        select(
            electron.id,
            electron.transport_graph_node_id,
            electron.type,
            electron.executor,
            electron.executor_data,
        )
        .select_from(_ELECTRONS.join(_LATTICES, _LATTICES.c.id == electron.parent_lattice_id))
        .where(_LATTICES.c.dispatch_id == dispatch_id, electron.is_active.is_(True))
    )
    parent = _ELECTRONS.alias("parent")
    child = _ELECTRONS.alias("child")
    edges_query = (
        select(child.c.transport_graph_node_id, parent.c.transport_graph_node_id)
        .select_from(
            _DEPENDENCIES.join(child, child.c.id == _DEPENDENCIES.c.electron_id)
            .join(parent, parent.c.id == _DEPENDENCIES.c.parent_electron_id)
            .join(_LATTICES, _LATTICES.c.id == child.c.parent_lattice_id)
        )
        .where(_LATTICES.c.dispatch_id == dispatch_id, _DEPENDENCIES.c.is_active.is_(True))
    )
    with _connection(engine) as connection:
        rows = connection.execute(nodes_query).all()
        edges = connection.execute(edges_query).all()
    if not rows:
        raise GraphUnreadable(f"dispatch {dispatch_id} is not in Covalent's database")
    parents: dict[int, list[int]] = {}
    for child_id, parent_id in edges:
        parents.setdefault(child_id, []).append(parent_id)
    nodes = {
        node_id: GraphNode(
            node_id=node_id,
            type=node_type,
            executor=executor or "",
            attributes=_attributes(executor_data),
            parents=tuple(sorted(set(parents.get(node_id, ())))),
        )
        for _, node_id, node_type, executor, executor_data in rows
    }
    return DispatchGraph(dispatch_id, nodes)


def read_statuses(engine: sqlalchemy.engine.Engine, dispatch_id: str) -> dict[int, str]:
    """Every node's status (a cheap query: about 10 ms for 2,000 nodes).

    :raises GraphUnreadable: schema not as expected, dispatch not found, or a database error
    """
    electron = _ELECTRONS.c
    query = (
        select(electron.transport_graph_node_id, electron.status)
        .select_from(_ELECTRONS.join(_LATTICES, _LATTICES.c.id == electron.parent_lattice_id))
        .where(_LATTICES.c.dispatch_id == dispatch_id, electron.is_active.is_(True))
    )
    with _connection(engine) as connection:
        statuses = {node_id: str(status) for node_id, status in connection.execute(query)}
    if not statuses:
        raise GraphUnreadable(f"dispatch {dispatch_id} is not in Covalent's database")
    return statuses


@contextlib.contextmanager
def _connection(engine: sqlalchemy.engine.Engine) -> Iterator[sqlalchemy.engine.Connection]:
    """A connection for reads only (nothing here writes or commits); a database error is
    GraphUnreadable."""
    if problem := check_schema(engine):
        raise GraphUnreadable(f"Covalent's database is not as expected: {problem}")
    try:
        with engine.connect() as connection:
            yield connection
    except sqlalchemy.exc.SQLAlchemyError as exc:
        raise GraphUnreadable(f"reading Covalent's database failed: {exc}") from exc


def _attributes(executor_data: str | None) -> dict[str, Any] | None:
    """An executor object's attributes; None for a short name (stored as ``{}``)."""
    try:
        data = json.loads(executor_data or "{}")
    except ValueError:
        return None
    attributes = data.get("attributes") if isinstance(data, dict) else None
    return attributes if isinstance(attributes, dict) else None
