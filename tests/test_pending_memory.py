"""``python -m benchmarks.pending_memory``: memory per pending electron, grouped by owner."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.pending_memory import group_of

PROJECT = Path(__file__).parent.parent


class TestGroups:
    def test_ours_wins_over_the_library_it_calls(self) -> None:
        frames = [
            "/usr/lib/python3.11/asyncio/locks.py",
            "/venv/site-packages/anyio/_backends/_asyncio.py",
            "/repo/covalent_gcpbatch_array/_core/coalescer.py",
            "/repo/benchmarks/pending_memory.py",
        ]
        assert group_of(frames) == ("ours", 2)

    def test_the_benchmark_stands_for_covalent_over_anyio(self) -> None:
        frames = ["/repo/benchmarks/pending_memory.py", "/venv/site-packages/anyio/_core/x.py"]
        assert group_of(frames) == ("benchmark as covalent", 0)

    def test_anything_else_is_other(self) -> None:
        assert group_of(["/usr/lib/python3.11/json/decoder.py"]) == ("other", -1)


@pytest.mark.slow
def test_a_small_run_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "pending_memory.json"
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.pending_memory", "--electrons", "20", "--out", out],
        capture_output=True,
        text=True,
        check=False,
        cwd=PROJECT,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "ours, by line" in completed.stdout
    result = json.loads(out.read_text())
    assert result["rss"]["jobs_created"] == result["trace"]["jobs_created"] == 1
    assert result["rss"]["rss_growth_mb"] > 0
    traced = result["trace"]["traced_kb_per_electron"]
    assert traced["ours"] > 0
    assert result["trace"]["ours_top_lines_kb_per_electron"]
    assert result["environment"]["commit"]
