"""PNG plots of the results (matplotlib, Agg backend: no display needed).

- ``calls_vs_size.png``: jobs created and Batch API calls against fan-out size, log-log;
- ``time_vs_size.png``: time to the last result against fan-out size, both modes;
- ``window_sweep.png``: time to the first and the last result, and jobs created, against
  ``batch_window``, one line per ``batch_idle_gap``, for a burst and for a trickle;
- ``graph_aware.png``: jobs per scenario of ``benchmarks/graph_aware.py``, graph-aware against
  the timers alone (and one job per electron);
- ``original_vs_size.png``: jobs, Batch API calls and time to the last result against fan-out
  size, covalent-gcpbatch-plugin 0.15.0 beside both modes of ours, burst and through Covalent.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

__all__ = [
    "GRAPH_AWARE_MODES",
    "draw_all",
    "graph_aware_mode",
    "graph_aware_scenario",
    "load_graph_aware",
    "load_results",
]

_MODE_COLOURS = {"batched": "tab:blue", "baseline": "tab:red", "original": "tab:purple"}
_ARRIVAL_STYLES = {"burst": "-", "trickle": "--", "covalent": ":"}
_ORIGINAL_LABELS = {
    "original": "covalent-gcpbatch-plugin 0.15.0",
    "batched": "ours, batched",
    "baseline": "ours, one job per electron",
}
GRAPH_AWARE_MODES = ("graph-aware", "timers", "one job per electron")
_GRAPH_AWARE_COLOURS = {
    "graph-aware": "tab:green",
    "timers": "tab:blue",
    "one job per electron": "tab:red",
}


def load_results(results_dir: Path) -> list[dict[str, Any]]:
    """Every fan-out result in ``results_dir`` (not its sub-folders), sorted by name."""
    results = []
    for path in sorted(results_dir.glob("*.json")):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and data.get("kind") == "fanout":
            results.append(data)
    return results


def load_graph_aware(results_dir: Path) -> dict[str, Any] | None:
    """``graph_aware.json`` of ``benchmarks/graph_aware.py`` in ``results_dir``, if there."""
    path = results_dir / "graph_aware.json"
    return json.loads(path.read_text()) if path.exists() else None


def graph_aware_mode(row: dict[str, Any]) -> str:
    """A graph-aware row's mode: its ``mode``, else from its ``graph_aware`` flag."""
    return str(row.get("mode") or GRAPH_AWARE_MODES[0 if row["graph_aware"] else 1])


def graph_aware_scenario(row: dict[str, Any]) -> str:
    """A graph-aware row's scenario, the demo's with its machine (idle or loaded)."""
    scenario = str(row["scenario"])
    return f"{scenario}, {row['machine']}" if "machine" in row else scenario


def _save(figure: Any, path: Path) -> Path:
    """Lay ``figure`` out, write it to ``path`` and free it."""
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _series(
    results: Iterable[dict[str, Any]], groups: tuple[str, ...]
) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """(mode, arrival) -> results of ``groups``, by fan-out size."""
    series: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for result in results:
        spec = result["spec"]
        if spec["group"] in groups:
            series[(spec["mode"], spec["arrival"])].append(result)
    for points in series.values():
        points.sort(key=lambda r: r["electrons"])
    return dict(sorted(series.items()))


def _size_axes(axes: Any, title: str, ylabel: str) -> None:
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_title(title)
    axes.set_xlabel("electrons in the fan-out")
    axes.set_ylabel(ylabel)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small")


def _plot_calls(results: list[dict[str, Any]], out: Path) -> Path | None:
    series = _series(results, ("sizes", "trickle"))
    if not series:
        return None
    figure, (jobs_axes, calls_axes) = plt.subplots(1, 2, figsize=(11, 4.5))
    for (mode, arrival), points in series.items():
        sizes = [r["electrons"] for r in points]
        style: dict[str, Any] = {
            "color": _MODE_COLOURS[mode],
            "linestyle": _ARRIVAL_STYLES[arrival],
        }
        label = f"{mode}, {arrival}"
        jobs_axes.plot(sizes, [r["jobs_created"] for r in points], marker="o", label=label, **style)
        calls_axes.plot(
            sizes, [r["api_calls_total"] for r in points], marker="o", label=label, **style
        )
    _size_axes(jobs_axes, "Batch jobs created (= VM boots)", "jobs")
    _size_axes(calls_axes, "Batch API calls (all methods)", "calls")
    return _save(figure, out / "calls_vs_size.png")


def _plot_time(results: list[dict[str, Any]], out: Path) -> Path | None:
    series = _series(results, ("sizes", "trickle"))
    if not series:
        return None
    figure, axes = plt.subplots(figsize=(7.5, 5))
    for (mode, arrival), points in series.items():
        sizes = [r["electrons"] for r in points]
        axes.plot(
            sizes,
            [r["time_to_last_result_s"] for r in points],
            marker="o",
            color=_MODE_COLOURS[mode],
            linestyle=_ARRIVAL_STYLES[arrival],
            label=f"{mode}, {arrival}: last result",
        )
        if mode == "batched":
            axes.plot(
                sizes,
                [r["target_s"] for r in points],
                color="grey",
                linestyle=_ARRIVAL_STYLES[arrival],
                linewidth=1,
                label=f"arrival + window + boot + task + poll ({arrival})",
            )
    _size_axes(axes, "Time from the first arrival to the last result", "seconds")
    return _save(figure, out / "time_vs_size.png")


