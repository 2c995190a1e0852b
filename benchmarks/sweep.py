"""The window sweep: time to the last result and jobs created, against ``batch_window`` and
``batch_idle_gap``, for a burst and for a trickle at Covalent's dispatch rate.

    python -m benchmarks.sweep [--parallel 3] [--resume]

A longer window packs a trickle into fewer jobs but holds its first electrons back; the idle
gap flushes a batch as soon as arrivals stop, which is what a burst needs. Each point is a
batched fan-out of 100 electrons on the realistic cloud (30 s VM boot, 20 jobs a minute).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

from .harness import Arrival, Mode
from .suite import COVALENT_RATE, RESULTS_DIR, Planned, make_spec, run_plan

__all__ = ["IDLE_GAPS", "WINDOWS", "sweep_plan"]

WINDOWS = (2.0, 5.0, 10.0, 20.0, 30.0, 60.0)
IDLE_GAPS = (0.0, 2.0, 5.0)
SWEEP_ELECTRONS = 100


def _label(value: float) -> str:
    return f"{value:g}"


def sweep_plan(
    electrons: int = SWEEP_ELECTRONS,
    windows: Sequence[float] = WINDOWS,
    idle_gaps: Sequence[float] = IDLE_GAPS,
    arrivals: Sequence[Arrival] = (Arrival.BURST, Arrival.TRICKLE),
    rate: float = COVALENT_RATE,
    **knobs: Any,
) -> list[Planned]:
    """One batched run per (arrival, window, idle gap)."""
    plans = []
    for arrival in arrivals:
        for window in windows:
            for gap in idle_gaps:
                name = f"sweep-{arrival.value}-w{_label(window)}-g{_label(gap)}"
                spec = make_spec(
                    name,
                    "sweep",
                    Mode.BATCHED,
                    electrons,
                    arrival=arrival,
                    rate=rate,
                    batch_window=window,
                    batch_idle_gap=gap,
                    **knobs,
                )
                plans.append(Planned(spec, expected_seconds=spec.target_seconds + 60))
    return plans


def main(argv: list[str] | None = None) -> None:
    """Run the sweep, then redraw the plots and RESULTS.md."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parallel", type=int, default=3, help="runs in flight at once")
    parser.add_argument("--resume", action="store_true", help="skip points already measured")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    options = parser.parse_args(argv)
    anyio.run(
        lambda: run_plan(
            sweep_plan(), options.results, parallel=options.parallel, resume=options.resume
        )
    )
    from .report import write_report

    write_report(options.results)


if __name__ == "__main__":
    main()
