"""Tests of the task launcher and its pre-warmed fork server: real processes, nothing mocked.

The tasks run a probe module written to a temporary folder (importable through the task's
PYTHONPATH). Each probe reports what it sees (pids, environment, argv, preloaded modules) as one
JSON object over TCP to a listener in the test, so tests wait on events, never on sleeps. Most
tests run the same probe two ways: forked from the fork server (``python -m probe_task``) and
exec'd as a fresh interpreter (``env python -m probe_task``), and expect the same behaviour.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import ByteStream, SocketAttribute
from anyio.streams.memory import MemoryObjectReceiveStream

from covalent_gcpbatch_array.local.batch.launcher import (
    DEFAULT_PRELOAD,
    RUNNER_MODULE,
    TaskLauncher,
    TaskProcess,
    TaskStartError,
    UnknownImageError,
)

TIMEOUT = 60  # seconds; a safety net against hangs on a loaded machine, never a speed check
LEAK_VARIABLE = "CGA_LAUNCHER_TEST_MUST_NOT_LEAK"

PROBE_TASK = """
import json, os, socket, subprocess, sys, time


def report(**fields):
    with socket.create_connection(("127.0.0.1", int(os.environ["PROBE_PORT"]))) as conn:
        conn.sendall(json.dumps(fields).encode())


action, args = sys.argv[1], sys.argv[2:]
if action == "exit":
    sys.exit(int(args[0]))
elif action == "raise":
    raise ValueError("probe failure")
elif action == "print":
    print("out", *args)
    print("err", *args, file=sys.stderr)
elif action == "describe":
    probe = sys.modules.get("probe_preload")
    report(pid=os.getpid(), env=dict(os.environ), cwd=os.getcwd(), argv=sys.argv,
           path0=sys.path[0], path1=sys.path[1], pgid=os.getpgid(0), sid=os.getsid(0),
           stdin=sys.stdin.read(), preload_pid=getattr(probe, "IMPORTED_IN_PID", None))
elif action in ("hold", "leave-child"):
    child = subprocess.Popen(["sleep", "300"])
    report(pid=os.getpid(), grandchild=child.pid)
    if action == "hold":
        time.sleep(300)
elif action == "print-and-hold":
    print("early")  # no flush: only PYTHONUNBUFFERED makes it reach the file at once
    report(pid=os.getpid())
    time.sleep(300)
elif action == "exit-message":
    sys.exit("fatal: probe says no")
elif action == "shutdown":
    import atexit, threading
    atexit.register(print, "atexit ran")
    go = threading.Event()
    def late():
        go.wait()
        print("thread ran", flush=True)
    threading.Thread(target=late).start()
    left_open = open("left-open.txt", "w")
    left_open.write("buffered data")
    go.set()
elif action == "first-line":
    print(time.monotonic(), flush=True)
"""

PROBE_PRELOAD = """
import os
IMPORTED_IN_PID = os.getpid()
"""


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("probe")
    (folder / "probe_task.py").write_text(textwrap.dedent(PROBE_TASK))
    (folder / "probe_preload.py").write_text(PROBE_PRELOAD)
    return folder


class Reports:
    """A TCP listener for the probes' reports: one JSON object per connection."""

    def __init__(self, port: int, inbox: MemoryObjectReceiveStream[dict[str, Any]]) -> None:
        self.port = port
        self._inbox = inbox

    async def next(self) -> dict[str, Any]:
        with anyio.fail_after(TIMEOUT):
            return await self._inbox.receive()


@pytest.fixture
async def reports(anyio_backend: str) -> AsyncIterator[Reports]:
    send, receive = anyio.create_memory_object_stream[dict[str, Any]](100_000)

    async def handle(conn: ByteStream) -> None:
        async with conn:
            data = b""
            while True:
                try:
                    data += await conn.receive()
                except anyio.EndOfStream:
                    break
            await send.send(json.loads(data))

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with send, receive, anyio.create_task_group() as handlers:
        async with listener, anyio.create_task_group() as accepting:
            accepting.start_soon(listener.serve, handle, handlers)
            yield Reports(listener.extra(SocketAttribute.local_port), receive)
            accepting.cancel_scope.cancel()
        # Handlers of connections already accepted still start (a handler cancelled before it
        # starts would never close its socket) and end when their probe closes, or time out.
        handlers.cancel_scope.deadline = anyio.current_time() + TIMEOUT


