"""The ``gcpbatch-array`` command: ``local up``, ``local demo`` and ``demo``, run as real processes.

Every process gets a Covalent config folder of its own (``COVALENT_CONFIG_DIR``), so ``local up``
never writes the config of the user running the tests.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from covalent_gcpbatch_array.cli.main import build_parser, main
from tests.polling import wait_until

CLI = [sys.executable, "-m", "covalent_gcpbatch_array.cli.main"]


def read_until(process: subprocess.Popen[bytes], marker: str, timeout: float = 120.0) -> str:
    """Read ``process``'s stdout until ``marker`` appears; fail with what came if it does not."""
    stdout = process.stdout
    assert stdout is not None
    received = bytearray()
    with selectors.DefaultSelector() as selector:
        selector.register(stdout, selectors.EVENT_READ)

        def arrived() -> bool:
            if selector.select(0.1):
                chunk = os.read(stdout.fileno(), 65536)
                assert chunk, f"stdout closed before {marker!r}; got {bytes(received)!r}"
                received.extend(chunk)
            return marker.encode() in received

        def seen() -> str:
            return f"{marker!r} on stdout; got {bytes(received)!r}"

        wait_until(arrived, what=seen, timeout=timeout, interval=0)
    return received.decode()


def children_of(pid: int) -> set[int]:
    pids: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        pids.update(int(child) for child in (task / "children").read_text().split())
    return pids


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


@pytest.fixture
def covalent_config_dir(tmp_path: Path) -> Path:
    """The Covalent config folder of the CLI processes of one test."""
    return tmp_path / "covalent-config"


