"""Graph-aware flushing (WaveTracker with the real Coalescer), on trio's MockClock.

The graph comes from :class:`Graphs`, an in-memory stand-in for Covalent's database that the
test changes as Covalent would (statuses); reads take ``READ_TIME`` of virtual time. The real
database is read in tests/test_covalent_graph.py.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
import trio.testing

from covalent_gcpbatch_array._core.coalescer import Batch, BatchPolicy, Coalescer, FlushReason
from covalent_gcpbatch_array._core.covalent_graph import DispatchGraph, GraphNode, GraphUnreadable
from covalent_gcpbatch_array._core.waves import WaveStatistics, WaveTracker

POLICY = BatchPolicy(window=10.0, idle_gap=2.0, max_size=1000)
READ_TIME = 0.0625  # virtual seconds per database read
OURS = "gcpbatch_array"


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})


@dataclass
class Graphs:
    """Dispatch graphs and statuses, as Covalent's database would hold them."""

    nodes: dict[str, dict[int, GraphNode]] = field(default_factory=dict)
    status: dict[str, dict[int, str]] = field(default_factory=dict)
    broken: set[str] = field(default_factory=set)  # dispatches whose reads fail
    crash: bool = False  # reads raise an unexpected error (not GraphUnreadable)
    reads: int = 0
    read_time: float = READ_TIME  # virtual seconds per read (a loaded database: longer)

    def add(self, dispatch: str, node: int, parents: tuple[int, ...] = (), **kw: Any) -> None:
        kind = kw.get("type", "function")
        self.nodes.setdefault(dispatch, {})[node] = GraphNode(
            node, kind, kw.get("executor", OURS), kw.get("attributes"), parents
        )
        status = "COMPLETED" if kind == "parameter" else kw.get("status", "NEW_OBJECT")
        self.status.setdefault(dispatch, {})[node] = status

    async def graph(self, dispatch_id: str) -> DispatchGraph:
        await self._read(dispatch_id)
        return DispatchGraph(dispatch_id, dict(self.nodes[dispatch_id]))

    async def statuses(self, dispatch_id: str) -> dict[int, str]:
        await self._read(dispatch_id)
        return dict(self.status[dispatch_id])

    async def _read(self, dispatch_id: str) -> None:
        self.reads += 1
        await anyio.sleep(self.read_time)
        if self.crash:
            raise AttributeError("'Connection' object has no attribute 'rollback'")
        if dispatch_id in self.broken or dispatch_id not in self.nodes:
            raise GraphUnreadable(f"dispatch {dispatch_id} is not readable")


def key_of(node: GraphNode) -> Hashable | None:
    """Nodes on OURS share a key; ``attributes={"shape": X}`` gives another shape."""
    if node.executor != OURS:
        return None
    return ((node.attributes or {}).get("shape", "small"), POLICY)


@dataclass
class Harness:
    """A coalescer and a tracker; electrons join at chosen times and are recorded."""

    coalescer: Coalescer[str, None]
    tracker: WaveTracker
    task_group: Any
    batches: list[Batch[str, None]] = field(default_factory=list)

    def run(self, dispatch: str, node: int, shape: str = "small") -> None:
        member = self.coalescer.join(shape, POLICY)
        if member.batch not in self.batches:
            self.batches.append(member.batch)
        self.tracker.joined(member.batch, dispatch, node)
        member.set_ready()
        self.task_group.start_soon(member.wait)

    def flushes(self) -> list[tuple[FlushReason | None, float | None, int]]:
        """(reason, flush time relative to t0, members) per batch, in opening order."""
        return [
            (b.flush_reason, None if b.flushed_at is None else b.flushed_at - T0, len(b.members))
            for b in self.batches
        ]


T0 = 0.0


async def launch(batch: Batch[str, None]) -> None:
    for member in batch.live_members():
        member.resolve(None)


class Run:
    """``async with Run(graphs) as h:`` a harness whose clock starts at T0."""

    def __init__(self, graphs: Graphs | None) -> None:
        self.graphs = graphs

    async def __aenter__(self) -> Harness:
        global T0
        T0 = anyio.current_time()
        self._tracker = WaveTracker(self.graphs, key_of)
        self._coalescer: Coalescer[str, None] = Coalescer(launch)
        self._group = anyio.create_task_group()
        await self._tracker.__aenter__()
        await self._coalescer.__aenter__()
        await self._group.__aenter__()
        return Harness(self._coalescer, self._tracker, self._group)

    async def __aexit__(self, *exc: Any) -> None:
        await self._group.__aexit__(*exc)
        await self._coalescer.__aexit__(*exc)
        await self._tracker.__aexit__(*exc)


def fan_out(graphs: Graphs, dispatch: str, n: int) -> list[int]:
    """n electrons on OURS, each with a constant argument: node 2i (parameter 2i+1)."""
    for i in range(n):
        graphs.add(dispatch, 2 * i + 1, type="parameter", executor="dask")
        graphs.add(dispatch, 2 * i, (2 * i + 1,))
    return [2 * i for i in range(n)]


