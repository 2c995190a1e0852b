"""RESULTS.md from the JSON in ``benchmarks/results/``: ``python -m benchmarks.report``.

Everything with a number in it is generated from the results; the hand-written reading of
them (``benchmarks/findings.md``) is included as it is.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

from .plots import (
    GRAPH_AWARE_MODES,
    draw_all,
    graph_aware_mode,
    graph_aware_scenario,
    load_graph_aware,
    load_results,
)

__all__ = [
    "Goal",
    "behaviour_table",
    "goals",
    "graph_aware_section",
    "load_behaviours",
    "original_headline",
    "write_report",
]

DEFAULT_RESULTS = Path(__file__).parent / "results"
FINDINGS = Path(__file__).parent / "findings.md"
HEADLINE_ELECTRONS = 1000
MEMORY_ELECTRONS = 10_000

Result = dict[str, Any]


class Goal(NamedTuple):
    """One of issue 5's goals, measured."""

    name: str  # what the goal says
    measured: str  # the measured value, with its unit
    limit: str  # the goal's limit
    met: bool | None  # None: not measured in these results
    note: str  # by how much, or why it was not measured


def _find(
    results: Iterable[Result], group: str, mode: str, electrons: int, arrival: str = "burst"
) -> Result | None:
    for result in results:
        spec = result["spec"]
        if (spec["group"], spec["mode"], result["electrons"], spec["arrival"]) == (
            group,
            mode,
            electrons,
            arrival,
        ):
            return result
    return None


def _ratio_goal(
    name: str, batched: Result | None, baseline: Result | None, key: str, limit: float
) -> Goal:
    if batched is None or baseline is None or not baseline[key]:
        return Goal(name, "-", f"≤ 1/{1 / limit:g}", None, "not measured")
    ratio = batched[key] / baseline[key]
    met = ratio <= limit
    note = f"{batched[key]:g} against {baseline[key]:g}: 1/{1 / ratio:.0f}" if ratio else ""
    if not met:
        note += f"; {ratio / limit:.1f}x over the limit"
    return Goal(name, f"{ratio:.4f}", f"≤ {limit:g}", met, note)


def headline_size(results: list[Result]) -> int:
    """The fan-out size the goals are measured at: 1,000, or the largest burst size measured
    in both modes when there is no 1,000 (as in the quick plan)."""
    both = {
        r["electrons"]
        for r in results
        if r["spec"]["group"] == "sizes"
        and _find(results, "sizes", "baseline", r["electrons"]) is not None
        and _find(results, "sizes", "batched", r["electrons"]) is not None
    }
    return HEADLINE_ELECTRONS if HEADLINE_ELECTRONS in both or not both else max(both)


def goals(results: list[Result]) -> list[Goal]:
    """Issue 5's goals against the 1,000-electron burst (and 10,000 for memory)."""
    size = headline_size(results)
    batched = _find(results, "sizes", "batched", size)
    baseline = _find(results, "sizes", "baseline", size)
    listed = [
        _ratio_goal("jobs created, against the baseline", batched, baseline, "jobs_created", 0.01),
        _ratio_goal(
            "Batch API calls, against the baseline", batched, baseline, "api_calls_total", 0.01
        ),
        _ratio_goal(
            "time to the last result, against the baseline",
            batched,
            baseline,
            "time_to_last_result_s",
            0.1,
        ),
    ]
    if batched is not None:
        ratio = batched["time_to_last_result_s"] / batched["target_s"]
        spread = batched["time_to_last_result_s"] - (batched["time_to_first_result_s"] or 0)
        listed.append(
            Goal(
                "time to the last result, against window + boot + task + one poll",
                f"{ratio:.2f}x",
                "≤ 1.2x",
                ratio <= 1.2,
                f"{batched['time_to_last_result_s']:g} s against {batched['target_s']:g} s; "
                f"the first result came at {batched['time_to_first_result_s']:g} s, the "
                f"{spread:.0f} s after it are this machine running the "
                f"{batched['electrons']:,} task processes",
            )
        )
        cpu = batched["cpu_ms_per_electron"]
        listed.append(
            Goal(
                "executor CPU per electron",
                f"{cpu:g} ms",
                "≤ 2 ms",
                cpu <= 2,
                "" if cpu <= 2 else f"{cpu / 2:.1f}x over the limit",
            )
        )
    big = _find(results, "sizes", "batched", MEMORY_ELECTRONS)
    if big is not None and big.get("rss_all_pending_delta_mb") is not None:
        delta = big["rss_all_pending_delta_mb"]
        listed.append(
            Goal(
                f"executor memory with {MEMORY_ELECTRONS:,} electrons pending",
                f"{delta:g} MB",
                "≤ 100 MB",
                delta <= 100,
                f"resident set grew from {big['rss_before_mb']:g} MB (Python, covalent, the "
                f"Google clients) to {big['rss_all_pending_mb']:g} MB; peak of the whole run "
                f"{big['rss_peak_mb']:g} MB",
            )
        )
    return listed


