"""Configuration: precedence, defaults, validation messages and the job shape."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from covalent_gcpbatch_array.config import (
    DEFAULTS,
    REQUIRED_KEYS,
    ExecutorConfig,
    JobShape,
    resolve_config,
)
from covalent_gcpbatch_array.exceptions import ConfigError

VALID = {
    "project_id": "my-project",
    "bucket_name": "my-bucket",
    "container_image_uri": "us-docker.pkg.dev/my-project/covalent/runner:0.240.0",
}


def config(**overrides: Any) -> ExecutorConfig:
    return ExecutorConfig.from_values(dict(DEFAULTS, **VALID) | overrides)


class TestDefaults:
    def test_original_plugin_keys_keep_their_defaults(self) -> None:
        original = {
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
        }
        assert {key: DEFAULTS[key] for key in original} == original

    def test_every_field_has_a_default_and_a_validator(self) -> None:
        fields = {field.name for field in dataclasses.fields(ExecutorConfig)}
        assert fields == set(DEFAULTS)


class TestPrecedence:
    def test_constructor_over_config_file_over_default(self) -> None:
        file = {"vcpus": 4, "memory": 1024}
        values = resolve_config({"vcpus": 8, "retries": None}, lambda key: file[key])
        assert values["vcpus"] == 8  # constructor wins
        assert values["memory"] == 1024  # then the config file
        assert values["retries"] == 3  # then the default (None means "not given")

    def test_zero_is_a_value_not_absence(self) -> None:
        # The original plugin's `retries or default` turned retries=0 into 3.
        values = resolve_config({"retries": 0}, lambda key: {"retries": 5}[key])
        assert values["retries"] == 0
        assert config(retries=0).retries == 0


class TestValidation:
    @pytest.mark.parametrize("key", REQUIRED_KEYS)
    def test_missing_required_key_names_it_and_both_ways_to_set_it(self, key: str) -> None:
        with pytest.raises(ConfigError) as info:
            config(**{key: ""})
        message = str(info.value)
        assert repr(key) in message
        assert "is required" in message
        assert "GCPBatchArrayExecutor(" in message
        assert "[executors.gcpbatch_array]" in message
        assert info.value.key == key

    @pytest.mark.parametrize(
        ("key", "value", "expected"),
        [
            ("vcpus", 0, "greater than 0"),
            ("vcpus", "two", "must be a number"),
            ("memory", 1.5, "whole number"),
            ("retries", 11, "at most 10"),
            ("retries", -1, "at least 0"),
            ("retries", True, "must be a number"),
            ("time_limit", 0, "greater than 0"),
            ("poll_freq", float("inf"), "finite"),
            ("batch_window", -1, "at least 0"),
            ("max_tasks_per_job", 100_001, "at most 100000"),
            ("max_tasks_per_job", 0, "at least 1"),
            ("project_id", "My_Project", "not a valid Google Cloud project id"),
            ("region", "us east", "not a valid Google Cloud region"),
            ("bucket_name", "Bad Bucket", "not a valid Cloud Storage bucket name"),
            ("service_account_email", "nobody", "not a valid service account email"),
            ("batch_api_endpoint", "localhost:8080", "must start with http://"),
            ("provisioning_model", "cheap", "not one of STANDARD, SPOT, PREEMPTIBLE"),
            ("labels", {"Team": "a"}, "label name 'Team'"),
            ("labels", {"team": "A B"}, "value 'A B'"),
            ("labels", ["team"], "must be a mapping"),
            ("keep_objects", "yes", "true or false"),
            ("bucket_prefix", "../escape", "not a valid object prefix"),
            ("parallelism", 5001, "at most 5000"),
            ("queue_timeout", -1, "at least 0"),
            ("queue_timeout", "1h", "must be a number"),
        ],
    )
    def test_bad_value_names_key_and_problem(self, key: str, value: Any, expected: str) -> None:
        with pytest.raises(ConfigError, match=expected) as info:
            config(**{key: value})
        assert info.value.key == key
        assert f"{key!r}" in str(info.value)

    def test_unknown_key_is_rejected_with_the_known_keys(self) -> None:
        with pytest.raises(ConfigError, match="unknown key; known keys are project_id"):
            ExecutorConfig.from_values(dict(DEFAULTS, **VALID, vpcus=4))

    def test_accelerator_type_and_count_go_together(self) -> None:
        with pytest.raises(ConfigError, match="accelerator_type"):
            config(accelerator_count=1)
        with pytest.raises(ConfigError, match="accelerator_count"):
            config(accelerator_type="nvidia-tesla-t4")
        assert (
            config(accelerator_type="nvidia-tesla-t4", accelerator_count=2).accelerator_count == 2
        )

    def test_values_are_normalised(self) -> None:
        c = config(vcpus=4, provisioning_model="spot", batch_api_endpoint="http://127.0.0.1:9/")
        assert isinstance(c.vcpus, float)
        assert c.provisioning_model == "SPOT"
        assert c.batch_api_endpoint == "http://127.0.0.1:9"

    def test_queue_timeout_zero_means_no_limit(self) -> None:
        assert config(queue_timeout=0).queue_timeout == 0
        assert DEFAULTS["queue_timeout"] == 3600.0

    def test_config_error_pickles(self) -> None:
        import pickle

        error = pickle.loads(pickle.dumps(ConfigError("vcpus", "must be a number")))
        assert error.key == "vcpus"
        assert "must be a number" in str(error)


class TestJobShape:
    def test_equal_configs_have_equal_hashable_shapes(self) -> None:
        a = config(labels={"team": "a", "env": "dev"})
        b = config(labels={"env": "dev", "team": "a"}, poll_freq=1, cache_dir="/elsewhere")
        assert a.shape == b.shape
        assert hash(a.shape) == hash(b.shape)

    @pytest.mark.parametrize(
        ("key", "value"),
        [
            ("vcpus", 4),
            ("memory", 512),
            ("retries", 0),
            ("time_limit", 60),
            ("container_image_uri", "other"),
            ("provisioning_model", "SPOT"),
            ("labels", {"team": "b"}),
            ("bucket_name", "other-bucket"),
            ("batch_api_endpoint", "http://127.0.0.1:1"),
        ],
    )
    def test_any_job_setting_changes_the_shape(self, key: str, value: Any) -> None:
        assert config().shape != config(**{key: value}).shape

    def test_shape_holds_only_job_settings(self) -> None:
        shape_fields = {field.name for field in dataclasses.fields(JobShape)}
        assert not shape_fields & {
            "poll_freq",
            "cache_dir",
            "keep_objects",
            "batch_window",
            "queue_timeout",
        }


class TestCrashSafetyBounds:
    """Values that passed validation but failed later (issue 12)."""

    @pytest.mark.parametrize(
        "key",
        ["project_id", "region", "bucket_name", "service_account_email", "bucket_prefix"],
    )
    def test_a_trailing_newline_is_refused(self, key: str) -> None:
        good = {"region": "us-east1", "service_account_email": "a@b.iam", "bucket_prefix": "p"}
        value = good.get(key, VALID.get(key, "")) + "\n"
        with pytest.raises(ConfigError, match=key):
            config(**{key: value})

    @pytest.mark.parametrize("labels", [{"team\n": "a"}, {"team": "a\n"}])
    def test_a_label_with_a_trailing_newline_is_refused(self, labels: dict[str, str]) -> None:
        with pytest.raises(ConfigError, match="labels"):
            config(labels=labels)

    def test_the_prefix_leaves_room_for_the_object_names(self) -> None:
        assert config(bucket_prefix="p" * 900).bucket_prefix == "p" * 900
        with pytest.raises(ConfigError, match="at most 900"):
            config(bucket_prefix="p" * 901)

    def test_poll_freq_has_a_floor(self) -> None:
        assert config(poll_freq=0.1).poll_freq == 0.1
        for value in (0.01, 1e-6):
            with pytest.raises(ConfigError, match=r"at least 0\.1"):
                config(poll_freq=value)

    def test_time_limit_stops_at_the_longest_duration(self) -> None:
        assert config(time_limit=315_576_000_000).time_limit == 315_576_000_000
        with pytest.raises(ConfigError, match="time_limit"):
            config(time_limit=315_576_000_001)

    def test_orphan_timeout_is_validated_and_shapes_the_job(self) -> None:
        assert config().orphan_timeout == 600
        assert config(orphan_timeout=0).orphan_timeout == 0
        for value in (-1, float("nan"), "10"):
            with pytest.raises(ConfigError, match="orphan_timeout"):
                config(orphan_timeout=value)
        assert config().shape != config(orphan_timeout=60).shape


class TestSharing:
    """An executor per electron: thousands of pending electrons must share one config."""

    def test_equal_values_give_the_same_config(self) -> None:
        assert config() is config()
        assert config(labels={"team": "a"}) is config(labels={"team": "a"})
        assert config(vcpus=4) is not config()

    def test_a_config_has_no_dict_of_its_own(self) -> None:
        # 32 fields: as a plain instance, each config would carry an unshared 1.6 KB dict.
        assert not hasattr(config(), "__dict__")

    @pytest.mark.parametrize(
        ("key", "valid", "invalid"),
        [("retries", 1, True), ("vcpus", 1, True), ("keep_objects", False, 0)],
    )
    def test_a_value_equal_to_a_valid_one_is_still_validated(
        self, key: str, valid: Any, invalid: Any
    ) -> None:
        config(**{key: valid})  # remembered; the invalid one compares equal to it
        with pytest.raises(ConfigError, match=key):
            config(**{key: invalid})

    @pytest.mark.parametrize(("key", "value"), [("region", ["us-east1"]), ("labels", {"a": []})])
    def test_an_unhashable_value_is_refused_as_before(self, key: str, value: Any) -> None:
        with pytest.raises(ConfigError, match=key):
            config(**{key: value})

    def test_required_keys_may_be_left_empty_only_when_asked(self) -> None:
        empty = dict(DEFAULTS)
        assert ExecutorConfig.from_values(empty, require=False).project_id == ""
        with pytest.raises(ConfigError, match="is required"):
            ExecutorConfig.from_values(empty)
