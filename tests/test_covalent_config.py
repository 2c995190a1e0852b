"""Writing and putting back ``[executors.gcpbatch_array]`` in a Covalent config file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import toml

from covalent_gcpbatch_array.cli.covalent_config import (
    default_config_file,
    read_executor_config,
    restore_executor_config,
    write_executor_config,
)
from covalent_gcpbatch_array.config import DEFAULTS
from covalent_gcpbatch_array.exceptions import LocalCloudError

LOCAL = {
    "project_id": "local-project",
    "batch_api_endpoint": "http://127.0.0.1:1234",
    "storage_api_endpoint": "http://127.0.0.1:5678",
}

USER_FILE = """\
[sdk]
log_level = "warning"

[executors.local]
workdir = "/somewhere"

[executors.gcpbatch_array]
project_id = "my-project"
poll_freq = 7
labels = { team = "science" }
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "covalent" / "covalent.conf"
    path.parent.mkdir()
    path.write_text(USER_FILE)
    return path


class TestDefaultConfigFile:
    def test_follows_covalents_rule(self) -> None:
        home = {"HOME": "/home/u"}
        assert default_config_file(home) == Path("/home/u/.config/covalent/covalent.conf")
        assert default_config_file(home | {"XDG_CONFIG_DIR": "/x"}) == Path("/x/covalent.conf")
        both = home | {"XDG_CONFIG_DIR": "/x", "COVALENT_CONFIG_DIR": "/c"}
        assert default_config_file(both) == Path("/c/covalent.conf")

    def test_is_the_file_covalent_itself_uses(self, tmp_path: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("COVALENT_", "XDG_"))}
        env["HOME"] = str(tmp_path)
        code = "from covalent._shared_files.config import get_config; print(get_config('sdk.config_file'))"
        printed = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        ).stdout.strip()
        assert Path(printed) == default_config_file(env)


class TestWriteAndRestore:
    def test_write_sets_keys_and_keeps_everything_else(self, config_file: Path) -> None:
        backup = write_executor_config(config_file, LOCAL)

        document = toml.loads(config_file.read_text())
        assert document["executors"]["gcpbatch_array"] == LOCAL | {
            "poll_freq": 7,
            "labels": {"team": "science"},
        }
        assert document["sdk"] == {"log_level": "warning"}
        assert document["executors"]["local"] == {"workdir": "/somewhere"}
        assert backup.previous == {"project_id": "my-project"}
        assert not backup.created

    def test_restore_puts_back_previous_values_and_defaults(self, config_file: Path) -> None:
        backup = write_executor_config(config_file, LOCAL)

        assert restore_executor_config(backup) == []
        section = read_executor_config(config_file)
        assert section is not None
        assert section["project_id"] == "my-project"
        assert section["poll_freq"] == 7
        # Absent before: the plugin's default, which Covalent would write there itself.
        assert section["batch_api_endpoint"] == DEFAULTS["batch_api_endpoint"] == ""
        assert section["storage_api_endpoint"] == ""
        assert toml.loads(config_file.read_text())["executors"]["local"] == {
            "workdir": "/somewhere"
        }

    def test_restore_leaves_keys_someone_changed_meanwhile(self, config_file: Path) -> None:
        backup = write_executor_config(config_file, LOCAL)
        write_executor_config(config_file, {"batch_api_endpoint": "https://batch.example"})

        assert restore_executor_config(backup) == ["batch_api_endpoint"]
        section = read_executor_config(config_file)
        assert section is not None
        assert section["batch_api_endpoint"] == "https://batch.example"
        assert section["project_id"] == "my-project"

    def test_a_file_we_created_and_nobody_touched_is_removed(self, tmp_path: Path) -> None:
        path = tmp_path / "new" / "covalent.conf"
        backup = write_executor_config(path, LOCAL)
        assert backup.created
        assert read_executor_config(path) == LOCAL

        restore_executor_config(backup)
        assert not path.exists()

    def test_a_file_we_created_that_covalent_filled_is_kept(self, tmp_path: Path) -> None:
        path = tmp_path / "covalent.conf"
        backup = write_executor_config(path, LOCAL)
        # A covalent process imported meanwhile adds its own tables and the plugin's defaults.
        document = toml.loads(path.read_text())
        document["sdk"] = {"log_level": "warning"}
        document["executors"]["gcpbatch_array"]["retries"] = 3
        path.write_text(toml.dumps(document))

        restore_executor_config(backup)
        section = read_executor_config(path)
        assert section is not None
        assert section["project_id"] == "" and section["retries"] == 3

    def test_restore_after_the_file_is_gone_does_nothing(self, config_file: Path) -> None:
        backup = write_executor_config(config_file, LOCAL)
        config_file.unlink()
        assert restore_executor_config(backup) == []
        assert not config_file.exists()

    def test_mode_of_an_existing_file_is_kept(self, config_file: Path) -> None:
        config_file.chmod(0o600)
        write_executor_config(config_file, LOCAL)
        assert config_file.stat().st_mode & 0o777 == 0o600


class TestErrors:
    def test_invalid_toml_names_the_file_and_the_fix(self, tmp_path: Path) -> None:
        path = tmp_path / "covalent.conf"
        path.write_text("[executors\nbroken = ")
        with pytest.raises(LocalCloudError, match="not valid TOML") as info:
            write_executor_config(path, LOCAL)
        assert str(path) in str(info.value)
        assert path.read_text() == "[executors\nbroken = "

    def test_read_of_a_missing_file_or_section_is_none(self, tmp_path: Path) -> None:
        assert read_executor_config(tmp_path / "nothing.conf") is None
        other = tmp_path / "other.conf"
        other.write_text('[sdk]\nlog_level = "warning"\n')
        assert read_executor_config(other) is None