def _mark(met: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "not measured"}[met]


def _calls(result: Result) -> str:
    return ", ".join(f"{method} {count}" for method, count in result["api_calls"].items())


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}" if value >= 100 else f"{value:.2f}".rstrip("0").rstrip(".")
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _size_table(results: list[Result], group: str) -> str:
    rows = []
    chosen = [r for r in results if r["spec"]["group"] == group]
    for result in sorted(chosen, key=lambda r: (r["electrons"], r["spec"]["mode"] != "batched")):
        n = result["electrons"]
        rows.append(
            [
                _fmt(n),
                result["spec"]["mode"],
                _fmt(result["jobs_created"]),
                f"{_fmt(result['api_calls_total'])} ({_calls(result)})",
                f"{_fmt(result['storage_ops_total'])} ({result['storage_ops_total'] / n:.1f}/el.)",
                _fmt(result["time_to_first_result_s"]),
                _fmt(result["time_to_last_result_s"]),
                _fmt(result["target_s"]) if result["spec"]["mode"] == "batched" else "-",
                _fmt(result["cpu_ms_per_electron"]),
                f"{_fmt(result['rss_peak_mb'])} (+{_fmt(result['rss_peak_delta_mb'])})",
                _fmt(result["failed"]),
            ]
        )
    header = [
        "electrons",
        "mode",
        "jobs (VM boots)",
        "Batch API calls",
        "storage ops",
        "first result (s)",
        "last result (s)",
        "target (s)",
        "CPU ms/electron",
        "peak RSS MB (+growth)",
        "failed",
    ]
    return _table(header, rows)


_IMPLEMENTATIONS = {
    "original": "covalent-gcpbatch-plugin 0.15.0",
    "batched": "ours, batched",
    "baseline": "ours, one job per electron",
}


def _original_table(results: list[Result]) -> str:
    chosen = [r for r in results if r["spec"]["group"] == "original"]
    order = list(_IMPLEMENTATIONS)
    chosen.sort(
        key=lambda r: (r["spec"]["arrival"], r["electrons"], order.index(r["spec"]["mode"]))
    )
    rows = [
        [
            r["spec"]["arrival"],
            _fmt(r["electrons"]),
            _IMPLEMENTATIONS[r["spec"]["mode"]],
            _fmt(r["jobs_created"]),
            f"{_fmt(r['api_calls_total'])} ({_calls(r)})",
            _fmt(r["storage_ops_total"]),
            _fmt(r.get("objects_left")),
            _fmt(r["time_to_first_result_s"]),
            _fmt(r["time_to_last_result_s"]),
            _fmt(r["cpu_ms_per_electron"]),
            _fmt(r["rss_peak_mb"]),
            _fmt(r["failed"]),
        ]
        for r in chosen
    ]
    header = [
        "arrival",
        "electrons",
        "executor",
        "jobs",
        "Batch API calls",
        "storage ops",
        "objects left",
        "first result (s)",
        "last result (s)",
        "CPU ms/electron",
        "peak RSS MB",
        "failed",
    ]
    return _table(header, rows)


