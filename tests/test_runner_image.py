"""Checks of the task image's Dockerfile (no Docker engine here: lint and parse it)."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from covalent_gcpbatch_array._core import contract

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "runner_image" / "Dockerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += stripped
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, arguments = pending.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continuation line"
    return instructions


def _hadolint(path: Path) -> list[dict[str, object]]:
    done = subprocess.run(
        [str(HADOLINT), "--format", "json", "--no-fail", "--disable-ignore-pragma", str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    findings: list[dict[str, object]] = json.loads(done.stdout)
    return findings


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return _instructions(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def arg_defaults(instructions: list[tuple[str, str]]) -> dict[str, str]:
    return dict(arguments.split("=", 1) for keyword, arguments in instructions if keyword == "ARG")


class TestLint:
    def test_hadolint_finds_nothing(self) -> None:
        assert _hadolint(DOCKERFILE) == []

    def test_hadolint_does_find_problems(self, tmp_path: Path) -> None:
        bad = tmp_path / "Dockerfile"
        bad.write_text("FROM python\nRUN pip install covalent\nCMD python -m x\n")
        codes = {finding["code"] for finding in _hadolint(bad)}
        assert {"DL3006", "DL3013", "DL3025"} <= codes


class TestSettings:
    def test_base_image_is_slim_python_of_the_chosen_version(
        self, instructions: list[tuple[str, str]], arg_defaults: dict[str, str]
    ) -> None:
        froms = [arguments for keyword, arguments in instructions if keyword == "FROM"]
        assert froms == ["python:${PYTHON_VERSION}-slim"]
        major, minor = (int(part) for part in arg_defaults["PYTHON_VERSION"].split("."))
        assert (major, minor) >= (3, 10)

    def test_covalent_default_is_the_pinned_server_version(
        self, arg_defaults: dict[str, str]
    ) -> None:
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        pins = [dep for dep in project["dependencies"] if re.match(r"covalent\s*==", dep)]
        assert pins == [f"covalent=={arg_defaults['COVALENT_VERSION']}"]
        assert importlib.metadata.version("covalent") == arg_defaults["COVALENT_VERSION"]

    def test_installs_covalent_at_that_version_and_this_package(
        self, instructions: list[tuple[str, str]]
    ) -> None:
        runs = [arguments for keyword, arguments in instructions if keyword == "RUN"]
        installs = [cmd for run in runs for cmd in run.split("&&") if "pip install" in cmd]
        assert len(installs) == 1
        words = shlex.split(installs[0])
        assert "--no-cache-dir" in words
        assert "covalent==${COVALENT_VERSION}" in words
        assert "/src" in words  # the core install: no [local] extra in a task's image
        assert not [word for word in words if word.startswith("/src[")]

    def test_copies_only_what_exists(self, instructions: list[tuple[str, str]]) -> None:
        copies = [arguments.split() for keyword, arguments in instructions if keyword == "COPY"]
        assert copies
        for *sources, _destination in copies:
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        copied = {source for *sources, _ in copies for source in sources}
        assert {"pyproject.toml", "covalent_gcpbatch_array"} <= copied
        # pyproject's readme must be in the build context, or the package will not build.
        readme = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["readme"]
        assert readme in copied

    def test_runs_unprivileged_after_the_last_run(
        self, instructions: list[tuple[str, str]]
    ) -> None:
        keywords = [keyword for keyword, _ in instructions]
        users = [arguments for keyword, arguments in instructions if keyword == "USER"]
        assert users, "no USER: the task would run as root"
        assert users[-1].split(":")[0] not in ("root", "0")
        last_user = max(i for i, keyword in enumerate(keywords) if keyword == "USER")
        assert "RUN" not in keywords[last_user:]

    def test_unbuffered_output(self, instructions: list[tuple[str, str]]) -> None:
        env = " ".join(arguments for keyword, arguments in instructions if keyword == "ENV")
        assert "PYTHONUNBUFFERED=1" in env.split()

    def test_entrypoint_runs_the_runner(self, instructions: list[tuple[str, str]]) -> None:
        entrypoints = [arguments for keyword, arguments in instructions if keyword == "ENTRYPOINT"]
        assert [json.loads(entry) for entry in entrypoints] == [
            ["python", "-m", "covalent_gcpbatch_array.runner"]
        ]
        assert instructions[-1][0] in ("ENTRYPOINT", "CMD")

    def test_entrypoint_command_starts(self) -> None:
        # The module the entry point names exists and refuses an empty environment cleanly.
        done = subprocess.run(
            [sys.executable, "-m", "covalent_gcpbatch_array.runner"],
            env={"PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == contract.EXIT_INFRA_ERROR
        assert "cannot start: CGA_BUCKET is not set" in done.stderr


class TestReadme:
    def test_readme_gives_the_build_command(self) -> None:
        text = (ROOT / "runner_image" / "README.md").read_text()
        assert "docker build -f runner_image/Dockerfile" in text
        assert "--build-arg PYTHON_VERSION" in text
        assert "--build-arg COVALENT_VERSION" in text