def _plot_sweep(results: list[dict[str, Any]], out: Path) -> Path | None:
    points = [r for r in results if r["spec"]["group"] == "sweep"]
    if not points:
        return None
    arrivals = sorted({r["spec"]["arrival"] for r in points})
    figure, grid = plt.subplots(len(arrivals), 2, figsize=(11, 4 * len(arrivals)), squeeze=False)
    for row, arrival in enumerate(arrivals):
        by_gap: dict[float, list[dict[str, Any]]] = defaultdict(list)
        for result in points:
            if result["spec"]["arrival"] == arrival:
                by_gap[result["spec"]["batch_idle_gap"]].append(result)
        time_axes, jobs_axes = grid[row]
        for gap, line in sorted(by_gap.items()):
            line.sort(key=lambda r: r["spec"]["batch_window"])
            windows = [r["spec"]["batch_window"] for r in line]
            label = f"idle gap {gap:g} s"
            drawn = time_axes.plot(
                windows,
                [r["time_to_last_result_s"] for r in line],
                marker="o",
                label=f"{label}: last",
            )
            time_axes.plot(
                windows,
                [r["time_to_first_result_s"] for r in line],
                marker=".",
                linestyle=":",
                color=drawn[0].get_color(),
                label=f"{label}: first",
            )
            jobs_axes.plot(windows, [r["jobs_created"] for r in line], marker="o", label=label)
        sample = points[0]
        what = f"{sample['electrons']} electrons, {arrival}"
        if arrival == "trickle":
            what += f" at {sample['spec']['rate']:g}/s"
        for axes, title, ylabel in (
            (time_axes, f"Time to the first and last result ({what})", "seconds"),
            (jobs_axes, f"Jobs created ({what})", "jobs"),
        ):
            axes.set_title(title, fontsize="medium")
            axes.set_xlabel("batch_window (s)")
            axes.set_ylabel(ylabel)
            axes.grid(True, alpha=0.3)
            axes.legend(fontsize="small")
    return _save(figure, out / "window_sweep.png")


def _plot_graph_aware(data: dict[str, Any] | None, out: Path) -> Path | None:
    if not data or not data["rows"]:
        return None
    jobs: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for row in data["rows"]:
        jobs[graph_aware_scenario(row)][graph_aware_mode(row)].append(row["jobs"])
    scenarios = list(jobs)
    figure, axes = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(GRAPH_AWARE_MODES)
    for offset, mode in enumerate(GRAPH_AWARE_MODES):
        places = [i for i, scenario in enumerate(scenarios) if mode in jobs[scenario]]
        if not places:
            continue
        runs = [jobs[scenarios[i]][mode] for i in places]
        bars = axes.bar(
            [i + (offset - 1) * width for i in places],
            [max(counts) for counts in runs],
            width,
            color=_GRAPH_AWARE_COLOURS[mode],
            label=mode,
        )
        labels = [", ".join(str(count) for count in counts) for counts in runs]
        axes.bar_label(bars, labels=labels, fontsize="small")
    axes.set_xticks(range(len(scenarios)), scenarios)
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel("Batch jobs (bar: the most of the runs)")
    axes.set_title("Jobs made: graph-aware coalescing against the timers alone")
    axes.grid(True, axis="y", alpha=0.3)
    axes.legend(fontsize="small")
    return _save(figure, out / "graph_aware.png")


def _plot_original(results: list[dict[str, Any]], out: Path) -> Path | None:
    series = _series(results, ("original",))
    if not series:
        return None
    figure, grid = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = (
        ("jobs_created", "Batch jobs created (= VM boots)", "jobs"),
        ("api_calls_total", "Batch API calls (all methods)", "calls"),
        ("time_to_last_result_s", "Time to the last result", "seconds"),
    )
    for (mode, arrival), points in series.items():
        sizes = [r["electrons"] for r in points]
        for axes, (key, _, _) in zip(grid, panels, strict=True):
            axes.plot(
                sizes,
                [r[key] for r in points],
                marker="o",
                color=_MODE_COLOURS[mode],
                linestyle=_ARRIVAL_STYLES[arrival],
                label=f"{_ORIGINAL_LABELS[mode]}, {arrival}",
            )
    for axes, (_, title, ylabel) in zip(grid, panels, strict=True):
        _size_axes(axes, title, ylabel)
    return _save(figure, out / "original_vs_size.png")


def draw_all(results_dir: Path) -> list[Path]:
    """Draw every plot the results in ``results_dir`` allow; returns the files written."""
    results = load_results(results_dir)
    drawn = [_plot_calls(results, results_dir), _plot_time(results, results_dir)]
    drawn.append(_plot_sweep(results, results_dir))
    drawn.append(_plot_graph_aware(load_graph_aware(results_dir), results_dir))
    drawn.append(_plot_original(results, results_dir))
    return [path for path in drawn if path is not None]
