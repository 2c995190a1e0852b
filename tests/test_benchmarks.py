"""The benchmark scripts: the quick plan end to end, and the pieces that read its output.

The end-to-end test runs ``python -m benchmarks.fanout --quick`` as a user would, on real local
clouds, and checks the structure of what it writes and that the numbers make sense against
each other (never against the clock: the machine is shared).
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.behaviour_cases import CASES, behaviour_electron, describe_error
from benchmarks.behaviours import behaviour_path, not_run, run_behaviour
from benchmarks.graph_aware import window_bound
from benchmarks.harness import Arrival, Mode, RunSpec, environment
from benchmarks.packed_inputs import main as packed_inputs_main
from benchmarks.packed_inputs import pack
from benchmarks.plots import draw_all
from benchmarks.profiling import frame_name, summarise
from benchmarks.report import (
    goals,
    headline_size,
    load_behaviours,
    original_headline,
    render,
    write_report,
)
from benchmarks.storage_log import classify
from benchmarks.suite import full_plan, original_plan, quick_plan

PROJECT = Path(__file__).parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

REQUIRED_KEYS = {
    "jobs_created",
    "vm_boots",
    "task_attempts",
    "api_calls",
    "api_calls_total",
    "storage_ops",
    "storage_ops_total",
    "time_to_first_result_s",
    "time_to_last_result_s",
    "target_s",
    "cpu_ms_per_electron",
    "rss_peak_mb",
    "rss_before_mb",
    "failed",
    "environment",
    "objects_left",
    "executor_settings",
}


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The results folder of one ``--quick`` run."""
    results = tmp_path_factory.mktemp("bench") / "results"
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.fanout", "--quick", "--results", str(results)],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ | {"PYTHONPATH": str(PROJECT)},
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return results