def original_headline(results: list[Result]) -> str:
    """README's sentence against the original plugin, from the largest burst run by both."""
    sizes = [
        r["electrons"]
        for r in results
        if r["spec"]["group"] == "original"
        and r["spec"]["mode"] == "original"
        and r["spec"]["arrival"] == "burst"
        and _find(results, "original", "batched", r["electrons"]) is not None
    ]
    if not sizes:
        return ""
    size = max(sizes)
    ours = _find(results, "original", "batched", size)
    seed = _find(results, "original", "original", size)
    assert ours is not None and seed is not None
    return (
        f"For {size:,} electrons arriving at once on the same local cloud, the array executor "
        f"made {ours['jobs_created']:,} Batch job(s) where covalent-gcpbatch-plugin 0.15.0 made "
        f"{seed['jobs_created']:,}, {ours['api_calls_total']:,} Batch API calls against "
        f"{seed['api_calls_total']:,}, and had the last result after "
        f"{_fmt(ours['time_to_last_result_s'])} s against "
        f"{_fmt(seed['time_to_last_result_s'])} s (`python -m benchmarks.fanout --original`)."
    )


BEHAVIOUR_CASES = ("raises", "preempted", "quota", "cancel")


def load_behaviours(results_dir: Path) -> list[Result]:
    """Every behaviour result (``behaviour-*.json``) in ``results_dir``."""
    loaded = [json.loads(path.read_text()) for path in sorted(results_dir.glob("behaviour-*.json"))]
    return [data for data in loaded if isinstance(data, dict) and data.get("kind") == "behaviour"]


def _cell(text: str, limit: int = 140) -> str:
    """``text`` fit for a table cell: one line, no pipes, at most ``limit`` characters."""
    text = " ".join(text.split()).replace("|", "/")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _what_caller_got(electron: Result) -> str:
    if electron["outcome"] == "result":
        return f"its result ({electron['value']!r})"
    if electron["outcome"] != "error":
        return electron["outcome"]
    lines = [line for line in electron["error_message"].splitlines() if line.strip()] or [""]
    # A traceback's last line is the exception; any other message's first line says it.
    line = lines[-1] if lines[0].startswith("Traceback") else lines[0]
    return f"`{electron['error_type']}`: {_cell(line, 110)}"


def _results_of(electrons: list[Result]) -> str:
    got = sum(1 for e in electrons if e["outcome"] == "result")
    return f"{got}/{len(electrons)} results"


