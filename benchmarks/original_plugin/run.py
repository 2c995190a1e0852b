"""Running the original plugin on a LocalCloud: its image, its settings, its executor process.

Used by :mod:`benchmarks.harness` (burst) and :mod:`benchmarks.covalent_row` (a Covalent
server of the plugin's venv) for the runs of :attr:`~benchmarks.harness.Mode.ORIGINAL`.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import anyio

from .shim import ENDPOINT_VARIABLE
from .venv import SeedVenv

__all__ = [
    "SEED_IMAGE",
    "cloud_options",
    "plugin_env",
    "plugin_settings",
    "run_in_seed_venv",
    "run_original_burst",
]

#: The container image the plugin's config names; LocalCloud maps it to the plugin's exec.py.
SEED_IMAGE = "covalent-gcpbatch-plugin-0.15.0:local"
PROJECT = Path(__file__).resolve().parents[2]


def cloud_options(venv: SeedVenv) -> dict[str, Any]:
    """LocalCloud keywords: the plugin's image runs ``python exec.py`` of its venv, as its
    Dockerfile's ENTRYPOINT does; its tasks are plain scripts, so nothing is preloaded."""
    return {"image_map": {SEED_IMAGE: [str(venv.python), str(venv.exec_py)]}, "preload": ()}


def plugin_settings(cloud: Any, poll_freq: float, cache_dir: str) -> dict[str, Any]:
    """``GCPBatchExecutor`` keywords: the cloud, the plugin's defaults otherwise.

    ``retries`` stays the plugin's 3 (it ignores 0: ``retries or default``) and ``poll_freq``
    is whole seconds (it is an int there; 0 would mean the default, 5).
    """
    return {
        "project_id": cloud.project_id,
        "region": cloud.region,
        "bucket_name": cloud.bucket_name,
        "container_image_uri": SEED_IMAGE,
        "service_account_email": "benchmark@local.invalid",
        "vcpus": 2,
        "memory": 512,
        "time_limit": 300,
        "poll_freq": max(1, round(poll_freq)),
        "retries": 3,
        "cache_dir": cache_dir,
    }


def plugin_env(cloud: Any) -> dict[str, str]:
    """The two variables that point the plugin at ``cloud``: its Batch client (the shim's)
    and its storage client (the storage library's own emulator variable)."""
    return {
        ENDPOINT_VARIABLE: cloud.batch_grpc_endpoint,
        "STORAGE_EMULATOR_HOST": cloud.storage_endpoint,
    }


def seed_env(cloud: Any, home: Path) -> dict[str, str]:
    """The environment of a process of the plugin's venv: ours without Covalent's overrides,
    a HOME of its own, and :func:`plugin_env`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("COVALENT_")}
    return env | {"HOME": str(home)} | plugin_env(cloud)


async def run_in_seed_venv(
    venv: SeedVenv, cloud: Any, module: str, arguments: list[str], poll_freq: float
) -> tuple[Any, dict[str, Any]]:
    """Run ``python -m module ARGUMENTS --settings JSON --out FILE`` in the plugin's venv,
    pointed at ``cloud``, with a HOME of its own; ``module`` writes its answer (JSON) to FILE.

    :returns: that answer, and the plugin's settings (:func:`plugin_settings`)
    :raises RuntimeError: that process failed (its output is in the message)
    """
    with tempfile.TemporaryDirectory(prefix="cga-seed-") as home:
        settings = plugin_settings(cloud, poll_freq, str(Path(home) / "cache"))
        out = Path(home) / "answer.json"
        command = [
            *(str(venv.python), "-m", module, *arguments),
            *("--settings", json.dumps(settings), "--out", str(out)),
        ]
        completed = await anyio.run_process(
            command, check=False, cwd=PROJECT, env=seed_env(cloud, Path(home))
        )
        if completed.returncode != 0 or not out.exists():
            output = (completed.stdout + completed.stderr).decode(errors="replace")[-4000:]
            raise RuntimeError(
                f"the original plugin's run failed ({completed.returncode}):\n{output}"
            )
        return json.loads(out.read_text()), settings


async def run_original_burst(
    venv: SeedVenv, cloud: Any, load: dict[str, Any], poll_freq: float
) -> dict[str, Any]:
    """Run the fan-out ``load`` describes with the plugin, in a process of its venv.

    :returns: the measurements of :class:`benchmarks.measure.FanOut`, plus ``executor_settings``
    :raises RuntimeError: that process failed (its output is in the message)
    """
    arguments = ["--load", json.dumps(load), "--dispatch-id", f"bench-{uuid.uuid4().hex[:8]}"]
    measured, settings = await run_in_seed_venv(
        venv, cloud, "benchmarks.original_plugin.burst", arguments, poll_freq
    )
    return dict(measured) | {"executor_settings": settings}
