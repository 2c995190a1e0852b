"""``gcpbatch-array demo``: the SVM grid search through a private Covalent server, end to end."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from covalent_gcpbatch_array.cli import demo_workflow
from covalent_gcpbatch_array.cli.main import build_parser, main
from tests.test_cli import read_until
from tests.test_covalent_server import processes_with_home

CLI = [sys.executable, "-m", "covalent_gcpbatch_array.cli.main"]


class TestWorkflow:
    def test_pick_best_takes_the_highest_score_and_the_smallest_c_on_ties(self) -> None:
        pick_best = demo_workflow.pick_best.electron_object.function
        chosen = pick_best([0.5, 0.9, 0.9, 0.1], [1.0, 10.0], [0.1, 0.7])
        assert chosen["best"] == {"C": 1.0, "gamma": 0.7, "score": 0.9}
        assert chosen["scores"] == {"1,0.1": 0.5, "1,0.7": 0.9, "10,0.1": 0.9, "10,0.7": 0.1}

    def test_the_default_grid_has_at_least_24_pairs(self) -> None:
        pairs = len(demo_workflow.DEFAULT_C_VALUES) * len(demo_workflow.DEFAULT_GAMMA_VALUES)
        assert pairs >= 24
        assert (
            demo_workflow.electron_count(
                demo_workflow.DEFAULT_C_VALUES, demo_workflow.DEFAULT_GAMMA_VALUES
            )
            == 1 + 2 * pairs
        )


class TestArguments:
    def test_grid_and_flags(self) -> None:
        args = build_parser().parse_args(
            ["demo", "--c-values", "1,10", "--gamma-values", "0.1", "--hold"]
        )
        assert (args.c_values, args.gamma_values, args.hold) == ([1.0, 10.0], [0.1], True)
        defaults = build_parser().parse_args(["demo"])
        assert (defaults.c_values, defaults.gamma_values, defaults.hold) == (None, None, False)

    @pytest.mark.parametrize(
        ("values", "message"),
        [("1,x", "numbers separated by commas"), ("0,1", "positive"), ("1,1", "repeat")],
    )
    def test_bad_grids_exit_2(
        self, values: str, message: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        with pytest.raises(SystemExit) as exit_info:
            main(["demo", "--c-values", values])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


class TestDemo:
    @pytest.mark.slow
    def test_small_grid_prints_scores_best_and_packing_holds_and_cleans_up(self) -> None:
        demo = subprocess.Popen(
            [*CLI, "demo", "--c-values", "1,10", "--gamma-values", "0.1,0.7", "--hold"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            held = read_until(demo, "Press Ctrl-C to stop everything.", timeout=600)
            # While it holds, the Covalent server (and its UI's API) shows the dispatch.
            address = re.search(r"Covalent UI\s+(http://\S+)", held)
            assert address is not None, held
            with urllib.request.urlopen(f"{address[1]}/api/v1/dispatches/list", timeout=10) as r:
                (listed,) = json.load(r)["items"]
            assert (listed["lattice_name"], listed["status"]) == ("grid_search", "COMPLETED")
            demo.send_signal(signal.SIGTERM)
            rest, stderr = demo.communicate(timeout=120)
        finally:
            demo.kill()
            demo.communicate()
        out = held + rest.decode()
        assert demo.returncode == 0, out + stderr.decode()
        assert out.rstrip().endswith("Demo OK.")
        assert f"Dispatched {listed['dispatch_id']}" in out

        # The score table: one row per C, one accuracy per gamma; the best is starred.
        rows = {
            c: [float(score) for score in re.findall(r"(\d\.\d{3})", line)]
            for c in ("1", "10")
            for line in out.splitlines()
            if re.match(rf"^\W*{c} \W", line)
        }
        assert all(len(scores) == 2 for scores in rows.values()), out
        best = re.search(r"Best: C=(\S+), gamma=(\S+), accuracy (\d\.\d{3})", out)
        assert best is not None, out
        assert float(best[3]) == max(max(scores) for scores in rows.values())
        assert f"{best[3]} *" in out

        # 9 electrons (load + 4 train + 4 score), each one task of some job.
        packing = re.search(
            r"Packing: (\d+) electrons -> (\d+) Batch jobs \(tasks per job: ([\d, ]+); "
            r"flushed: ([a-z ,]+)\); "
            r"(\d+) Batch API calls by the executor \(([^)]*)\)",
            out,
        )
        assert packing is not None, out
        assert int(packing[1]) == 9
        sizes = [int(size) for size in packing[3].split(", ")]
        assert len(sizes) == int(packing[2]) and sum(sizes) == 9
        reasons = packing[4].split(", ")
        assert len(reasons) == len(sizes)
        assert set(reasons) <= {"wave complete", "window cap", "full", "idle gap", "closing"}
        calls = dict(part.rsplit(" ", 1) for part in packing[6].split(", "))
        assert int(calls["CreateJob"]) == int(packing[2])
        assert "ListJobs" not in calls  # the progress display's own calls are not counted
        assert sum(int(count) for count in calls.values()) == int(packing[5])

        # Progress in a log: one short line per new job (with why it was flushed), then totals.
        progress = [line for line in out.splitlines() if re.match(r"^  \[\s*\d+\.\d s\] ", line)]
        new_jobs = [line for line in progress if " new job " in line]
        assert len(new_jobs) == len(sizes)
        assert all(re.search(r"task\(s\), flushed: [a-z ]+$", line) for line in new_jobs)
        assert max(len(line) for line in progress) <= 100, progress
        assert re.search(r"Workflow \d+\.\d s; total \d+\.\d s", out)

        # The private Covalent server and its HOME are gone.
        home_match = re.search(r"\(HOME (\S+)\)", out)
        assert home_match is not None, out
        home = Path(home_match[1])
        assert not home.exists()
        assert not processes_with_home(home)