@pytest.fixture
def server_env(probe_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the fork server inherits: the probe folder importable, and a variable to not leak."""
    monkeypatch.setenv("PYTHONPATH", str(probe_dir))
    monkeypatch.setenv(LEAK_VARIABLE, "1")


@pytest.fixture
async def launcher(anyio_backend: str, server_env: None) -> AsyncIterator[TaskLauncher]:
    async with TaskLauncher(preload=("probe_preload",)) as launcher:
        yield launcher


@pytest.fixture
def task_env(probe_dir: Path, reports: Reports) -> dict[str, str]:
    return {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(probe_dir),
        "PROBE_PORT": str(reports.port),
        "BATCH_TASK_INDEX": "7",
        # A fresh interpreter in the C locale adds LC_CTYPE to its environment (PEP 538).
        "LANG": "C.UTF-8",
    }


KINDS = ["forked", "exec"]


def probe_argv(kind: str, *args: str) -> list[str]:
    """The probe as the fork server runs it (forked), or as a fresh interpreter (exec)."""
    argv = [sys.executable, "-m", "probe_task", *args]
    return argv if kind == "forked" else ["env", *argv]


async def run_probe(
    launcher: TaskLauncher, folder: Path, env: dict[str, str], argv: Sequence[str]
) -> TaskProcess:
    return await launcher.start(argv, env=env, stdout=folder / "out", stderr=folder / "err")


async def wait_gone(pidfds: Sequence[int]) -> None:
    """Wait until every process behind ``pidfds`` has exited (a pidfd turns readable)."""
    with anyio.fail_after(TIMEOUT):
        for fd in pidfds:
            await anyio.wait_readable(fd)


@pytest.fixture
def pidfds() -> Iterator[list[int]]:
    """Open pidfds the test collects: opened while the process is known alive, closed after."""
    fds: list[int] = []
    yield fds
    for fd in fds:
        os.close(fd)


def is_running(pidfd: int) -> bool:
    """True while the process behind ``pidfd`` has not exited (its pidfd is not readable)."""
    return not select.select([pidfd], [], [], 0)[0]


class TestContainerArgv:
    def test_default_map_runs_the_project_runner_for_any_image(self) -> None:
        launcher = TaskLauncher()
        argv = launcher.container_argv("gcr.io/p/covalent-runner:1", entrypoint="", commands=[])
        assert argv == [sys.executable, "-m", RUNNER_MODULE]

    def test_exact_uri_wins_over_a_pattern_listed_first(self) -> None:
        launcher = TaskLauncher(
            image_map={"gcr.io/p/*": ["pattern"], "gcr.io/p/runner:2": ["exact"]}
        )
        assert launcher.container_argv("gcr.io/p/runner:2", "", []) == ["exact"]
        assert launcher.container_argv("gcr.io/p/runner:3", "", []) == ["pattern"]

    def test_patterns_are_tried_in_order(self) -> None:
        launcher = TaskLauncher(image_map={"gcr.io/p/a*": ["first"], "gcr.io/*": ["second"]})
        assert launcher.container_argv("gcr.io/p/abc", "", []) == ["first"]
        assert launcher.container_argv("gcr.io/q/abc", "", []) == ["second"]

    def test_commands_are_appended_to_the_image_entrypoint(self) -> None:
        launcher = TaskLauncher(image_map={"img": ["/bin/tool", "--fixed"]})
        assert launcher.container_argv("img", "", ["a", "b"]) == ["/bin/tool", "--fixed", "a", "b"]

    @pytest.mark.parametrize("entrypoint", ["python", "python3", "/usr/local/bin/python3.11"])
    def test_python_entrypoint_means_the_current_python(self, entrypoint: str) -> None:
        launcher = TaskLauncher(image_map={"img": ["/bin/tool"]})
        argv = launcher.container_argv("img", entrypoint, ["-m", "mod", "x"])
        assert argv == [sys.executable, "-m", "mod", "x"]

    def test_other_entrypoint_replaces_the_image_entrypoint(self) -> None:
        launcher = TaskLauncher(image_map={"img": ["/bin/tool", "--fixed"]})
        assert launcher.container_argv("img", "/bin/sh", ["-c", "true"]) == [
            "/bin/sh",
            "-c",
            "true",
        ]

    def test_unknown_image_says_how_to_map_it(self) -> None:
        launcher = TaskLauncher(image_map={"gcr.io/p/*": ["x"]})
        with pytest.raises(UnknownImageError) as caught:
            launcher.container_argv("docker.io/other:1", "", [])
        assert isinstance(caught.value, ValueError)
        message = str(caught.value)
        assert "docker.io/other:1" in message
        assert "image_map" in message
        assert "'gcr.io/p/*'" in message

    def test_returned_argv_does_not_alias_the_map(self) -> None:
        launcher = TaskLauncher(image_map={"img": ["/bin/tool"]})
        launcher.container_argv("img", "", []).append("junk")
        assert launcher.container_argv("img", "", []) == ["/bin/tool"]


@pytest.mark.anyio
class TestExitCodes:
    @pytest.mark.parametrize("kind", KINDS)
    @pytest.mark.parametrize("code", [0, 3, 50001 % 256])
    async def test_exit_code_is_reported(
        self, launcher: TaskLauncher, task_env: dict[str, str], tmp_path: Path, kind: str, code: int
    ) -> None:
        task = await run_probe(launcher, tmp_path, task_env, probe_argv(kind, "exit", str(code)))
        assert await task.wait() == code
        assert task.returncode == code

    @pytest.mark.parametrize("kind", KINDS)
    async def test_uncaught_exception_exits_1_with_traceback(
        self, launcher: TaskLauncher, task_env: dict[str, str], tmp_path: Path, kind: str
    ) -> None:
        task = await run_probe(launcher, tmp_path, task_env, probe_argv(kind, "raise"))
        assert await task.wait() == 1
        stderr = (tmp_path / "err").read_text()
        assert "Traceback (most recent call last)" in stderr
        assert stderr.rstrip().endswith("ValueError: probe failure")

    @pytest.mark.parametrize("kind", KINDS)
    async def test_killed_task_reports_128_plus_9(
        self,
        launcher: TaskLauncher,
        reports: Reports,
        task_env: dict[str, str],
        tmp_path: Path,
        kind: str,
    ) -> None:
        task = await run_probe(launcher, tmp_path, task_env, probe_argv(kind, "hold"))
        await reports.next()  # it runs
        task.kill()
        assert await task.wait() == 128 + signal.SIGKILL

    @pytest.mark.parametrize("kind", KINDS)
    async def test_exit_with_a_message_prints_it_and_exits_1(
        self, launcher: TaskLauncher, task_env: dict[str, str], tmp_path: Path, kind: str
    ) -> None:
        task = await run_probe(launcher, tmp_path, task_env, probe_argv(kind, "exit-message"))
        assert await task.wait() == 1
        assert (tmp_path / "err").read_text() == "fatal: probe says no\n"

    @pytest.mark.parametrize("kind", KINDS)
    async def test_exit_joins_threads_runs_atexit_and_flushes_files(
        self, launcher: TaskLauncher, task_env: dict[str, str], tmp_path: Path, kind: str
    ) -> None:
        task = await run_probe(launcher, tmp_path, task_env, probe_argv(kind, "shutdown"))
        assert await task.wait() == 0
        assert (tmp_path / "out").read_text() == "thread ran\natexit ran\n"
        assert (tmp_path / "left-open.txt").read_text() == "buffered data"
        assert (tmp_path / "err").read_text() == ""

    @pytest.mark.parametrize("kind", KINDS)
    async def test_missing_module_exits_1_as_python_dash_m_does(
        self, launcher: TaskLauncher, task_env: dict[str, str], tmp_path: Path, kind: str
    ) -> None:
        argv = [sys.executable, "-m", "no_such_module_cga"]
        task = await run_probe(
            launcher, tmp_path, task_env, argv if kind == "forked" else ["env", *argv]
        )
        assert await task.wait() == 1
        assert (
            tmp_path / "err"
        ).read_text() == f"{sys.executable}: No module named no_such_module_cga\n"

    async def test_missing_program_exits_127_with_a_message(
        self, launcher: TaskLauncher, task_env: dict[str, str], tmp_path: Path
    ) -> None:
        task = await run_probe(launcher, tmp_path, task_env, ["no-such-program-cga"])
        assert await task.wait() == 127
        assert "no-such-program-cga" in (tmp_path / "err").read_text()

    async def test_script_runnable_through_bash(
        self, launcher: TaskLauncher, task_env: dict[str, str], tmp_path: Path
    ) -> None:
        script = 'echo "task $BATCH_TASK_INDEX"; exit 4'
        task = await run_probe(launcher, tmp_path, task_env, ["bash", "-c", script])
        assert await task.wait() == 4
        assert (tmp_path / "out").read_text() == "task 7\n"


@pytest.mark.anyio
class TestEnvironment:
    @pytest.mark.parametrize("kind", KINDS)
    async def test_env_is_replaced_not_merged(
        self,
        launcher: TaskLauncher,
        reports: Reports,
        task_env: dict[str, str],
        tmp_path: Path,
        kind: str,
    ) -> None:
        assert os.environ[LEAK_VARIABLE] == "1"  # the fork server inherited it
        await run_probe(launcher, tmp_path, task_env, probe_argv(kind, "describe"))
        seen = await reports.next()
        assert seen["env"]["BATCH_TASK_INDEX"] == "7"
        assert LEAK_VARIABLE not in seen["env"]
        assert seen["env"] == task_env

    async def test_forked_task_looks_like_a_fresh_python_dash_m(
        self,
        launcher: TaskLauncher,
        reports: Reports,
        task_env: dict[str, str],
        probe_dir: Path,
        tmp_path: Path,
    ) -> None:
        seen = {}
        for kind in KINDS:
            folder = tmp_path / kind
            folder.mkdir()
            task = await run_probe(launcher, folder, task_env, probe_argv(kind, "describe", "x"))
            seen[kind] = await reports.next()
            assert await task.wait() == 0
            assert seen[kind]["cwd"] == str(folder)  # default: the folder of stdout
            assert seen[kind]["path0"] == str(folder)
        forked, fresh = seen["forked"], seen["exec"]
        for key in ("env", "argv", "path1", "stdin"):
            assert forked[key] == fresh[key], key
        assert forked["argv"] == [str(probe_dir / "probe_task.py"), "describe", "x"]
        assert forked["path1"] == str(probe_dir)
        assert forked["stdin"] == ""

    @pytest.mark.parametrize("kind", KINDS)
    async def test_task_leads_its_own_session(
        self,
        launcher: TaskLauncher,
        reports: Reports,
        task_env: dict[str, str],
        tmp_path: Path,
        kind: str,
    ) -> None:
        task = await run_probe(launcher, tmp_path, task_env, probe_argv(kind, "describe"))
        seen = await reports.next()
        assert seen["pid"] == seen["pgid"] == seen["sid"] == task.pid

    async def test_explicit_cwd(
        self, launcher: TaskLauncher, reports: Reports, task_env: dict[str, str], tmp_path: Path
    ) -> None:
        workdir = tmp_path / "work"
        workdir.mkdir()
        await launcher.start(
            probe_argv("forked", "describe"),
            env=task_env,
            stdout=tmp_path / "out",
            stderr=tmp_path / "err",
            cwd=workdir,
        )
        assert (await reports.next())["cwd"] == str(workdir)


@pytest.mark.anyio
class TestOutput:
    @pytest.mark.parametrize("kind", KINDS)
    async def test_stdout_and_stderr_go_to_their_files(
        self, launcher: TaskLauncher, task_env: dict[str, str], tmp_path: Path, kind: str
    ) -> None:
        task = await run_probe(launcher, tmp_path, task_env, probe_argv(kind, "print", "a1"))
        assert await task.wait() == 0
        assert (tmp_path / "out").read_text() == "out a1\n"
        assert (tmp_path / "err").read_text() == "err a1\n"

    @pytest.mark.parametrize("kind", KINDS)
    @pytest.mark.parametrize("unbuffered", [True, False])
    async def test_stdout_buffering_is_a_fresh_interpreters(
        self,
        launcher: TaskLauncher,
        reports: Reports,
        task_env: dict[str, str],
        tmp_path: Path,
        kind: str,
        unbuffered: bool,
    ) -> None:
        env = {**task_env, "PYTHONUNBUFFERED": "1"} if unbuffered else task_env
        task = await run_probe(launcher, tmp_path, env, probe_argv(kind, "print-and-hold"))
        await reports.next()
        # To a file, stdout is block-buffered unless PYTHONUNBUFFERED is set.
        assert (tmp_path / "out").read_text() == ("early\n" if unbuffered else "")
        task.kill()
        await task.wait()

    async def test_one_file_for_both_streams(
        self, launcher: TaskLauncher, task_env: dict[str, str], tmp_path: Path
    ) -> None:
        log = tmp_path / "log"
        task = await launcher.start(
            probe_argv("forked", "print", "b2"), env=task_env, stdout=log, stderr=log
        )
        assert await task.wait() == 0
        assert sorted(log.read_text().splitlines()) == ["err b2", "out b2"]

    async def test_output_file_is_truncated_for_a_new_attempt(
        self, launcher: TaskLauncher, task_env: dict[str, str], tmp_path: Path
    ) -> None:
        (tmp_path / "out").write_text("old attempt output that is longer\n")
        task = await run_probe(launcher, tmp_path, task_env, probe_argv("forked", "print", "c"))
        assert await task.wait() == 0
        assert (tmp_path / "out").read_text() == "out c\n"

    async def test_unusable_output_path_is_a_start_error(
        self, launcher: TaskLauncher, task_env: dict[str, str], tmp_path: Path
    ) -> None:
        missing = tmp_path / "missing-folder"
        with pytest.raises(TaskStartError, match="stdout"):
            await run_probe(launcher, missing, task_env, probe_argv("forked", "exit", "0"))

    async def test_missing_cwd_is_a_start_error(
        self, launcher: TaskLauncher, task_env: dict[str, str], tmp_path: Path
    ) -> None:
        with pytest.raises(TaskStartError, match="does not exist"):
            await launcher.start(
                ["true"],
                env=task_env,
                stdout=tmp_path / "out",
                stderr=tmp_path / "err",
                cwd=tmp_path / "nowhere",
            )


@pytest.mark.anyio
class TestKill:
    @pytest.mark.parametrize("kind", KINDS)
    async def test_kill_takes_the_grandchildren_too(
        self,
        launcher: TaskLauncher,
        reports: Reports,
        task_env: dict[str, str],
        tmp_path: Path,
        pidfds: list[int],
        kind: str,
    ) -> None:
        task = await run_probe(launcher, tmp_path, task_env, probe_argv(kind, "hold"))
        seen = await reports.next()
        pidfds += [os.pidfd_open(seen["pid"]), os.pidfd_open(seen["grandchild"])]
        assert all(is_running(fd) for fd in pidfds)
        task.kill()
        assert await task.wait() == 128 + signal.SIGKILL
        await wait_gone(pidfds)

    async def test_kill_is_idempotent_and_a_no_op_after_exit(
        self, launcher: TaskLauncher, task_env: dict[str, str], tmp_path: Path
    ) -> None:
        task = await run_probe(launcher, tmp_path, task_env, probe_argv("forked", "hold"))
        task.kill()
        task.kill()
        assert await task.wait() == 128 + signal.SIGKILL
        task.kill()
        done = await run_probe(launcher, tmp_path, task_env, probe_argv("forked", "exit", "0"))
        assert await done.wait() == 0
        done.kill()
        assert await done.wait() == 0

    @pytest.mark.parametrize("kind", KINDS)
    async def test_what_a_task_leaves_behind_dies_when_it_exits(
        self,
        launcher: TaskLauncher,
        reports: Reports,
        task_env: dict[str, str],
        tmp_path: Path,
        pidfds: list[int],
        kind: str,
    ) -> None:
        # A container's processes all die when its main process exits.
        task = await run_probe(launcher, tmp_path, task_env, probe_argv(kind, "leave-child"))
        seen = await reports.next()
        pidfds.append(os.pidfd_open(seen["grandchild"]))
        assert await task.wait() == 0
        await wait_gone(pidfds)


@pytest.mark.anyio
class TestPreload:
    async def test_forked_task_uses_the_module_preloaded_in_the_server(
        self, launcher: TaskLauncher, reports: Reports, task_env: dict[str, str], tmp_path: Path
    ) -> None:
        await launcher.wait_ready()
        assert launcher.preloaded == ("probe_preload",)
        await run_probe(launcher, tmp_path, task_env, probe_argv("forked", "describe"))
        seen = await reports.next()
        assert seen["preload_pid"] == launcher.server_pid
        assert seen["pid"] != launcher.server_pid

    async def test_exec_task_does_not_have_it(
        self, launcher: TaskLauncher, reports: Reports, task_env: dict[str, str], tmp_path: Path
    ) -> None:
        await run_probe(launcher, tmp_path, task_env, probe_argv("exec", "describe"))
        assert (await reports.next())["preload_pid"] is None

    async def test_preload_failures_are_reported_and_ignored(
        self, server_env: None, reports: Reports, task_env: dict[str, str], tmp_path: Path
    ) -> None:
        preload = ("no_such_module_cga", "probe_preload")
        async with TaskLauncher(preload=preload) as launcher:
            await launcher.wait_ready()
            assert launcher.preloaded == ("probe_preload",)
            assert "ModuleNotFoundError" in launcher.preload_failures["no_such_module_cga"]
            task = await run_probe(launcher, tmp_path, task_env, probe_argv("forked", "exit", "0"))
            assert await task.wait() == 0

    @pytest.mark.slow
    async def test_default_preload(self, anyio_backend: str) -> None:
        async with TaskLauncher() as launcher:
            await launcher.wait_ready()
        assert set(launcher.preloaded) | set(launcher.preload_failures) == set(DEFAULT_PRELOAD)
        assert {"cloudpickle", "google.cloud.storage"} <= set(launcher.preloaded)


@pytest.mark.anyio
class TestConcurrency:
    async def test_many_tasks_at_once(
        self, launcher: TaskLauncher, task_env: dict[str, str], tmp_path: Path
    ) -> None:
        count = 200
        codes: dict[int, int] = {}

        async def one(index: int) -> None:
            kind = "exec" if index % 20 == 0 else "forked"  # a few fresh interpreters too
            folder = tmp_path / str(index)
            folder.mkdir()
            task = await run_probe(
                launcher, folder, task_env, probe_argv(kind, "print", str(index))
            )
            codes[index] = await task.wait()

        with anyio.fail_after(TIMEOUT * 3):
            async with anyio.create_task_group() as group:
                for index in range(count):
                    group.start_soon(one, index)
        assert codes == dict.fromkeys(range(count), 0)
        for index in range(count):
            assert (tmp_path / str(index) / "out").read_text() == f"out {index}\n"


@pytest.mark.anyio
class TestLifecycle:
    async def test_start_before_enter_says_how_to_start(self, tmp_path: Path) -> None:
        with pytest.raises(TaskStartError, match="async with"):
            await TaskLauncher().start(
                ["true"], env={}, stdout=tmp_path / "o", stderr=tmp_path / "e"
            )

    async def test_exit_kills_running_tasks_and_their_children(
        self,
        server_env: None,
        reports: Reports,
        task_env: dict[str, str],
        tmp_path: Path,
        pidfds: list[int],
    ) -> None:
        tasks = []
        async with TaskLauncher(preload=()) as launcher:
            assert launcher.server_pid is not None
            pidfds.append(os.pidfd_open(launcher.server_pid))
            for kind in KINDS:
                folder = tmp_path / kind
                folder.mkdir()
                tasks.append(await run_probe(launcher, folder, task_env, probe_argv(kind, "hold")))
                seen = await reports.next()
                pidfds += [os.pidfd_open(seen["pid"]), os.pidfd_open(seen["grandchild"])]
        assert [await task.wait() for task in tasks] == [128 + signal.SIGKILL] * 2
        await wait_gone(pidfds)
        with pytest.raises(TaskStartError, match="closed"):
            await run_probe(launcher, tmp_path, task_env, ["true"])

    async def test_fork_server_death_ends_tasks_and_their_children(
        self,
        launcher: TaskLauncher,
        reports: Reports,
        task_env: dict[str, str],
        tmp_path: Path,
        pidfds: list[int],
    ) -> None:
        task = await run_probe(launcher, tmp_path, task_env, probe_argv("forked", "hold"))
        seen = await reports.next()
        pidfds += [os.pidfd_open(seen["pid"]), os.pidfd_open(seen["grandchild"])]
        assert launcher.server_pid is not None
        os.kill(launcher.server_pid, signal.SIGKILL)
        assert await task.wait() == 128 + signal.SIGKILL
        await wait_gone(pidfds)
        with pytest.raises(TaskStartError, match="fork server stopped"):
            await run_probe(launcher, tmp_path, task_env, ["true"])


HOLDER_SCRIPT = """
import sys, anyio
from pathlib import Path
from covalent_gcpbatch_array.local.batch.launcher import TaskLauncher

async def main(folder, env):
    async with TaskLauncher(preload=("probe_preload",)) as launcher:
        for kind, argv in (("forked", [sys.executable]), ("exec", ["env", sys.executable])):
            out = Path(folder) / kind
            await launcher.start([*argv, "-m", "probe_task", "hold"], env=env, stdout=out, stderr=out)
        print(launcher.server_pid, flush=True)
        await anyio.sleep_forever()

anyio.run(main, sys.argv[1], dict(arg.split("=", 1) for arg in sys.argv[2:]))
"""


@pytest.mark.anyio
class TestNoOrphans:
    async def test_sigkill_of_the_launcher_process_leaves_no_process_behind(
        self,
        server_env: None,
        reports: Reports,
        task_env: dict[str, str],
        tmp_path: Path,
        pidfds: list[int],
    ) -> None:
        env_args = [f"{key}={value}" for key, value in task_env.items()]
        command = [sys.executable, "-c", HOLDER_SCRIPT, str(tmp_path), *env_args]
        async with await anyio.open_process(command, stdin=None, stderr=None) as holder:
            assert holder.stdout is not None
            with anyio.fail_after(TIMEOUT):
                line = await holder.stdout.receive()
            pidfds.append(os.pidfd_open(int(line.split()[0])))  # the fork server
            for _ in KINDS:
                seen = await reports.next()
                pidfds += [os.pidfd_open(seen["pid"]), os.pidfd_open(seen["grandchild"])]
            assert all(is_running(fd) for fd in pidfds)
            holder.kill()
            assert await holder.wait() == -signal.SIGKILL
        await wait_gone(pidfds)


@pytest.mark.slow
@pytest.mark.anyio
class TestMeasurements:
    """Numbers for the report (printed with ``-s``); only correctness is asserted."""

    async def test_thousand_tiny_forked_tasks(
        self, launcher: TaskLauncher, task_env: dict[str, str], tmp_path: Path
    ) -> None:
        await launcher.wait_ready()
        count = 1000
        codes: list[int] = []

        async def one(index: int) -> None:
            out = tmp_path / f"{index}.out"
            task = await launcher.start(
                probe_argv("forked", "exit", "0"), env=task_env, stdout=out, stderr=out
            )
            codes.append(await task.wait())

        started = time.perf_counter()
        with anyio.fail_after(TIMEOUT * 5):
            async with anyio.create_task_group() as group:
                for index in range(count):
                    group.start_soon(one, index)
        elapsed = time.perf_counter() - started
        assert codes == [0] * count
        print(f"\n{count} forked tasks: {elapsed:.2f} s ({elapsed / count * 1000:.2f} ms each)")

    @pytest.mark.parametrize("kind", KINDS)
    async def test_start_latency(
        self, launcher: TaskLauncher, task_env: dict[str, str], tmp_path: Path, kind: str
    ) -> None:
        await launcher.wait_ready()
        latencies = []
        for attempt in range(10):
            out = tmp_path / f"{attempt}.out"
            before = time.monotonic()
            task = await launcher.start(
                probe_argv(kind, "first-line"), env=task_env, stdout=out, stderr=out
            )
            assert await task.wait() == 0
            latencies.append(float(out.read_text().split()[0]) - before)
        latencies.sort()
        print(f"\n{kind}: start -> first line median {latencies[5] * 1000:.1f} ms")