@pytest.fixture
def start_cli(covalent_config_dir: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start ``gcpbatch-array ARGS`` as a process; kill whatever is left at the end."""
    started: list[subprocess.Popen[bytes]] = []
    env = os.environ | {"COVALENT_CONFIG_DIR": str(covalent_config_dir)}

    def start(*args: str) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
        process.communicate()


class TestParser:
    def test_console_script_help_lists_the_commands(self) -> None:
        script = Path(sys.executable).with_name("gcpbatch-array")
        assert script.exists(), "the console script is missing: pip install -e ."
        out = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True)
        assert "local" in out.stdout
        assert "demo" in out.stdout

    def test_local_up_options(self) -> None:
        args = build_parser().parse_args(
            ["local", "up", "--provisioning-delay", "1.5", "--max-running-tasks", "4",
             "--jobs-per-minute", "10"]
        )  # fmt: skip
        assert (args.provisioning_delay, args.max_running_tasks, args.jobs_per_minute) == (
            1.5,
            4,
            10,
        )
        defaults = build_parser().parse_args(["local", "up"])
        assert (defaults.provisioning_delay, defaults.max_running_tasks) == (0.0, None)
        assert defaults.jobs_per_minute is None
        assert defaults.preload is None
        assert (defaults.covalent_config, defaults.keep_config) == (None, False)
        assert defaults.no_covalent_config is False
        # The emulator's other knobs reach LocalCloud only when given (its defaults otherwise).
        assert not {"deletion_delay", "tasks_hidden_until_provisioned"} & set(vars(defaults))
        knobs = build_parser().parse_args(
            ["local", "up", "--cancellation-delay", "0", "--generic-task-logs"]
        )
        assert (knobs.cancellation_delay, knobs.log_resource_type) == (0.0, "generic_task")

    @pytest.mark.parametrize(
        ("argv", "message"),
        [
            (["local", "up", "--max-running-tasks", "0"], "must be >= 1"),
            (["local", "up", "--provisioning-delay", "-1"], "must be >= 0"),
            (["local", "up", "--jobs-per-minute", "many"], "expected a whole number"),
            (["local", "up", "--keep-config", "--no-covalent-config"], "not allowed with"),
            (["local"], "ACTION"),
            ([], "COMMAND"),
        ],
    )
    def test_bad_arguments_exit_2_with_a_message(
        self, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


class TestLocalUp:
    def test_prints_endpoints_and_stops_on_sigterm(
        self,
        start_cli: Callable[..., subprocess.Popen[bytes]],
        wait_process_gone: Callable[[int], bool],
        covalent_config_dir: Path,
    ) -> None:
        tomllib = pytest.importorskip("tomllib")  # Python 3.11+
        config_file = covalent_config_dir / "covalent.conf"
        covalent_config_dir.mkdir()
        config_file.write_text(
            '[sdk]\nlog_level = "warning"\n\n'
            '[executors.gcpbatch_array]\nproject_id = "my-project"\npoll_freq = 7\n'
        )
        process = start_cli("local", "up", "--max-running-tasks", "3")
        text = read_until(process, "Press Ctrl-C to stop.")
        table_start = text.index("[executors.gcpbatch_array]")
        toml_text = text[table_start : text.index("\n\n", table_start)]
        settings = tomllib.loads(toml_text)["executors"]["gcpbatch_array"]
        assert f"[executors.gcpbatch_array] in {config_file} points at this cloud" in text
        # (Processes that import covalent, such as the emulator's fork server, add defaults.)
        written = tomllib.loads(config_file.read_text())
        section = written["executors"]["gcpbatch_array"]
        assert {key: section[key] for key in settings} == settings
        assert section["poll_freq"] == 7
        assert written["sdk"]["log_level"] == "warning"
        assert settings["project_id"] == "local-project"
        assert settings["region"] == "us-east1"
        assert settings["bucket_name"] == "covalent-local"
        assert settings["container_image_uri"] == "local/covalent-gcpbatch-array-runner:latest"
        batch, storage = settings["batch_api_endpoint"], settings["storage_api_endpoint"]
        assert f"export STORAGE_EMULATOR_HOST={storage}" in text
        assert batch in text
        grpc_endpoint = re.search(r"Batch over gRPC +(\S+)", text)
        assert grpc_endpoint is not None, text
        host, port = grpc_endpoint[1].rsplit(":", 1)
        socket.create_connection((host, int(port)), timeout=5).close()  # it listens
        with urllib.request.urlopen(f"{batch}/_emulator/settings", timeout=5) as response:
            assert json.load(response)["max_running_tasks"] == 3
        assert answers(f"{storage}/storage/v1/b/covalent-local")
        servers = children_of(process.pid)
        assert len(servers) == 3  # the Batch emulator, fake-gcs-server and the GCS proxy

        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr.decode()
        assert b"Stopped." in stderr
        assert all(wait_process_gone(pid) for pid in servers)
        assert not answers(f"{batch}/_emulator/stats")
        assert not answers(f"{storage}/storage/v1/b")
        # Keys that were there get their values back; the others get the plugin's defaults.
        restored = tomllib.loads(config_file.read_text())["executors"]["gcpbatch_array"]
        assert restored["project_id"] == "my-project"
        assert restored["poll_freq"] == 7
        assert restored["batch_api_endpoint"] == restored["storage_api_endpoint"] == ""
        assert restored["bucket_name"] == restored["container_image_uri"] == ""

    def test_json_output_and_ctrl_c_keeping_the_config(
        self,
        start_cli: Callable[..., subprocess.Popen[bytes]],
        wait_process_gone: Callable[[int], bool],
        tmp_path: Path,
    ) -> None:
        tomllib = pytest.importorskip("tomllib")  # Python 3.11+
        config_file = tmp_path / "elsewhere" / "covalent.conf"
        process = start_cli(
            "local", "up", "--json", "--provisioning-delay", "0.5", "--preload", "",
            "--covalent-config", str(config_file), "--keep-config",
            "--deletion-delay", "0", "--tasks-hidden-until-provisioned",
        )  # fmt: skip
        ready = json.loads(read_until(process, "\n"))
        assert ready["covalent_config"] == str(config_file)
        assert ready["executor_config"]["batch_api_endpoint"] == ready["batch_endpoint"]
        assert ready["environment"] == {"STORAGE_EMULATOR_HOST": ready["storage_endpoint"]}
        assert ready["batch_grpc_endpoint"].startswith("127.0.0.1:")
        url = f"{ready['batch_endpoint']}/_emulator/settings"
        with urllib.request.urlopen(url, timeout=5) as response:
            settings = json.load(response)
        assert settings["provisioning_delay"] == 0.5
        assert (settings["deletion_delay"], settings["cancellation_delay"]) == (0, 2)
        assert settings["tasks_hidden_until_provisioned"] is True
        servers = children_of(process.pid)

        process.send_signal(signal.SIGINT)
        process.communicate(timeout=60)
        assert process.returncode == 0
        assert all(wait_process_gone(pid) for pid in servers)
        kept = tomllib.loads(config_file.read_text())["executors"]["gcpbatch_array"]
        assert kept == ready["executor_config"]

    def test_exits_1_when_a_server_dies(
        self, start_cli: Callable[..., subprocess.Popen[bytes]], covalent_config_dir: Path
    ) -> None:
        process = start_cli("local", "up", "--json", "--preload", "", "--no-covalent-config")
        ready = json.loads(read_until(process, "\n"))
        assert ready["covalent_config"] is None
        assert not covalent_config_dir.exists()
        # storage_endpoint is the GCS proxy's; fake-gcs-server is the child running its binary.
        gcs_pid = next(
            pid
            for pid in children_of(process.pid)
            if b"fake-gcs-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
        )
        os.kill(gcs_pid, signal.SIGKILL)
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 1
        assert b"stopped unexpectedly" in stderr


class TestLocalDemo:
    @pytest.mark.slow
    def test_demo_runs_an_array_job_and_exits_0(self) -> None:
        result = subprocess.run(
            [*CLI, "local", "demo", "--tasks", "5"], capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stdout + result.stderr
        for index in range(5):
            assert f"demo/{index}.txt: hello from task {index} of 5" in result.stdout
        assert "SUCCEEDED" in result.stdout
        assert "exit code 50001" in result.stdout
        assert "CreateJob 1" in result.stdout
        assert result.stdout.rstrip().endswith("Demo OK.")

    def test_demo_refuses_a_single_task(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["local", "demo", "--tasks", "1"]) == 2
        assert "at least 2" in capsys.readouterr().err


class TestCovalentDeployOptions:
    """What Covalent 0.240 answers to a misspelt option, as docs/troubleshooting.md quotes it."""

    DOCS = Path(__file__).parent.parent / "docs" / "troubleshooting.md"

    def deploy_up(self, tmp_path: Path, *options: str) -> subprocess.CompletedProcess[str]:
        # --help: Covalent checks the options, prints the settings and stops before Terraform.
        covalent = Path(sys.executable).parent / "covalent"
        return subprocess.run(
            [str(covalent), "deploy", "up", "gcpbatch_array", *options, "--help"],
            capture_output=True,
            text=True,
            env={**os.environ, "COVALENT_CONFIG_DIR": str(tmp_path), "HOME": str(tmp_path)},
            timeout=120,
            check=False,
        )

    def test_a_dash_in_project_id_leaves_it_unset(self, tmp_path: Path) -> None:
        result = self.deploy_up(tmp_path, "--project-id=my-project-1")
        output = result.stdout + result.stderr
        assert (
            "1 validation error for ExecutorInfraDefaults\nproject_id\n  Field required" in output
        )
        assert "`project_id  Field required`" in self.DOCS.read_text()

    def test_a_dash_in_another_option_is_no_such_option(self, tmp_path: Path) -> None:
        result = self.deploy_up(tmp_path, "--project_id=my-project-1", "--bucket-name=b")
        assert result.returncode == 1
        message = "No such option 'bucket-name'. Use --help for available options"
        assert message in result.stdout + result.stderr
        assert f"`{message}`" in self.DOCS.read_text().replace("\n", " ")
