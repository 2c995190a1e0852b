"""The schema module against a real Covalent server's database.

A Covalent upgrade that changes the tables, columns or the way the graph is stored fails here
(the executor itself would silently fall back to its timers).
"""

from __future__ import annotations

import shutil
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import covalent as ct
import pytest
import sqlalchemy
import toml

from covalent_gcpbatch_array._core import covalent_graph
from covalent_gcpbatch_array._core.covalent_graph import GraphUnreadable
from covalent_gcpbatch_array.cli.covalent_server import CovalentServer
from covalent_gcpbatch_array.local import LocalCloud
from tests.test_covalent_e2e import dispatch, explicit_executor, wait_result

pytestmark = pytest.mark.slow

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def first(x: int) -> int:
    return x + 1


def second(a: int, b: int) -> int:
    return a * b


@pytest.fixture(scope="module")
def finished(covalent_server: CovalentServer, local_cloud: LocalCloud) -> Iterator[dict[str, Any]]:
    """A finished dispatch: first(1) on the short name, then second(first, 3) on an object."""
    by_name = ct.electron(first, executor="gcpbatch_array")
    by_object = ct.electron(second, executor=explicit_executor(local_cloud, vcpus=1))

    @ct.lattice(executor="local", workflow_executor="local")
    def workflow(x: int) -> list[int]:
        a = by_name(x)
        return [by_object(a, 3), by_object(a, 4)]

    dispatch_id = dispatch(covalent_server, workflow, 1)
    result = wait_result(covalent_server, dispatch_id)
    assert str(result.status) == "COMPLETED", result.error
    db_path = toml.loads(covalent_server.config_file.read_text())["dispatcher"]["db_path"]
    engine = sqlalchemy.create_engine(f"sqlite+pysqlite:///{db_path}")
    yield {"dispatch_id": dispatch_id, "engine": engine, "db_path": db_path}
    engine.dispose()


def test_the_server_database_has_the_schema_read_here(finished: dict[str, Any]) -> None:
    assert covalent_graph.check_schema(finished["engine"]) == ""


def test_the_graph_names_types_executors_attributes_and_parents(finished: dict[str, Any]) -> None:
    graph = covalent_graph.read_graph(finished["engine"], finished["dispatch_id"])
    ours = {n.node_id: n for n in graph.nodes.values() if n.executor == "gcpbatch_array"}
    assert len(ours) == 3
    by_name = [n for n in ours.values() if n.attributes is None]
    by_object = [n for n in ours.values() if n.attributes is not None]
    assert len(by_name) == 1 and len(by_object) == 2
    (root,) = by_name
    for node in by_object:
        assert node.type == "function"
        assert node.attributes is not None and node.attributes["vcpus"] == 1
        assert root.node_id in node.parents  # the edge first -> second, by node id
        constants = [graph.nodes[p] for p in node.parents if p != root.node_id]
        assert [p.type for p in constants] == ["parameter"]
    assert [graph.nodes[p].type for p in root.parents] == ["parameter"]


def test_statuses_are_covalents_status_names(finished: dict[str, Any]) -> None:
    statuses = covalent_graph.read_statuses(finished["engine"], finished["dispatch_id"])
    graph = covalent_graph.read_graph(finished["engine"], finished["dispatch_id"])
    assert set(statuses) == set(graph.nodes)
    assert set(statuses.values()) == {covalent_graph.COMPLETED}


def test_an_unknown_dispatch_is_unreadable(finished: dict[str, Any]) -> None:
    with pytest.raises(GraphUnreadable, match="not in Covalent's database"):
        covalent_graph.read_graph(finished["engine"], "no-such-dispatch")
    with pytest.raises(GraphUnreadable, match="not in Covalent's database"):
        covalent_graph.read_statuses(finished["engine"], "no-such-dispatch")


def test_a_changed_schema_is_found_once_and_makes_the_graph_unreadable(
    finished: dict[str, Any], tmp_path: Path
) -> None:
    copy = tmp_path / "changed.sqlite"
    shutil.copy(finished["db_path"], copy)
    with sqlite3.connect(copy) as connection:
        connection.execute("ALTER TABLE electrons RENAME COLUMN executor_data TO executor_json")
    engine = sqlalchemy.create_engine(f"sqlite+pysqlite:///{copy}")
    try:
        assert "electrons lacks columns executor_data" in covalent_graph.check_schema(engine)
        with pytest.raises(GraphUnreadable, match="not as expected"):
            covalent_graph.read_graph(engine, finished["dispatch_id"])
    finally:
        engine.dispose()


def test_outside_a_server_there_is_no_engine() -> None:
    assert covalent_graph.server_engine() is None