async def arrive(
    h: Harness, dispatch: str, nodes: list[int], gap: float, shape: str = "small"
) -> None:
    for node in nodes:
        h.run(dispatch, node, shape)
        await anyio.sleep(gap)


# -- tests ---------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_small_fan_out_flushes_when_its_last_electron_joins() -> None:
    graphs = Graphs()
    nodes = fan_out(graphs, "d", 10)
    async with Run(graphs) as h:
        await arrive(h, "d", nodes, gap=0.125)
    assert h.flushes() == [(FlushReason.WAVE_COMPLETE, 9 * 0.125, 10)]


@pytest.mark.anyio
async def test_a_wave_slower_than_the_idle_gap_stays_one_batch_until_complete() -> None:
    graphs = Graphs()
    nodes = fan_out(graphs, "d", 4)
    async with Run(graphs) as h:
        await arrive(h, "d", nodes, gap=3.0)  # each gap longer than idle_gap (2 s)
    assert h.flushes() == [(FlushReason.WAVE_COMPLETE, 9.0, 4)]


@pytest.mark.anyio
async def test_a_straggler_holds_the_wave_only_until_the_window_cap() -> None:
    graphs = Graphs()
    nodes = fan_out(graphs, "d", 5)
    async with Run(graphs) as h:
        await arrive(h, "d", nodes[:4], gap=0.5)
        await anyio.sleep(20)
        h.run("d", nodes[4])
    # The first four are still in flight, so "d"'s snapshot is kept: the straggler's batch knows
    # the graph at once (no fresh read) and flushes the moment it joins.
    assert h.flushes() == [
        (FlushReason.WINDOW, 10.0, 4),
        (FlushReason.WAVE_COMPLETE, 22.0, 1),
    ]


@pytest.mark.anyio
async def test_without_a_graph_the_timers_alone_decide_exactly_as_before() -> None:
    for graphs in (None, Graphs()):  # outside a server; a dispatch the database lacks
        async with Run(graphs) as h:
            await arrive(h, "d", [0, 2, 4], gap=0.5)
            await anyio.sleep(3.0)
            await arrive(h, "d", [6], gap=0)
        assert h.flushes() == [(FlushReason.IDLE, 3.0, 3), (FlushReason.IDLE, 6.5, 1)]


@pytest.mark.anyio
async def test_an_unexpected_error_while_reading_leaves_the_timers_in_charge() -> None:
    graphs = Graphs(crash=True)
    nodes = fan_out(graphs, "d", 3)
    async with Run(graphs) as h:
        await arrive(h, "d", nodes[:2], gap=0.5)
    assert h.flushes() == [(FlushReason.IDLE, 2.5, 2)]


@pytest.mark.anyio
async def test_a_status_read_failure_falls_back_to_the_idle_gap() -> None:
    graphs = Graphs()
    nodes = fan_out(graphs, "d", 5)
    async with Run(graphs) as h:
        await arrive(h, "d", nodes[:2], gap=0.5)  # joins at 0 and 0.5; expecting 3 more
        graphs.broken.add("d")  # the refresh at about 1 s fails
    reason, flushed_at, members = h.flushes()[0]
    assert (reason, members) == (FlushReason.IDLE, 2)
    assert flushed_at == 2.5  # the last join plus the idle gap: today's timers


@pytest.mark.anyio
async def test_the_refresh_drops_a_cancelled_electron_and_the_wave_completes() -> None:
    graphs = Graphs()
    nodes = fan_out(graphs, "d", 3)
    async with Run(graphs) as h:
        await arrive(h, "d", nodes[:2], gap=0.25)
        graphs.status["d"][nodes[2]] = "CANCELLED"
        await anyio.sleep(5.0)
    reason, flushed_at, members = h.flushes()[0]
    assert (reason, members) == (FlushReason.WAVE_COMPLETE, 2)
    assert flushed_at is not None and flushed_at < 2.0  # at a refresh, before the idle gap


def three_waves(graphs: Graphs, train_shape: str) -> tuple[list[int], list[int]]:
    """Dispatch "d": load (node 0) -> 6 train -> 6 score (each needs load and its train)."""
    graphs.add("d", 0)
    train, score = list(range(1, 7)), list(range(11, 17))
    for t, s in zip(train, score, strict=True):
        graphs.add("d", t, (0,), attributes={"shape": train_shape})
        graphs.add("d", s, (0, t))
    return train, score


