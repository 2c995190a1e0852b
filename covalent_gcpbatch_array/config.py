"""Executor configuration: every key, its default, its validation, and the job shape.

A value comes from the executor's constructor, else from ``[executors.gcpbatch_array]`` in the
Covalent config file, else from :data:`DEFAULTS`. :class:`ExecutorConfig` holds the validated
result; :class:`JobShape` is the part of it that ends up in a Batch job, so electrons whose
shapes are equal may share one job.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from covalent_gcpbatch_array._core.catalogue import catalogue
from covalent_gcpbatch_array._core.contract import validate_prefix
from covalent_gcpbatch_array.exceptions import ConfigError

__all__ = ["DEFAULTS", "REQUIRED_KEYS", "ExecutorConfig", "JobShape", "resolve_config"]

_log = logging.getLogger(__name__)
#: The config key for each part of a shape the compute catalogue can fault.
_CATALOGUE_KEYS = {
    "region": "region",
    "zone": "region",
    "machine_type": "machine_type",
    "accelerator_type": "accelerator_type",
    "accelerator_count": "accelerator_count",
    "vcpus": "vcpus",
    "memory": "memory",
}
#: Batch's limits (cloud.google.com/batch/quotas, batch.proto).
MAX_TASKS_PER_JOB = 100_000
MAX_RETRY_COUNT = 10
#: The longest protobuf Duration (10,000 years), the most ``maxRunDuration`` can say.
MAX_TIME_LIMIT = 315_576_000_000
#: The shortest ``poll_freq``: one job's monitor makes at most ten GetJob calls a second.
MIN_POLL_FREQ = 0.1

#: Every key and its default. The first eleven are the original Google Batch plugin's.
DEFAULTS: dict[str, Any] = {
    "project_id": "",
    "region": "us-east1",
    "bucket_name": "",
    "container_image_uri": "",
    "service_account_email": "",
    "vcpus": 2,
    "memory": 256,
    "retries": 3,
    "time_limit": 300,
    "poll_freq": 5,
    "cache_dir": "/tmp/covalent",
    # Coalescing: see README "How coalescing works" for how these were chosen.
    "batch_window": 10.0,
    "batch_idle_gap": 2.0,
    "max_tasks_per_job": 1000,
    # Inside a Covalent server: flush a batch once its wave has joined (see docs/coalescing.md).
    "graph_aware": True,
    # Where the APIs are; empty means Google's own endpoints.
    "batch_api_endpoint": "",
    "storage_api_endpoint": "",
    # Job shape settings beyond the original plugin's.
    "machine_type": "",
    "provisioning_model": "STANDARD",
    "accelerator_type": "",
    "accelerator_count": 0,
    "boot_disk_size_gb": 0,
    "network": "",
    "subnetwork": "",
    "labels": {},
    "task_count_per_node": 0,
    "parallelism": 0,
    # Housekeeping.
    "bucket_prefix": "covalent-gcpbatch-array",
    "keep_objects": False,
    # Reliability: seconds a job may wait for its first task to start (0: no limit).
    "queue_timeout": 3600.0,
    # Seconds a job's tasks keep running after its executor stopped renewing the job's lease
    # (killed, or its machine lost); 0: they run to their end.
    "orphan_timeout": 600.0,
    # Seconds a closed batch waits for an input upload that is not done (Cloud Storage failing,
    # or a large input on a slow link); then that electron fails and the job is created for the
    # others. 0: as long as the upload takes.
    "upload_timeout": 60.0,
}

REQUIRED_KEYS = ("project_id", "bucket_name", "container_image_uri")

# Matched whole (fullmatch): a "$" would also match before a final newline.
_PROJECT_RE = re.compile(r"[a-z][a-z0-9-]{4,28}[a-z0-9]")
_REGION_RE = re.compile(r"[a-z]+-[a-z]+[0-9]+")
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")
_EMAIL_RE = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_LABEL_KEY_RE = re.compile(r"[a-z][a-z0-9_-]{0,62}")
_LABEL_VALUE_RE = re.compile(r"[a-z0-9_-]{0,63}")
_PROVISIONING_MODELS = ("STANDARD", "SPOT", "PREEMPTIBLE")


@dataclasses.dataclass(frozen=True)
class JobShape:
    """Everything that ends up in a Batch job. Equal shapes may share a job."""

    project_id: str
    region: str
    container_image_uri: str
    service_account_email: str
    vcpus: float
    memory: int
    retries: int
    time_limit: float
    machine_type: str
    provisioning_model: str
    accelerator_type: str
    accelerator_count: int
    boot_disk_size_gb: int
    network: str
    subnetwork: str
    labels: tuple[tuple[str, str], ...]  # sorted items, so the shape is hashable
    task_count_per_node: int
    parallelism: int
    orphan_timeout: float  # the tasks stop once the job's lease is this old (0: never)
    # Where inputs and results live and which API runs the job: part of the job too.
    bucket_name: str
    bucket_prefix: str
    batch_api_endpoint: str
    storage_api_endpoint: str


# Slots: 32 fields are more than CPython shares in one key table (30), so without them every
# config would carry a dict of its own (1.6 KB); with them, 0.3 KB.
@dataclasses.dataclass(frozen=True, slots=True)
class ExecutorConfig:
    """A complete, validated executor configuration.

    Built by :meth:`from_values`, which gives equal values the same object: Covalent makes an
    executor per electron, and thousands of pending electrons share one config. Treat it (and
    its ``labels``) as read-only.
    """

    project_id: str
    region: str
    bucket_name: str
    container_image_uri: str
    service_account_email: str
    vcpus: float
    memory: int
    retries: int
    time_limit: float
    poll_freq: float
    cache_dir: str
    batch_window: float
    batch_idle_gap: float
    max_tasks_per_job: int
    graph_aware: bool
    batch_api_endpoint: str
    storage_api_endpoint: str
    machine_type: str
    provisioning_model: str
    accelerator_type: str
    accelerator_count: int
    boot_disk_size_gb: int
    network: str
    subnetwork: str
    labels: dict[str, str]
    task_count_per_node: int
    parallelism: int
    bucket_prefix: str
    keep_objects: bool
    queue_timeout: float
    orphan_timeout: float
    upload_timeout: float

    @classmethod
    def from_values(cls, values: Mapping[str, Any], *, require: bool = True) -> ExecutorConfig:
        """Validate ``values`` (every key of :data:`DEFAULTS`) into a config.

        :param require: False lets the :data:`REQUIRED_KEYS` stay empty (every value given is
            still checked): Covalent's server builds each executor from its config file alone
            before it copies the client's attributes over it
        :raises ConfigError: naming the first key that is missing or invalid
        """
        try:
            key = _intern_key(values)
        except TypeError:  # an unhashable value: invalid, as validating it will say
            return cls._validated(values, require=require)
        return _interned(key, require)

    @classmethod
    def _validated(cls, values: Mapping[str, Any], *, require: bool) -> ExecutorConfig:
        unknown = sorted(set(values) - set(DEFAULTS))
        if unknown:
            raise ConfigError(unknown[0], f"unknown key; known keys are {', '.join(DEFAULTS)}")
        checked: dict[str, Any] = {}
        for key, default in DEFAULTS.items():
            value = values.get(key, default)
            left_empty = not require and key in REQUIRED_KEYS and value == ""
            checked[key] = value if left_empty else _VALIDATORS[key](key, value)
        config = cls(**checked)
        config._check_combinations()
        return config

    def _check_combinations(self) -> None:
        if self.accelerator_count and not self.accelerator_type:
            raise ConfigError(
                "accelerator_type",
                f"is empty but accelerator_count is {self.accelerator_count}",
                "set accelerator_type (e.g. 'nvidia-tesla-t4') or accelerator_count=0",
            )
        if self.accelerator_type and not self.accelerator_count:
            raise ConfigError(
                "accelerator_count",
                f"is 0 but accelerator_type is {self.accelerator_type!r}",
                "set accelerator_count to the number of accelerators per VM",
            )
        self._check_catalogue()

    def _check_catalogue(self) -> None:
        """Refuse a shape that certainly cannot exist; warn about one the catalogue doubts.

        Only certain problems (see :mod:`covalent_gcpbatch_array._core.catalogue`) raise: a
        fact that changes over time, or that the catalogue could not confirm, must never refuse
        a configuration Google would run, so it is logged, with the catalogue's source and date.
        """
        shapes = catalogue()
        source = (
            f"covalent_gcpbatch_array/_core/compute_catalogue.json, read {shapes.retrieved} "
            f"from Google's documentation"
        )
        for problem in shapes.problems(
            region=self.region,
            machine_type=self.machine_type,
            accelerator_type=self.accelerator_type,
            accelerator_count=self.accelerator_count,
            vcpus=self.vcpus,
            memory_mib=self.memory,
        ):
            key = _CATALOGUE_KEYS[problem.part]
            if problem.certain:
                raise ConfigError(
                    key,
                    problem.message,
                    f"set {key} to a value Google offers; the values known are in {source}",
                )
            _log.warning(
                "gcpbatch_array config key %r: %s. Not refused, as this may have changed "
                "since (source: %s); if Google's job fails at scheduling, change %s",
                key,
                problem.message,
                source,
                key,
            )

    @property
    def shape(self) -> JobShape:
        """The job shape: electrons with equal shapes may share a Batch job."""
        fields = {f.name for f in dataclasses.fields(JobShape)}
        values = {name: getattr(self, name) for name in fields}
        values["labels"] = tuple(sorted(self.labels.items()))
        return JobShape(**values)


#: Distinct configurations kept by :meth:`ExecutorConfig.from_values`.
INTERNED_CONFIGS = 256


def _intern_key(values: Mapping[str, Any]) -> tuple[tuple[str, type, Any], ...]:
    """``values`` as a hashable key; each value with its type, as ``1 == 1.0 == True``.

    :raises TypeError: a value (or a label) is unhashable
    """
    key = tuple(
        (name, type(value), _label_items(value) if name == "labels" else value)
        for name, value in values.items()
    )
    hash(key)
    return key


def _label_items(value: Any) -> Any:
    """The labels as a tuple of typed items (any other value as it is)."""
    if not isinstance(value, Mapping):
        return value
    return tuple((type(k), k, type(v), v) for k, v in value.items())


@functools.lru_cache(maxsize=INTERNED_CONFIGS)
def _interned(key: tuple[tuple[str, type, Any], ...], require: bool) -> ExecutorConfig:
    """The validated config of the values ``key`` holds (errors are raised, not kept)."""
    values = {
        name: {k: v for _, k, _, v in value}
        if name == "labels" and issubclass(kind, Mapping)
        else value
        for name, kind, value in key
    }
    return ExecutorConfig._validated(values, require=require)


def resolve_config(
    explicit: Mapping[str, Any], read_config_file: Callable[[str], Any]
) -> dict[str, Any]:
    """Merge constructor values over the Covalent config file over the defaults.

    :param explicit: constructor arguments; ``None`` means "not given"
    :param read_config_file: looks a key up in ``[executors.gcpbatch_array]``, raising
        ``KeyError`` when it is absent
    :returns: a value for every key of :data:`DEFAULTS` (not yet validated)
    """
    values: dict[str, Any] = {}
    for key, default in DEFAULTS.items():
        value = explicit.get(key)
        if value is None:
            try:
                value = read_config_file(key)
            except KeyError:
                value = default
        values[key] = value
    return values


# Validators: each takes (key, value) and returns the normalised value or raises ConfigError.


def _text(pattern: re.Pattern[str] | None = None, *, required: bool = False, what: str = ""):
    def check(key: str, value: Any) -> str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {type(value).__name__} {value!r}")
        if not value:
            if required:
                raise ConfigError(key, "is required and was not set")
            return value
        if pattern is not None and not pattern.fullmatch(value):
            raise ConfigError(key, f"{value!r} is not a valid {what or key}")
        return value

    return check


def _number(
    kind: type, *, minimum: float, maximum: float = math.inf, exclusive_min: bool = False
) -> Callable[[str, Any], Any]:
    def check(key: str, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"must be a number, got {type(value).__name__} {value!r}")
        if kind is int and value != int(value):
            raise ConfigError(key, f"must be a whole number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(key, f"must be finite, got {value!r}")
        too_low = value <= minimum if exclusive_min else value < minimum
        if too_low or value > maximum:
            low = f"greater than {minimum:g}" if exclusive_min else f"at least {minimum:g}"
            high = "" if math.isinf(maximum) else f" and at most {maximum:g}"
            raise ConfigError(key, f"must be {low}{high}, got {value!r}")
        return kind(value)

    return check


def _endpoint(key: str, value: Any) -> str:
    value = _text()(key, value)
    if value and not value.startswith(("http://", "https://")):
        raise ConfigError(
            key, f"{value!r} must start with http:// or https://, or be empty for Google's own"
        )
    return value.rstrip("/")


def _provisioning_model(key: str, value: Any) -> str:
    value = _text(required=True)(key, value).upper()
    if value not in _PROVISIONING_MODELS:
        raise ConfigError(key, f"{value!r} is not one of {', '.join(_PROVISIONING_MODELS)}")
    return value


def _labels(key: str, value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"must be a mapping of label names to values, got {value!r}")
    if len(value) > 60:
        raise ConfigError(key, f"has {len(value)} labels; at most 60 (Batch adds its own)")
    for name, text in value.items():
        if not isinstance(name, str) or not _LABEL_KEY_RE.fullmatch(name):
            raise ConfigError(key, f"label name {name!r} must match {_LABEL_KEY_RE.pattern}")
        if not isinstance(text, str) or not _LABEL_VALUE_RE.fullmatch(text):
            raise ConfigError(
                key, f"label {name!r} value {text!r} must match {_LABEL_VALUE_RE.pattern}"
            )
    return dict(value)


def _prefix(key: str, value: Any) -> str:
    value = _text(required=True)(key, value)
    try:
        return validate_prefix(value)
    except ValueError as exc:
        raise ConfigError(key, f"{value!r} is not a valid object prefix: {exc}") from None


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be true or false, got {value!r}")
    return value


_VALIDATORS: dict[str, Callable[[str, Any], Any]] = {
    "project_id": _text(_PROJECT_RE, required=True, what="Google Cloud project id"),
    "region": _text(_REGION_RE, required=True, what="Google Cloud region (e.g. us-east1)"),
    "bucket_name": _text(_BUCKET_RE, required=True, what="Cloud Storage bucket name"),
    "container_image_uri": _text(required=True),
    "service_account_email": _text(_EMAIL_RE, what="service account email"),
    "vcpus": _number(float, minimum=0, exclusive_min=True, maximum=416),
    "memory": _number(int, minimum=1),
    "retries": _number(int, minimum=0, maximum=MAX_RETRY_COUNT),
    "time_limit": _number(float, minimum=0, exclusive_min=True, maximum=MAX_TIME_LIMIT),
    "poll_freq": _number(float, minimum=MIN_POLL_FREQ),
    "cache_dir": _text(required=True),
    "batch_window": _number(float, minimum=0),
    "batch_idle_gap": _number(float, minimum=0),
    "max_tasks_per_job": _number(int, minimum=1, maximum=MAX_TASKS_PER_JOB),
    "graph_aware": _flag,
    "batch_api_endpoint": _endpoint,
    "storage_api_endpoint": _endpoint,
    "machine_type": _text(),
    "provisioning_model": _provisioning_model,
    "accelerator_type": _text(),
    "accelerator_count": _number(int, minimum=0),
    "boot_disk_size_gb": _number(int, minimum=0),
    "network": _text(),
    "subnetwork": _text(),
    "labels": _labels,
    "task_count_per_node": _number(int, minimum=0),
    "parallelism": _number(int, minimum=0, maximum=5000),
    "bucket_prefix": _prefix,
    "keep_objects": _flag,
    "queue_timeout": _number(float, minimum=0),
    "orphan_timeout": _number(float, minimum=0),
    "upload_timeout": _number(float, minimum=0),
}
