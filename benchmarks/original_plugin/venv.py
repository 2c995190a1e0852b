"""The original plugin's own virtual environment, made on first use and cached.

covalent-gcpbatch-plugin 0.15.0 pins google-cloud-batch 0.9.0 and google-cloud-storage 2.7.0,
older than this project's: it gets a venv of its own (``.venv-seed/`` in the clone, or
``$CGA_SEED_VENV``), with Covalent and FastAPI as this project pins them, so that its server
matches ours.
Made by ``pip`` from PyPI on first use (about a minute), then reused while the requirements are
the same; the shim (:mod:`.shim`) is copied in at every use so that it is always current.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

__all__ = ["REQUIREMENTS", "SeedVenv", "ensure_seed_venv"]

#: Covalent 0.240's server refuses every dispatch with FastAPI 0.132 and later (FACTS.md).
REQUIREMENTS = ("covalent-gcpbatch-plugin==0.15.0", "covalent==0.240.0", "fastapi<0.132")
DEFAULT_LOCATION = Path(__file__).resolve().parents[2] / ".venv-seed"
_MARKER = ".cga-requirements"
_SHIM = Path(__file__).with_name("shim.py")


@dataclasses.dataclass(frozen=True)
class SeedVenv:
    """Where the original plugin's environment and its task entry point are."""

    root: Path

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    @property
    def site_packages(self) -> Path:
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        return self.root / "lib" / version / "site-packages"

    @property
    def exec_py(self) -> Path:
        """The plugin's task entry point (its image runs ``python exec.py``)."""
        return self.site_packages / "covalent_gcpbatch_plugin" / "assets" / "docker" / "exec.py"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One maker at a time: the suite runs benchmarks side by side."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_seed_venv(location: Path | None = None) -> SeedVenv:
    """The original plugin's venv, made now if missing or made for other requirements.

    :raises subprocess.CalledProcessError: ``venv`` or ``pip`` failed (their output is shown)
    """
    root = location or Path(os.environ.get("CGA_SEED_VENV") or DEFAULT_LOCATION)
    venv = SeedVenv(root)
    wanted = "\n".join(REQUIREMENTS) + "\n"
    marker = root / _MARKER
    with _locked(root.with_name(root.name + ".lock")):
        if not marker.exists() or marker.read_text() != wanted:
            shutil.rmtree(root, ignore_errors=True)
            base = getattr(sys, "_base_executable", sys.executable)
            subprocess.run([base, "-m", "venv", str(root)], check=True)
            subprocess.run(
                [str(venv.python), "-m", "pip", "install", "--quiet", *REQUIREMENTS], check=True
            )
            marker.write_text(wanted)
        shutil.copyfile(_SHIM, venv.site_packages / "cga_seed_shim.py")
        (venv.site_packages / "cga_seed_shim.pth").write_text(
            "import cga_seed_shim; cga_seed_shim.install()\n"
        )
    return venv