def load(results: Path, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((results / f"{name}.json").read_text())
    return data


def quick_specs(group: str, mode: Mode) -> list[RunSpec]:
    """The quick plan's runs of one group and mode."""
    return [p.spec for p in quick_plan() if p.spec.group == group and p.spec.mode is mode]


@pytest.mark.slow
class TestQuickPlanEndToEnd:
    def test_every_planned_run_wrote_a_complete_result(self, quick_results: Path) -> None:
        for planned in quick_plan():
            result = load(quick_results, planned.spec.name)
            assert set(result) >= REQUIRED_KEYS
            assert RunSpec.from_json(result["spec"]) == planned.spec
            assert result["failed"] == 0, result["errors_sample"]
            assert result["task_attempts"] == planned.spec.electrons

    def test_baseline_makes_one_job_per_electron_and_batched_far_fewer(
        self, quick_results: Path
    ) -> None:
        sizes = {spec.electrons for spec in quick_specs("sizes", Mode.BASELINE)}
        assert sizes and sizes == {spec.electrons for spec in quick_specs("sizes", Mode.BATCHED)}
        for electrons in sizes:
            batched = load(quick_results, f"sizes-batched-{electrons}")
            baseline = load(quick_results, f"sizes-baseline-{electrons}")
            assert baseline["jobs_created"] == electrons
            assert baseline["vm_boots"] == baseline["jobs_created"]
            assert batched["jobs_created"] < baseline["jobs_created"]
            assert batched["api_calls"]["CreateJob"] == batched["jobs_created"]
            assert batched["api_calls_total"] < baseline["api_calls_total"]

    def test_storage_operations_cover_every_input_and_result(self, quick_results: Path) -> None:
        for spec in quick_specs("sizes", Mode.BATCHED):
            result = load(quick_results, spec.name)
            ops = result["storage_ops"]
            # At least one input upload and one result upload per electron, and reading both.
            assert ops["upload"] >= 2 * spec.electrons
            assert ops["download"] >= 2 * spec.electrons
            assert result["storage_ops_total"] == sum(ops.values())

    def test_times_cpu_and_memory_are_consistent(self, quick_results: Path) -> None:
        for planned in quick_plan():
            result = load(quick_results, planned.spec.name)
            assert 0 < result["time_to_first_result_s"] <= result["time_to_last_result_s"]
            assert result["time_to_last_result_s"] <= result["idle_after_s"]
            assert result["arrival_span_s"] <= result["time_to_last_result_s"]
            assert 0 < result["cpu_s_to_last_result"] <= result["cpu_s_total"]
            assert result["rss_peak_mb"] >= result["rss_before_mb"] > 0

    def test_trickle_arrivals_are_spread_at_the_rate(self, quick_results: Path) -> None:
        trickles = quick_specs("trickle", Mode.BATCHED)
        assert trickles
        for spec in trickles:
            result = load(quick_results, spec.name)
            expected_span = (spec.electrons - 1) / spec.rate
            assert expected_span > 0
            assert result["arrival_span_s"] >= expected_span * 0.99

    def test_the_report_and_its_plots_are_written(self, quick_results: Path) -> None:
        text = (quick_results / "RESULTS.md").read_text()
        for heading in ("## Goals", "## Fan-out size, burst", "## Window sweep"):
            assert heading in text
        # Every run is one row of a size or sweep table, whose last column is "failed".
        run_rows = [line for line in text.splitlines() if line.endswith("| 0 |")]
        assert len(run_rows) == len(quick_plan())
        for plot in ("calls_vs_size.png", "time_vs_size.png", "window_sweep.png"):
            assert (quick_results / plot).read_bytes().startswith(PNG_MAGIC)
            assert f"]({plot})" in text


def fake_result(mode: str, electrons: int, **values: Any) -> dict[str, Any]:
    spec = RunSpec(
        name=f"sizes-{mode}-{electrons}", group="sizes", mode=Mode(mode), electrons=electrons
    )
    result: dict[str, Any] = {
        "kind": "fanout",
        "spec": spec.to_json(),
        "electrons": electrons,
        "target_s": spec.target_seconds,
        "time_to_first_result_s": 40.0,
        "rss_before_mb": 125.0,
        "rss_peak_mb": 150.0,
    }
    return result | values


class TestGoals:
    def test_ratios_are_batched_over_baseline_of_the_same_size(self) -> None:
        results = [
            fake_result(
                "batched",
                1000,
                jobs_created=1,
                api_calls_total=30,
                time_to_last_result_s=50.0,
                cpu_ms_per_electron=3.0,
            ),
            fake_result(
                "baseline",
                1000,
                jobs_created=1000,
                api_calls_total=6000,
                time_to_last_result_s=3000.0,
                cpu_ms_per_electron=30.0,
            ),
        ]
        by_name = {goal.name: goal for goal in goals(results)}
        jobs = by_name["jobs created, against the baseline"]
        assert jobs.met is True and jobs.measured == f"{1 / 1000:.4f}"
        assert by_name["Batch API calls, against the baseline"].met is True
        assert by_name["time to the last result, against the baseline"].met is True
        cpu = by_name["executor CPU per electron"]
        assert cpu.met is False and "1.5x" in cpu.note

    def test_a_missed_ratio_says_by_how_much(self) -> None:
        results = [
            fake_result(
                "batched",
                1000,
                jobs_created=50,
                api_calls_total=30,
                time_to_last_result_s=50.0,
                cpu_ms_per_electron=1.0,
            ),
            fake_result(
                "baseline",
                1000,
                jobs_created=1000,
                api_calls_total=6000,
                time_to_last_result_s=3000.0,
                cpu_ms_per_electron=30.0,
            ),
        ]
        jobs = goals(results)[0]
        assert jobs.met is False
        assert "5.0x over" in jobs.note

    def test_without_1000_the_goals_use_the_largest_size_run_in_both_modes(self) -> None:
        results = [
            fake_result("batched", 12, jobs_created=1),
            fake_result("baseline", 12, jobs_created=12),
            fake_result("batched", 50, jobs_created=1),
        ]
        assert headline_size(results) == 12

    def test_the_original_plugin_rows_and_headline_come_from_the_results(
        self, tmp_path: Path
    ) -> None:
        plans = {p.spec.name: p.spec for p in original_plan((10,))}
        values = {
            "original": {"jobs_created": 10, "api_calls_total": 54, "time_to_last_result_s": 40.5},
            "batched": {"jobs_created": 1, "api_calls_total": 11, "time_to_last_result_s": 37.0},
            "baseline": {"jobs_created": 10, "api_calls_total": 110, "time_to_last_result_s": 36.0},
        }
        for name, spec in plans.items():
            result = fake_result(spec.mode.value, 10) | values[spec.mode.value]
            result |= {
                "spec": spec.to_json(),
                "api_calls": {"CreateJob": result["jobs_created"]},
                "storage_ops_total": 50,
                "objects_left": 20 if spec.mode is Mode.ORIGINAL else 0,
                "cpu_ms_per_electron": 3.0,
                "failed": 0,
                "environment": environment([1.5, 1.0, 0.5]),
            }
            (tmp_path / f"{name}.json").write_text(json.dumps(result))
        text = render(tmp_path, "")
        assert "## Against the original plugin" in text
        rows = [line for line in text.splitlines() if "| covalent-gcpbatch-plugin 0.15.0 |" in line]
        assert len(rows) == 2  # burst and Covalent
        assert "1-minute load average" in text
        headline = original_headline([json.loads(p.read_text()) for p in tmp_path.glob("*.json")])
        assert "made 1 Batch job(s) where covalent-gcpbatch-plugin 0.15.0 made 10" in headline
        assert "11 Batch API calls against 54" in headline and "37 s against 40.5 s" in headline
        assert "![against the original plugin](original_vs_size.png)" in text
        assert draw_all(tmp_path) == [tmp_path / "original_vs_size.png"]
        assert (tmp_path / "original_vs_size.png").read_bytes().startswith(PNG_MAGIC)

    def test_render_without_results_says_how_to_make_them(self, tmp_path: Path) -> None:
        assert "make bench" in render(tmp_path, "")


def graph_aware_row(scenario: str, jobs: int, **values: Any) -> dict[str, Any]:
    """One row as ``benchmarks.graph_aware`` records it."""
    return {
        "scenario": scenario,
        "status": "COMPLETED",
        "electrons": 10,
        "jobs": jobs,
        "tasks_per_job": [10 // jobs] * jobs,
        "flush_reasons": {"wave complete": jobs},
        "batch_window": 10.0,
        "arrival_span_s": 4.0,
        "window_bound_jobs": 1,
        "first_result_s": 20.0,
        "last_result_s": 30.0,
        "workflow_s": 31.0,
        "errors": [],
    } | values


def graph_aware_results(tmp_path: Path, rows: list[dict[str, Any]]) -> Path:
    data = {
        "environment": environment([2.0, 1.0, 0.5]),
        "command": "python -m benchmarks.graph_aware --big --repeat 2",
        "settings": {"poll_freq": 1.0, "batch_window": 10.0, "graph_aware": True},
        "rows": rows,
    }
    (tmp_path / "graph_aware.json").write_text(json.dumps(data))
    return tmp_path


def table_row(text: str, *cells: str) -> str:
    """The one line of ``text`` that starts with ``cells`` as a table row."""
    start = "| " + " | ".join(cells) + " |"
    (line,) = [line for line in text.splitlines() if line.startswith(start)]
    return line


class TestGraphAwareSection:
    def test_the_section_comes_from_graph_aware_json(self, tmp_path: Path) -> None:
        demo = [
            graph_aware_row("demo", 3, machine=machine, graph_aware=True, tasks_per_job=[1, 24, 24])
            for machine in ("idle", "loaded", "idle", "loaded")
        ] + [
            graph_aware_row(
                "demo",
                5,
                machine="loaded",
                graph_aware=False,
                flush_reasons={"idle gap": 4, "window cap": 1},
            )
        ]
        small = [
            graph_aware_row("10 electrons", 1, mode="graph-aware", last_result_s=12.5),
            graph_aware_row("10 electrons", 1, mode="timers", last_result_s=22.0),
            graph_aware_row("10 electrons", 10, mode="one job per electron", last_result_s=12.0),
        ]
        big = [
            graph_aware_row("1000 electrons", 2, graph_aware=True, window_bound_jobs=3),
            graph_aware_row("1000 electrons", 4, graph_aware=False, arrival_span_s=25.0),
        ]
        results = graph_aware_results(tmp_path, demo + small + big)
        write_report(results, results / "RESULTS.md")
        text = (results / "RESULTS.md").read_text()

        assert "## Graph-aware coalescing against the timers" in text
        assert "`python -m benchmarks.graph_aware --big --repeat 2`" in text
        idle = table_row(text, "idle", "graph-aware", "3, 3", "1+24+24; 1+24+24")
        assert "| wave complete: 6 |" in idle and idle.endswith("| met |")
        timers = table_row(text, "loaded", "timers", "5")
        assert "| idle gap: 4, window cap: 1 |" in timers and timers.endswith("| - |")
        assert "| one job per electron | 10 | 20 | 12 |" in text
        assert "plus one poll (13 s): met, the last result after 12.5 s" in text
        assert "| graph-aware | 2 | 20 | 30 | 4 | 3 |" in text
        assert "| timers | 4 | 20 | 30 | 25 | 1 |" in text
        assert (
            "jobs: met (2 against 3); never more than the timers alone: met (2 against 4)" in text
        )
        assert "![jobs per scenario, graph-aware against the timers](graph_aware.png)" in text
        assert (results / "graph_aware.png").read_bytes().startswith(PNG_MAGIC)

    def test_a_missed_goal_and_what_was_not_recorded_say_so(self, tmp_path: Path) -> None:
        older = {"flush_reasons", "tasks_per_job", "arrival_span_s", "window_bound_jobs"}
        rows = [
            graph_aware_row("demo", jobs, machine="loaded", graph_aware=True) for jobs in (3, 4)
        ] + [
            graph_aware_row("10 electrons", 1, mode="graph-aware", last_result_s=25.0),
            graph_aware_row("10 electrons", 10, mode="one job per electron", last_result_s=12.0),
            graph_aware_row("1000 electrons", 7, graph_aware=True, status="FAILED"),
        ]
        rows[-1] = {key: value for key, value in rows[-1].items() if key not in older}
        text = render(graph_aware_results(tmp_path, rows), "")

        assert table_row(text, "loaded", "graph-aware", "3, 4").endswith("| **missed** |")
        assert "(13 s): **missed**, the last result after 25 s" in text
        big = table_row(text, "graph-aware", "7")
        assert "| - | - | not recorded | FAILED |" in big
        assert "never more than the timers alone" not in text  # no bound, no timers row

    def test_the_window_bound_is_at_least_one_job(self) -> None:
        assert window_bound(25.0, 10.0) == 3
        assert window_bound(20.0, 10.0) == 2
        assert window_bound(0.0, 10.0) == 1
        assert window_bound(5.0, 0.0) is None
        assert window_bound(None, 10.0) is None


class TestEnvironment:
    def test_a_result_says_where_and_under_what_load_it_ran(self) -> None:
        env = environment([3.5, 2.0, 1.0])
        assert env["load_average_before"] == [3.5, 2.0, 1.0]
        assert len(env["load_average_after"]) == 3
        assert env["cpus"] == os.cpu_count()
        assert env["commit"] != "unknown"
        assert isinstance(env["uncommitted_changes"], bool)


class TestStorageLog:
    @pytest.mark.parametrize(
        ("method", "path", "status", "kind"),
        [
            ("POST", "/upload/storage/v1/b/bkt/o?uploadType=multipart", 200, "upload"),
            ("GET", "/download/storage/v1/b/bkt/o/a%2Fb?alt=media", 200, "download"),
            ("GET", "/download/storage/v1/b/bkt/o/a%2Fb?alt=media", 404, "download_missing"),
            ("GET", "/storage/v1/b/bkt/o?prefix=a%2F", 200, "list"),
            ("DELETE", "/storage/v1/b/bkt/o/a%2Fb?generation=1", 200, "delete"),
            ("GET", "/storage/v1/b/bkt?fields=name", 200, "get_bucket"),
            ("GET", "/storage/v1/b/bkt/o/a%2Fb", 200, "get_object"),
        ],
    )
    def test_classify(self, method: str, path: str, status: int, kind: str) -> None:
        assert classify(method, path, status) == kind


class TestProfiling:
    def test_summarise_counts_self_and_inclusive_shares(self) -> None:
        raw = "\n".join(
            [
                "main (/x/benchmarks/harness.py:10);run (/x/covalent_gcpbatch_array/_core/storage.py:5);"
                "send (/v/lib/python3.11/site-packages/requests/sessions.py:1) 3",
                "main (/x/benchmarks/harness.py:10);encode (/x/covalent_gcpbatch_array/_core/envelopes.py:7) 1",
            ]
        )
        summary = summarise(raw)
        assert summary["samples"] == 4
        assert summary["self"][0] == ["send (requests/sessions.py)", 0.75]
        inclusive = dict(summary["inclusive"])
        assert inclusive["main (benchmarks/harness.py)"] == 1.0
        assert inclusive["run (covalent_gcpbatch_array/_core/storage.py)"] == 0.75
        own = dict(summary["own_inclusive"])
        assert "send (requests/sessions.py)" not in own

    def test_frame_name_drops_the_line_number(self) -> None:
        assert frame_name("wait (/usr/lib/python3.11/threading.py:320)") == "wait (threading.py)"


class TestPlans:
    def test_the_full_plan_covers_what_issue_5_asks_for(self) -> None:
        plan = full_plan()
        specs = [p.spec for p in plan]
        names = [s.name for s in specs]
        assert len(set(names)) == len(names)
        burst_batched = {
            s.electrons for s in specs if s.group == "sizes" and s.mode is Mode.BATCHED
        }
        burst_baseline = {
            s.electrons for s in specs if s.group == "sizes" and s.mode is Mode.BASELINE
        }
        assert {10, 100, 1000, 10_000} <= burst_batched
        assert {10, 100, 1000} <= burst_baseline
        assert any(s.arrival is Arrival.TRICKLE and s.rate == 2.0 for s in specs)
        assert any(p.profile and p.spec.electrons == 10_000 for p in plan)
        covalent = {s.mode for s in specs if s.arrival is Arrival.COVALENT}
        assert covalent == {Mode.BATCHED, Mode.BASELINE, Mode.ORIGINAL}
        headline = next(s for s in specs if s.name == "sizes-batched-1000")
        assert (headline.provisioning_delay, headline.jobs_per_minute) == (30.0, 20)

    def test_the_full_plan_has_the_original_plugin_beside_both_modes(self) -> None:
        specs = [p.spec for p in full_plan() if p.spec.group == "original"]
        for arrival in (Arrival.BURST, Arrival.COVALENT):
            for mode in (Mode.ORIGINAL, Mode.BATCHED, Mode.BASELINE):
                sizes = {s.electrons for s in specs if (s.arrival, s.mode) == (arrival, mode)}
                assert sizes == {10, 100, 1000}, (arrival, mode)
        # The same cloud for all three: a boot per job, no quota (the behaviours have one).
        assert {(s.provisioning_delay, s.jobs_per_minute) for s in specs} == {(30.0, None)}

    def test_spec_json_round_trips(self) -> None:
        for planned in quick_plan():
            assert RunSpec.from_json(json.loads(json.dumps(planned.spec.to_json()))) == planned.spec


def fake_behaviour(case: str, mode: Mode, electrons: list[dict[str, Any]], **extra: Any) -> Any:
    """A behaviour result as benchmarks.behaviours writes it, with the given electrons."""
    return {
        "kind": "behaviour",
        "case": case,
        "question": CASES[case].question,
        "mode": mode.value,
        "environment": environment([1.0, 1.0, 1.0]),
        "settings": {
            "case": dataclasses.asdict(CASES[case]),
            "cloud": {"provisioning_delay": 1.0, "max_running_tasks": 8},
        },
        "jobs_created": len(electrons),
        "quota_refusals": 0,
        "api_calls": {"CreateJob": len(electrons), "GetJob": 9},
        "objects_left": 0,
        "cancel": None,
        "electrons": electrons,
    } | extra


def electron(outcome: str = "result", attempts: int = 1, started: int = 1, **extra: Any) -> Any:
    return {
        "outcome": outcome,
        "value": 1,
        "task_attempts": attempts,
        "function_started": started,
        "function_finished": started,
        "returned_after_s": 2.5,
    } | extra


class TestBehaviours:
    def test_what_a_caller_can_learn_from_an_error(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError) as raised:
            behaviour_electron(0, 0.0, True, str(tmp_path))
        assert [path.name.split(".")[:2] for path in tmp_path.iterdir()] == [["0", "started"]]
        with pytest.raises(RuntimeError) as wrapped:
            raise RuntimeError("electron 0 failed") from raised.value
        kept = describe_error(wrapped.value)
        assert kept["error_chain"] == ["RuntimeError", "ValueError"]
        assert kept["names_user_exception"] and kept["traceback_survives"]
        flat = describe_error(RuntimeError("electron 0 refuses its input"))
        assert flat["error_chain"] == ["RuntimeError"]
        assert not flat["names_user_exception"] and not flat["traceback_survives"]

    def test_the_table_comes_from_the_results_only(self, tmp_path: Path) -> None:
        raised = electron(
            "error",
            attempts=4,
            started=4,
            error_type="RuntimeError",
            error_message="electron 0 refuses its input",
            error_chain=["RuntimeError"],
            names_user_exception=False,
            traceback_survives=False,
        )
        results = [
            fake_behaviour("raises", Mode.ORIGINAL, [raised, electron(), electron()]),
            fake_behaviour(
                "preempted", Mode.BATCHED, [electron(), electron(attempts=2), electron()]
            ),
            fake_behaviour(
                "cancel",
                Mode.BASELINE,
                [
                    electron(
                        "error",
                        function_finished=0,
                        error_type="TaskCancelledError",
                        error_message="the electron was cancelled",
                        error_chain=["TaskCancelledError"],
                        returned_after_s=3.0,
                    ),
                    electron(),
                    electron(),
                ],
                cancel={"at_s": 2.0, "returned": "True"},
            ),
            not_run(CASES["quota"], Mode.ORIGINAL, "exit code 1: no venv", [1.0, 1.0, 1.0]),
        ]
        for result in results:
            path = behaviour_path(tmp_path, result["case"], Mode(result["mode"]))
            path.write_text(json.dumps(result))
        assert load_behaviours(tmp_path) == sorted(
            results, key=lambda r: behaviour_path(tmp_path, r["case"], Mode(r["mode"])).name
        )
        rows = [line for line in render(tmp_path, "").splitlines() if line.startswith("| ")][1:]
        assert [row.split(" | ")[0] for row in rows] == [
            f"| {CASES[name].question}" for name in ("raises", "preempted", "quota", "cancel")
        ]
        raises, preempted, quota, cancel = rows
        assert "`RuntimeError`: electron 0 refuses its input" in raises
        assert "`ValueError` named: no" in raises and "4 attempts, ran 4x" in raises
        assert "2 attempts, ran 1x" in preempted and "all: 3/3 results" in preempted
        assert "could not be run: exit code 1: no venv" in quota
        assert "`cancel()` returned True" in cancel and "1 s after it" in cancel
        assert "task stopped: yes" in cancel and "job-mates: 2/2 results" in cancel

    @pytest.mark.slow
    @pytest.mark.anyio
    async def test_a_preempted_task_runs_again_and_its_attempts_are_counted(self) -> None:
        result = await run_behaviour(CASES["preempted"], Mode.BATCHED)
        electrons = result["electrons"]
        assert [e["outcome"] for e in electrons] == ["result"] * 3
        assert sorted(e["task_attempts"] for e in electrons) == [1, 1, 2]
        assert [e["function_started"] for e in electrons] == [1, 1, 1]
        assert (result["jobs_created"], result["task_attempts"]) == (1, 4)
        assert result["environment"]["commit"]

    @pytest.mark.slow
    @pytest.mark.anyio
    async def test_a_cancel_stops_one_task_and_not_its_job_mates(self) -> None:
        result = await run_behaviour(CASES["cancel"], Mode.BATCHED)
        target, *mates = result["electrons"]
        assert result["cancel"]["returned"] == "True"
        assert target["error_type"] == "TaskCancelledError"
        assert (target["function_started"], target["function_finished"]) == (1, 0)
        assert [m["outcome"] for m in mates] == ["result", "result"]
        assert result["jobs_created"] == 1


class TestPackedInputs:
    def test_pack_puts_an_offset_table_before_the_envelopes(self) -> None:
        packed = pack([b"ab", b"", b"cde"])
        assert packed == struct.pack(">4Q", 0, 2, 2, 5) + b"abcde"

    @pytest.mark.slow
    def test_both_ways_are_measured_on_the_local_cloud(self, tmp_path: Path) -> None:
        out = tmp_path / "packed.json"
        packed_inputs_main(["--electrons", "20", "--rounds", "1", "--json", str(out)])
        result = json.loads(out.read_text())
        cpu = result["cpu_ms_per_electron"]
        assert len(cpu["per-electron"]) == len(cpu["packed"]) == 1
        assert cpu["per-electron"][0] > 0 and cpu["packed"][0] >= 0
        assert result["environment"]["cpus"] == os.cpu_count()
