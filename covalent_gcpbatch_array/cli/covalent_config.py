"""The ``[executors.gcpbatch_array]`` table of a Covalent config file: write it, then put it back.

``gcpbatch-array local up`` points the executor at the local cloud by writing its endpoints,
project, bucket and image into the user's Covalent config, and restores the previous values
when it stops. The private Covalent server of tests and the demo uses the same functions on its
own config file.

Covalent rewrites its whole config file often (every process that imports covalent merges the
file into its defaults and writes it back), so a restore puts back *keys*, not the file: each
key we wrote that still holds our value gets its previous value again; a key someone changed
since is left alone. A key that was absent before gets the plugin's default, which is what
Covalent itself writes there (a running server that still holds our value in memory would
write a deleted key back; a default it reads like any other change).

We read and write with the ``toml`` package and lock ``<file>.lock``, as Covalent does.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock
import toml

from covalent_gcpbatch_array.config import DEFAULTS
from covalent_gcpbatch_array.exceptions import LocalCloudError

__all__ = [
    "ConfigBackup",
    "default_config_file",
    "read_executor_config",
    "restore_executor_config",
    "write_executor_config",
]

SECTION = "gcpbatch_array"  # the executor's short name: [executors.gcpbatch_array]
_LOCK_TIMEOUT = 10.0  # seconds to wait for Covalent's lock on the file


@dataclass(frozen=True)
class ConfigBackup:
    """What :func:`write_executor_config` replaced, so that it can be put back."""

    config_file: Path  # the file that was changed
    created: bool  # the file did not exist before: restore removes it if nothing else is left
    previous: dict[str, Any]  # the keys we overwrote, with the values they had
    written: dict[str, Any]  # every key we wrote, with the value we wrote


def default_config_file(environ: Mapping[str, str] | None = None) -> Path:
    """The Covalent config file a ``covalent`` command would use in ``environ``.

    Covalent 0.240's rule: ``$COVALENT_CONFIG_DIR``, else ``$XDG_CONFIG_DIR``, else
    ``$HOME/.config/covalent``; the file in it is ``covalent.conf``.
    """
    env = os.environ if environ is None else environ
    folder = (
        env.get("COVALENT_CONFIG_DIR")
        or env.get("XDG_CONFIG_DIR")
        or os.path.join(env.get("HOME") or str(Path.home()), ".config", "covalent")
    )
    return Path(folder) / "covalent.conf"


def read_executor_config(config_file: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``[executors.gcpbatch_array]`` table of ``config_file`` (``None`` if absent).

    :raises LocalCloudError: the file exists but is not valid TOML
    """
    section = _load(Path(config_file)).get("executors", {}).get(SECTION)
    return dict(section) if isinstance(section, dict) else None


def write_executor_config(
    config_file: str | os.PathLike[str], values: Mapping[str, Any]
) -> ConfigBackup:
    """Set ``values`` in ``[executors.gcpbatch_array]``, keeping every other key and table.

    The file and its folder are created if needed.

    :returns: what to hand to :func:`restore_executor_config`
    :raises LocalCloudError: the file is not valid TOML, or is locked for too long
    """
    path = Path(config_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        created = not path.exists()
        document = _load(path)
        section = document.setdefault("executors", {}).setdefault(SECTION, {})
        previous = {key: section[key] for key in values if key in section}
        section.update(values)
        _dump(path, document)
    return ConfigBackup(path, created, previous, dict(values))


def restore_executor_config(backup: ConfigBackup) -> list[str]:
    """Put back what :func:`write_executor_config` replaced.

    A key still holding the value we wrote gets its previous value, or the plugin's default if
    it had none; a key changed since by someone else keeps its new value. A file we created
    that still holds nothing but our values is removed.

    :returns: the keys left alone because they had changed, sorted
    :raises LocalCloudError: the file is not valid TOML, or is locked for too long
    """
    path = backup.config_file
    if not path.exists():
        return []
    with _locked(path):
        document = _load(path)
        section = document.get("executors", {}).get(SECTION)
        if not isinstance(section, dict):
            return []
        changed = sorted(
            key for key, ours in backup.written.items() if key in section and section[key] != ours
        )
        only_ours = document == {"executors": {SECTION: section}} and set(section) <= set(
            backup.written
        )
        if backup.created and only_ours and not changed:
            path.unlink()
            return []
        for key in backup.written:
            if key not in section or key in changed:
                continue
            if key in backup.previous:
                section[key] = backup.previous[key]
            elif key in DEFAULTS:
                section[key] = DEFAULTS[key]
            else:
                del section[key]
        _dump(path, document)
    return changed


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold Covalent's lock on ``path`` (``<path>.lock``, as its ConfigManager takes it)."""
    lock = filelock.FileLock(f"{path}.lock", timeout=_LOCK_TIMEOUT)
    try:
        lock.acquire()
    except filelock.Timeout as exc:
        raise LocalCloudError(
            f"{path}.lock was held for over {_LOCK_TIMEOUT:.0f} s; if no covalent process is "
            "running, remove the lock file"
        ) from exc
    try:
        yield
    finally:
        lock.release()


def _load(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    try:
        document: dict[str, Any] = toml.loads(text)
    except toml.TomlDecodeError as exc:
        raise LocalCloudError(
            f"the Covalent config file {path} is not valid TOML ({exc}); fix or remove it "
            "(Covalent writes a fresh one when it starts)"
        ) from exc
    return document


def _dump(path: Path, document: Mapping[str, Any]) -> None:
    # Write a sibling file and rename it over the old one: a reader never sees half a file.
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w") as file:
            toml.dump(document, file)
        # mkstemp makes 0600 files; keep the old file's mode, or Covalent's usual 0644.
        os.chmod(temporary, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