def _count(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _attempts(electron: Result) -> str:
    count = electron["task_attempts"]
    return "no task" if count is None else _count(count, "attempt")


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _raises_row(r: Result) -> list[str]:
    failing = r["electrons"][r["settings"]["case"]["raises"]]
    others = [e for i, e in enumerate(r["electrons"]) if e is not failing]
    got = _what_caller_got(failing)
    if failing["outcome"] == "error":
        got += (
            f"; causes: {' ← '.join(failing['error_chain'])}; `ValueError` named: "
            f"{_yes(failing['names_user_exception'])}; the electron's traceback: "
            f"{_yes(failing['traceback_survives'])}"
        )
    runs = f"{_attempts(failing)}, ran {failing['function_started']}x"
    return [got, runs, f"the others: {_results_of(others)}"]


def _preempted_row(r: Result) -> list[str]:
    electrons = r["electrons"]
    # The preempted task is the one with an attempt that never ran the function.
    hit = [e for e in electrons if (e["task_attempts"] or 0) > e["function_started"]]
    if not hit:
        runs = "no attempt was lost (the fault did not land)"
        got = _results_of(electrons)
    else:
        runs = f"{_attempts(hit[0])}, ran {hit[0]['function_started']}x"
        got = f"the preempted electron: {_what_caller_got(hit[0])}"
    return [got, runs, f"all: {_results_of(electrons)}"]


def _quota_row(r: Result) -> list[str]:
    electrons = r["electrons"]
    errors: dict[str, int] = {}
    for electron in electrons:
        if electron["outcome"] != "result":
            errors[_what_caller_got(electron)] = errors.get(_what_caller_got(electron), 0) + 1
    failed = "; ".join(f"{count} x {text}" for text, count in errors.items())
    got = _results_of(electrons) + (f"; failed: {failed}" if failed else "")
    last = max(e["returned_after_s"] for e in electrons)
    creates = r["api_calls"].get("CreateJob", 0)
    runs = (
        f"{_count(r['jobs_created'], 'job')}, {_count(creates, 'CreateJob call')} "
        f"({r['quota_refusals']} refused)"
    )
    return [got, runs, f"last answer after {_fmt(last)} s"]


def _cancel_row(r: Result) -> list[str]:
    index = r["settings"]["case"]["cancel"]
    target = r["electrons"][index]
    others = [e for i, e in enumerate(r["electrons"]) if i != index]
    cancel = r.get("cancel") or {}
    said = cancel.get("returned", cancel.get("raised", cancel.get("skipped", "-")))
    got = f"`cancel()` returned {said}; the caller: {_what_caller_got(target)}"
    if "at_s" in cancel:
        got += f" {_fmt(round(target['returned_after_s'] - cancel['at_s'], 2))} s after it"
    stopped = target["function_started"] and not target["function_finished"]
    sleep = _fmt(r["settings"]["case"]["cancelled_task_seconds"])
    runs = (
        f"task stopped: {_yes(bool(stopped))} (its {sleep} s function "
        f"{'never finished' if stopped else 'finished'}); {_attempts(target)}"
    )
    return [got, runs, f"job-mates: {_results_of(others)}"]


_BEHAVIOUR_ROWS = {
    "raises": _raises_row,
    "preempted": _preempted_row,
    "quota": _quota_row,
    "cancel": _cancel_row,
}


def behaviour_table(behaviours: list[Result]) -> str:
    """One row per case and executor, from the behaviour results only."""
    order = list(_IMPLEMENTATIONS)
    known = [b for b in behaviours if b["case"] in _BEHAVIOUR_ROWS]
    known.sort(key=lambda b: (BEHAVIOUR_CASES.index(b["case"]), order.index(b["mode"])))
    rows = []
    for b in known:
        if b.get("not_run"):
            cells = [f"could not be run: {_cell(b['not_run'], 300)}", "-", "-"]
            calls = "-"
        else:
            cells = _BEHAVIOUR_ROWS[b["case"]](b)
            calls = f"{_fmt(sum(b['api_calls'].values()))} ({_calls(b)})"
        objects = _fmt(b.get("objects_left"))
        rows.append([b["question"], _IMPLEMENTATIONS[b["mode"]], *cells, calls, objects])
    header = [
        "case",
        "executor",
        "what the caller gets",
        "task runs",
        "the other electrons",
        "Batch API calls",
        "objects left",
    ]
    return _table(header, rows)


def _behaviours_section(results_dir: Path) -> list[str]:
    behaviours = load_behaviours(results_dir)
    if not behaviours:
        return []
    sample = next((b for b in behaviours if not b.get("not_run")), behaviours[0])
    cloud = sample["settings"]["cloud"]
    return [
        "## Behaviours users feel, against the original plugin",
        "",
        "`python -m benchmarks.fanout --behaviours` (a few minutes). Each case is a few "
        "electrons at once, for covalent-gcpbatch-plugin 0.15.0 (through the same shim as "
        "above, its settings its defaults but `poll_freq` 1 s) and ours in both modes "
        "(defaults but `poll_freq` 1 s, `batch_window` 1 s, `batch_idle_gap` 0.5 s), each on a "
        "fresh local cloud of the same settings (provisioning delay "
        f"{cloud['provisioning_delay']:g} s, at most {cloud['max_running_tasks']} tasks at "
        "once; the quota case adds 20 job creations a minute). Each electron runs with a fresh "
        "executor and a stand-in for Covalent's side (it saves the job handle and answers "
        "whether the electron was cancelled); a cancel is what `ct.cancel` does: the electron "
        "flagged, then a fresh executor's `cancel()` given the saved handle, once the task "
        "runs. *task runs*: the emulator's attempts of that electron's task, and how many "
        "times the function itself started (marker files the tasks write). "
        + _environment(behaviours),
        "",
        behaviour_table(behaviours),
        "",
    ]


def _grouped(rows: list[Result]) -> dict[tuple[str, str], list[Result]]:
    """(scenario, mode) -> the runs of it, scenarios as first run, modes in their order."""
    groups: dict[tuple[str, str], list[Result]] = {}
    ordered = sorted(rows, key=lambda row: GRAPH_AWARE_MODES.index(graph_aware_mode(row)))
    scenarios = list(dict.fromkeys(graph_aware_scenario(row) for row in rows))
    for row in sorted(ordered, key=lambda row: scenarios.index(graph_aware_scenario(row))):
        groups.setdefault((graph_aware_scenario(row), graph_aware_mode(row)), []).append(row)
    return groups


def _runs(runs: list[Result], key: str) -> str:
    return ", ".join(_fmt(run.get(key)) for run in runs)


def _reasons(runs: list[Result]) -> str:
    if not any("flush_reasons" in run for run in runs):
        return "not recorded"
    total: dict[str, int] = {}
    for run in runs:
        for reason, count in run.get("flush_reasons", {}).items():
            total[reason] = total.get(reason, 0) + count
    return ", ".join(f"{reason}: {count:,}" for reason, count in sorted(total.items())) or "-"


def _statuses(runs: list[Result]) -> str:
    statuses = [run["status"] for run in runs]
    failed = [s for s in statuses if s != "COMPLETED"]
    errors = sorted({e for run in runs for e in run.get("errors", [])})
    text = "completed" if not failed else ", ".join(statuses)
    return text + (f"; {_cell(errors[0], 120)}" if errors else "")


def _mode_rows(chosen: dict[str, list[Result]], keys: tuple[str, ...]) -> list[list[str]]:
    """A row per mode: ``keys`` of each run, the flush reasons, how the electrons ended."""
    return [
        [mode, *(_runs(runs, key) for key in keys), _reasons(runs), _statuses(runs)]
        for mode, runs in chosen.items()
    ]


def _demo_table(groups: dict[tuple[str, str], list[Result]]) -> str:
    rows = []
    for (scenario, mode), runs in groups.items():
        if not scenario.startswith("demo"):
            continue
        packing = "; ".join("+".join(str(n) for n in run.get("tasks_per_job", [])) for run in runs)
        goal = "-"
        if mode == "graph-aware":
            goal = _mark(all(run["jobs"] == 3 for run in runs))
        rows.append(
            [
                scenario.removeprefix("demo, "),
                mode,
                _runs(runs, "jobs"),
                packing or "-",
                _reasons(runs),
                _runs(runs, "last_result_s"),
                _statuses(runs),
                goal,
            ]
        )
    header = [
        "machine",
        "coalescing",
        "jobs (each run)",
        "tasks per job",
        "flushed",
        "last result (s)",
    ]
    return _table([*header, "electrons", "3 jobs"], rows)


def _small_table(groups: dict[tuple[str, str], list[Result]], poll: float) -> list[str]:
    chosen = {mode: runs for (scenario, mode), runs in groups.items() if scenario == "10 electrons"}
    if not chosen:
        return []
    rows = _mode_rows(chosen, ("jobs", "first_result_s", "last_result_s"))
    lines = [
        "10 electrons at once (a fan-out of a trivial function), through the same server:",
        "",
        _table(
            ["coalescing", "jobs", "first result (s)", "last result (s)", "flushed", "electrons"],
            rows,
        ),
        "",
    ]
    ours, single = chosen.get("graph-aware"), chosen.get("one job per electron")
    if ours and single:
        last = max(run["last_result_s"] for run in ours)
        limit = max(run["last_result_s"] for run in single) + poll
        lines += [
            f"Goal: no slower than one job per electron plus one poll ({_fmt(limit)} s): "
            f"{_mark(last <= limit)}, the last result after {_fmt(last)} s.",
            "",
        ]
    return lines


def _big_table(groups: dict[tuple[str, str], list[Result]]) -> list[str]:
    chosen = {
        mode: runs for (scenario, mode), runs in groups.items() if scenario == "1000 electrons"
    }
    if not chosen:
        return ["1,000 electrons: not run in these results (`--big`).", ""]
    keys = ("jobs", "first_result_s", "last_result_s", "arrival_span_s", "window_bound_jobs")
    rows = _mode_rows(chosen, keys)
    header = ["coalescing", "jobs", "first result (s)", "last result (s)", "arrival span (s)"]
    header += ["ceil(span / batch_window)", "flushed", "electrons"]
    lines = [
        "1,000 electrons at once, through the same server (*arrival span*: from the first to the "
        "last electron started, Covalent's own pace):",
        "",
        _table(header, rows),
        "",
    ]
    ours, timers = chosen.get("graph-aware"), chosen.get("timers")
    bounds = [run.get("window_bound_jobs") for run in ours or []]
    if ours and timers and None not in bounds:
        bounded = all(run["jobs"] <= bound for run, bound in zip(ours, bounds, strict=True))
        most, fewest = max(run["jobs"] for run in ours), min(run["jobs"] for run in timers)
        lines += [
            f"Goal: at most ceil(span / batch_window) jobs: {_mark(bounded)} ({_runs(ours, 'jobs')}"
            f" against {_runs(ours, 'window_bound_jobs')}); never more than the timers alone: "
            f"{_mark(most <= fewest)} ({_fmt(most)} against {_fmt(fewest)}).",
            "",
        ]
    return lines


def graph_aware_section(results_dir: Path, image_dir: str) -> list[str]:
    """The section from ``graph_aware.json`` (``python -m benchmarks.graph_aware``), if any."""
    data = load_graph_aware(results_dir)
    if not data or not data["rows"]:
        return []
    settings = data.get("settings", {})
    knobs = ", ".join(f"`{key} = {json.dumps(value)}`" for key, value in settings.items())
    groups = _grouped(data["rows"])
    return [
        "## Graph-aware coalescing against the timers",
        "",
        f"`{data.get('command', 'python -m benchmarks.graph_aware')}` (issue 13): one local "
        "cloud and one "
        "private Covalent server; each dispatch writes its coalescing keys into the server's "
        "config file, which the server reads for every electron"
        + (f" (defaults: {knobs})" if knobs else "")
        + ". *graph-aware* is `graph_aware = true`, *timers* `graph_aware = false` (the window "
        "and the idle gap alone), *one job per electron* `graph_aware = false` and "
        "`batch_window = 0`. *flushed*: why each job stopped filling (its flush-reason label), "
        "summed over the runs. Times are seconds from the dispatch. " + _environment([data]),
        "",
        "The demo's grid search (1 load, 24 train, 24 score: three waves, 49 electrons) on an "
        "idle machine and beside two processes spinning on a core each (*loaded*); the goal is "
        "3 jobs in both:",
        "",
        _demo_table(groups),
        "",
        *_small_table(groups, float(settings.get("poll_freq", 1.0))),
        *_big_table(groups),
        f"![jobs per scenario, graph-aware against the timers]({image_dir}graph_aware.png)",
        "",
    ]


def _sweep_table(results: list[Result]) -> str:
    points = [r for r in results if r["spec"]["group"] == "sweep"]
    points.sort(
        key=lambda r: (r["spec"]["arrival"], r["spec"]["batch_idle_gap"], r["spec"]["batch_window"])
    )
    rows = [
        [
            r["spec"]["arrival"],
            _fmt(r["spec"]["batch_window"]),
            _fmt(r["spec"]["batch_idle_gap"]),
            _fmt(r["jobs_created"]),
            _fmt(r["api_calls_total"]),
            _fmt(r["time_to_first_result_s"]),
            _fmt(r["time_to_last_result_s"]),
            _fmt(r["failed"]),
        ]
        for r in points
    ]
    header = ["arrival", "window (s)", "idle gap (s)", "jobs", "API calls", "first (s)", "last (s)"]
    return _table([*header, "failed"], rows)


def _profile_sections(results_dir: Path) -> list[str]:
    sections = []
    for path in sorted(results_dir.glob("*.profile.json")):
        summary = json.loads(path.read_text())
        name = path.name.removesuffix(".profile.json")
        own = [[f"`{n}`", f"{share:.1%}"] for n, share in summary["own_inclusive"][:12]]
        leaf = [[f"`{n}`", f"{share:.1%}"] for n, share in summary["self"][:12]]
        sections += [
            f"### Profile of `{name}` ({summary['samples']:,} samples of the executor process)",
            "",
            "Our functions, by inclusive share of the executor's CPU samples (`<module>` and "
            "`main` of `benchmarks/harness.py` stand for the event loop's thread, where every "
            "`run()` coroutine, the coalescer and the job monitors run; the rest is worker "
            "threads doing blocking client calls):",
            "",
            _table(["function", "share"], own),
            "",
            "Where the time is spent (self samples):",
            "",
            _table(["function", "share"], leaf),
            "",
        ]
    return sections


def _environment(results: list[Result]) -> str:
    envs = [r["environment"] for r in results]
    commits = sorted({e["commit"] for e in envs})
    dates = sorted(e["measured_at"] for e in envs)
    first = envs[0]
    when = (
        dates[0][:10] if dates[0][:10] == dates[-1][:10] else f"{dates[0][:10]} to {dates[-1][:10]}"
    )
    loads = [
        load[0]
        for e in envs
        for load in (e.get("load_average_before"), e.get("load_average_after"))
        if load
    ]
    busy = f", 1-minute load average {min(loads):g} to {max(loads):g}" if loads else ""
    dirty = any(e.get("uncommitted_changes") for e in envs)
    return (
        f"Measured {when} on {first['cpus']} CPUs ({first['machine']}{busy}), Python "
        f"{first['python']}, commit {', '.join(commits)}"
        + (" with uncommitted changes." if dirty else ".")
    )


def render(results_dir: Path, image_dir: str) -> str:
    """The text of RESULTS.md; ``image_dir`` is the plots' folder relative to it."""
    results = load_results(results_dir)
    behaviours = _behaviours_section(results_dir)
    graph_aware = graph_aware_section(results_dir, image_dir)
    if not results:
        return "\n".join(
            [
                "# Benchmark results",
                "",
                "No results yet: run `make bench`.",
                "",
                *behaviours,
                *graph_aware,
            ]
        )
    sample = _find(results, "sizes", "batched", headline_size(results)) or results[0]
    spec = sample["spec"]
    quota = spec["jobs_per_minute"]
    lines = [
        "# Benchmark results: array jobs against one job per electron",
        "",
        "Regenerate everything below (a few hours on 2 cores, mostly waiting on the simulated "
        "quota and VM boots) with `make bench`, i.e. `python -m benchmarks.fanout --all`, "
        "except the graph-aware section (`python -m benchmarks.graph_aware --big`); redraw "
        "from the JSON only with `python -m benchmarks.fanout --report-only`. "
        + _environment(results),
        "",
        "Every run starts its own local cloud: our Batch emulator with a provisioning delay of "
        f"{spec['provisioning_delay']:g} s per job (a VM boot) and a job-creation quota of "
        f"{quota or 'no limit on'} jobs per minute, fake-gcs-server, and the executor in its "
        "own process, with the default knobs (`batch_window` "
        f"{spec['batch_window']:g} s, `batch_idle_gap` {spec['batch_idle_gap']:g} s, "
        f"`max_tasks_per_job` {spec['max_tasks_per_job']}, `poll_freq` {spec['poll_freq']:g} s). "
        "The baseline is the same executor with `max_tasks_per_job = 1`: one job per electron. "
        "Each electron is a trivial function, run as a real task process (forked from the "
        f"emulator's pre-warmed server), at most {spec['max_running_tasks']} at a time on this "
        "machine.",
        "",
        "How to read the numbers:",
        "",
        "- *jobs (VM boots)*: Batch jobs created; each job boots its own VM(s), so this is also "
        "the number of simulated VM boots;",
        "- *Batch API calls*: every call the emulator answered, refused ones included (a 429 "
        "from the job-creation quota counts);",
        "- *storage ops*: every request fake-gcs-server logged, from the executor and from the "
        "tasks (uploads, downloads, 404 reads, lists, deletes);",
        "- *first/last result*: seconds from the first electron's arrival to the first and last "
        "`run()` returning; *target*: arrival span + window + provisioning delay + task time + "
        "one poll period;",
        "- *CPU ms/electron*: `time.process_time()` of the executor's process (all its threads) "
        "from the first arrival until its clean-up ended, divided by the electrons. The Batch "
        "emulator, the task processes and fake-gcs-server are other processes and are **not** "
        "counted;",
        "- *peak RSS*: the executor process's resident memory, sampled every 0.25 s; *growth* "
        "is above what it held before the first electron (Python, covalent and the Google "
        "clients, about 125 MB).",
        "",
        f"## Goals (issue 5), for {headline_size(results):,} electrons arriving at once",
        "",
        _table(
            ["goal", "measured", "limit", "status", "detail"],
            [[g.name, g.measured, g.limit, _mark(g.met), g.note] for g in goals(results)],
        ),
        "",
        "## Fan-out size, burst arrival",
        "",
        _size_table(results, "sizes"),
        "",
        f"![jobs and API calls against fan-out size]({image_dir}calls_vs_size.png)",
        "",
        f"![time to the last result against fan-out size]({image_dir}time_vs_size.png)",
        "",
        "## Fan-out size, trickle arrival at Covalent's dispatch rate",
        "",
        _size_table(results, "trickle"),
        "",
        "## Through a real Covalent server",
        "",
        "The same fan-out dispatched with `ct.dispatch` to a private Covalent server whose "
        "`[executors.gcpbatch_array]` points at the local cloud: the electrons arrive at "
        "Covalent's own pace (its *target* uses the measured span from the first to the last "
        "electron started). CPU and memory here are the **server's**: Covalent's dispatcher and "
        "the executor share that process.",
        "",
        _size_table(results, "covalent"),
        "",
        "## Against the original plugin",
        "",
        "covalent-gcpbatch-plugin 0.15.0, the one-job-per-electron plugin users switch from, "
        "run unmodified from PyPI in a venv of its own (its pinned google-cloud-batch 0.9.0 and "
        "google-cloud-storage 2.7.0), beside both modes of ours, on the same kind of local "
        "cloud, without a job-creation quota (under one, the original plugin fails most of a "
        "burst). What differs from a real project is only where its clients point: its own "
        "async gRPC Batch client on an insecure channel to the emulator (its "
        "`_get_batch_client`, patched by `benchmarks/original_plugin/shim.py`), "
        "`STORAGE_EMULATOR_HOST`, and its image run as its Dockerfile does (`python exec.py`). "
        "Its settings are its defaults (`retries` 3: it ignores 0; `time_limit` 300 s; "
        "`poll_freq` whole seconds). *objects left*: objects in the bucket once every run "
        "returned. Through Covalent, CPU and memory are the server's, each its own venv's.",
        "",
        _original_table(results),
        "",
        original_headline(results),
        "",
        f"![against the original plugin]({image_dir}original_vs_size.png)",
        "",
        *behaviours,
        *graph_aware,
        "## Window sweep",
        "",
        _sweep_table(results),
        "",
        f"![window sweep]({image_dir}window_sweep.png)",
        "",
    ]
    profiles = _profile_sections(results_dir)
    if profiles:
        lines += ["## Profile of the executor", "", *profiles]
    if FINDINGS.exists():
        lines += [FINDINGS.read_text().rstrip(), ""]
    return "\n".join(lines)


def write_report(results_dir: Path = DEFAULT_RESULTS, out: Path | None = None) -> Path:
    """Draw the plots and write RESULTS.md (next to ``results/`` by default).

    :returns: the file written
    """
    draw_all(results_dir)
    if out is None:
        out = (
            results_dir.parent / "RESULTS.md"
            if results_dir.resolve() == DEFAULT_RESULTS.resolve()
            else results_dir / "RESULTS.md"
        )
    image_dir = os.path.relpath(results_dir, out.parent)
    image_dir = "" if image_dir == "." else image_dir + "/"
    out.write_text(render(results_dir, image_dir))
    return out


def main(argv: list[str] | None = None) -> None:
    """Write RESULTS.md from the results folder."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    options = parser.parse_args(argv)
    print(f"wrote {write_report(options.results)}")


if __name__ == "__main__":
    main()