async def run_three_waves(
    h: Harness, graphs: Graphs, train_shape: str = "small", later_read_time: float | None = None
) -> list[int]:
    """Run the waves of :func:`three_waves`, train results ending in two bursts 5 s apart;
    return the score nodes (their jobs ended, their ends not recorded by Covalent yet).

    :param later_read_time: from the train wave on, each database read takes this long
    """
    train, score = three_waves(graphs, train_shape)
    h.run("d", 0)
    await anyio.sleep(1.0)
    graphs.status["d"][0] = "COMPLETED"
    await arrive(h, "d", train, gap=0.25, shape=train_shape)
    if later_read_time is not None:
        graphs.read_time = later_read_time
    await anyio.sleep(1.0)
    for t in train:
        graphs.status["d"][t] = "RUNNING"
    # Covalent records the train results one by one, each followed by its score electron.
    for burst in (train[:3], train[3:]):
        for t, s in zip(train, score, strict=True):
            if t in burst:
                graphs.status["d"][t] = "COMPLETED"
                h.run("d", s)
                await anyio.sleep(0.25)
        await anyio.sleep(5.0)
    return score


@pytest.mark.anyio
@pytest.mark.parametrize("train_shape", ["small", "big"])
async def test_the_next_wave_after_our_job_arrives_in_bursts_and_makes_one_batch(
    train_shape: str,
) -> None:
    """load -> 6 train -> 6 score: score waits for train results, which end in bursts.

    The train job has ended by then: its electrons still count as coming (and, of the score's
    shape, as not expected again) until Covalent records their ends."""
    graphs = Graphs()
    async with Run(graphs) as h:
        await run_three_waves(h, graphs, train_shape)
    reasons = [(reason, members) for reason, _, members in h.flushes()]
    assert reasons == [
        (FlushReason.WAVE_COMPLETE, 1),
        (FlushReason.WAVE_COMPLETE, 6),
        (FlushReason.WAVE_COMPLETE, 6),
    ]


@pytest.mark.anyio
async def test_the_next_wave_finds_the_graph_known_even_when_reads_are_slow() -> None:
    """The server gets loaded after the train wave: each read then takes longer than the idle
    gap (2 s).

    The score wave starts while train electrons are still in flight here, so the dispatch's
    snapshot is still held: its batch expects the whole wave from its first electron, where a
    fresh read would leave it on the timers for 6 s and the idle gap would split it."""
    graphs = Graphs()
    async with Run(graphs) as h:
        await run_three_waves(h, graphs, "big", later_read_time=3.0)
    assert [members for _, _, members in h.flushes()] == [1, 6, 6]


@pytest.mark.anyio
@pytest.mark.parametrize("end", ["recorded", "dispatch gone"])
async def test_a_dispatch_whose_waves_all_ended_leaves_nothing_in_the_tracker(end: str) -> None:
    """A server that is never idle keeps only what is in flight (issue 13)."""
    graphs = Graphs()
    async with Run(graphs) as h:
        score = await run_three_waves(h, graphs)
        # Every job ended; Covalent has not recorded the score results yet: only they, and the
        # dispatch's snapshot (a next wave may be forming), are held.
        assert h.tracker.statistics() == WaveStatistics(
            watched_batches=0, graphs=1, dispatches=1, nodes=len(score)
        )
        if end == "recorded":
            for s in score:
                graphs.status["d"][s] = "COMPLETED"
        else:
            graphs.broken.add("d")
        await anyio.sleep(1.5)  # one refresh
        assert h.tracker.statistics() == WaveStatistics(0, 0, 0, 0)
        reads = graphs.reads
        await anyio.sleep(5.0)
        assert graphs.reads == reads  # nothing left to refresh


@pytest.mark.anyio
async def test_two_dispatches_share_a_batch_that_waits_for_both_waves() -> None:
    graphs = Graphs()
    first, second = fan_out(graphs, "a", 3), fan_out(graphs, "b", 2)
    async with Run(graphs) as h:
        await arrive(h, "a", first[:2], gap=0.25)
        await arrive(h, "b", second, gap=0.25)
        await arrive(h, "a", first[2:], gap=0.25)
    assert h.flushes() == [(FlushReason.WAVE_COMPLETE, 1.0, 5)]


@pytest.mark.anyio
async def test_other_shapes_and_executors_are_not_waited_for() -> None:
    graphs = Graphs()
    nodes = fan_out(graphs, "d", 2)
    graphs.add("d", 100, attributes={"shape": "big"})
    graphs.add("d", 101, executor="local")
    async with Run(graphs) as h:
        await arrive(h, "d", nodes, gap=0.25)
    assert h.flushes() == [(FlushReason.WAVE_COMPLETE, 0.25, 2)]


@pytest.mark.anyio
async def test_a_child_of_an_electron_in_the_same_open_batch_is_not_expected() -> None:
    graphs = Graphs()
    graphs.add("d", 0)
    graphs.add("d", 1, (0,))  # needs node 0's result: a later wave
    async with Run(graphs) as h:
        h.run("d", 0)
        await anyio.sleep(0.5)
    assert h.flushes()[0][0] is FlushReason.WAVE_COMPLETE
    assert h.flushes()[0][2] == 1
