"""The compute catalogue: data from Google's documentation, used by the config and the emulator.

Fail-fast policy: the executor refuses only a shape that certainly cannot exist; a problem that
rests on a fact which changes over time or that the catalogue could not confirm is logged as a
warning (naming the catalogue's source and date), while the local cloud fails such a job.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from typing import Any

import pytest
from google.cloud import batch_v1

from covalent_gcpbatch_array._core.catalogue import catalogue
from covalent_gcpbatch_array.config import DEFAULTS, ExecutorConfig
from covalent_gcpbatch_array.exceptions import ConfigError
from covalent_gcpbatch_array.local import LocalCloud
from tests.polling import job_reached
from tests.test_batch_contract import script_job

JobState = batch_v1.JobStatus.State


def config(**values: Any) -> ExecutorConfig:
    required = {"project_id": "my-project", "bucket_name": "bucket", "container_image_uri": "i"}
    return ExecutorConfig.from_values({**DEFAULTS, **required, **values})


def test_each_section_names_what_it_was_checked_against_and_what_is_unconfirmed() -> None:
    text = resources.files("covalent_gcpbatch_array._core").joinpath("compute_catalogue.json")
    data = json.loads(text.read_text())
    assert set(data["verification"]) == {"regions", "families", "gpus"}
    for section in data["verification"].values():
        assert section["checked"] == data["retrieved"] == "2026-12-03"
        assert all(url.startswith("https://") for url in section["checked_against"])
        assert section["unconfirmed"]
    shapes = catalogue()
    assert shapes.regions["us-central1"] == (
        "us-central1-a",
        "us-central1-b",
        "us-central1-c",
        "us-central1-f",
    )


@pytest.mark.parametrize(
    ("shape", "part"),
    [
        ({"region": "us-east9"}, "region"),
        ({"machine_type": "n9-standard-4"}, "machine_type"),  # no such family
        ({"machine_type": "n2-standard-3"}, "machine_type"),  # no such size of a confirmed family
        ({"machine_type": "n4-megamem-4"}, "machine_type"),  # no such series
        ({"accelerator_type": "nvidia-tesla-k9000", "accelerator_count": 1}, "accelerator_type"),
        ({"accelerator_type": "nvidia-tesla-t4", "accelerator_count": 3}, "accelerator_count"),
        (
            {
                "machine_type": "n2-standard-4",
                "accelerator_type": "nvidia-tesla-t4",
                "accelerator_count": 1,
            },
            "machine_type",
        ),
        ({"accelerator_type": "nvidia-l4", "accelerator_count": 1}, "machine_type"),
        ({"machine_type": "e2-standard-2", "vcpus": 4}, "vcpus"),
        ({"machine_type": "e2-standard-2", "memory_mib": 9000}, "memory"),
    ],
)
def test_impossible_shapes_are_certain_problems(shape: dict[str, Any], part: str) -> None:
    problem = catalogue().check(**{"region": "us-east1", **shape})
    assert problem is not None and problem.part == part and problem.certain


@pytest.mark.parametrize(
    ("shape", "part"),
    [
        # Which region offers a GPU changes over time.
        (
            {
                "region": "africa-south1",
                "accelerator_type": "nvidia-tesla-v100",
                "accelerator_count": 1,
            },
            "accelerator_type",
        ),
        # N4's size list could not be confirmed.
        ({"region": "us-east1", "machine_type": "n4-standard-96"}, "machine_type"),
    ],
)
def test_changing_or_unconfirmed_facts_are_uncertain_problems(
    shape: dict[str, Any], part: str
) -> None:
    problem = catalogue().check(**shape)
    assert problem is not None and problem.part == part and not problem.certain
    assert catalogue().retrieved in problem.message and "https://" in problem.message


def test_a_certain_problem_is_reported_before_an_uncertain_one() -> None:
    problem = catalogue().check(
        region="africa-south1",
        machine_type="n1-standard-1",
        accelerator_type="nvidia-tesla-v100",
        accelerator_count=1,
        vcpus=2,
    )
    assert problem is not None and problem.part == "vcpus" and problem.certain


@pytest.mark.parametrize(
    "shape",
    [
        {"machine_type": "n1-standard-4", "accelerator_type": "nvidia-tesla-t4"},
        {"machine_type": "g2-standard-8"},
        {"machine_type": "n2-custom-6-24576"},
        {"machine_type": "a3-highgpu-1g"},  # H100 comes 1 to a VM too
        {"machine_type": "a3-ultragpu-8g"},  # H200
        {"machine_type": "a4-highgpu-8g"},  # B200
        {"machine_type": "g4-standard-48", "region": "asia-southeast3"},  # regions unknown
        {"machine_type": "c4-standard-8"},  # a family whose shapes are not catalogued
        {"machine_type": "n1-ultramem-40"},  # the older name of m1-ultramem-40
        {"region": "europe-north2"},
        {"accelerator_type": "nvidia-l4", "machine_type": "g2-standard-4", "region": "me-central2"},
    ],
)
def test_real_shapes_pass(shape: dict[str, Any]) -> None:
    if "accelerator_type" in shape:
        shape = {**shape, "accelerator_count": 1}
    assert catalogue().check(**{"region": "us-central1", **shape}) is None


@pytest.mark.parametrize(
    ("values", "key", "hint"),
    [
        ({"region": "us-east9"}, "region", "set region to a value Google offers"),
        ({"machine_type": "n9-standard-4"}, "machine_type", "set machine_type"),
        (
            {"accelerator_type": "nvidia-tesla-t4", "accelerator_count": 3},
            "accelerator_count",
            "set accelerator_count",
        ),
        ({"machine_type": "e2-standard-2", "vcpus": 4}, "vcpus", "set vcpus"),
    ],
)
def test_the_config_refuses_a_certain_problem_naming_the_key_and_the_fix(
    values: dict[str, Any], key: str, hint: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        config(**values)
    assert refused.value.key == key
    assert hint in refused.value.hint and "compute_catalogue.json" in refused.value.hint
    assert catalogue().retrieved in refused.value.hint


def test_the_config_warns_about_an_uncertain_problem_and_accepts_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="covalent_gcpbatch_array.config"):
        accepted = config(
            region="africa-south1",
            machine_type="n1-standard-4",
            accelerator_type="nvidia-tesla-v100",
            accelerator_count=1,
        )
    assert accepted.accelerator_type == "nvidia-tesla-v100"
    [record] = caplog.records
    message = record.getMessage()
    assert "'accelerator_type'" in message and "africa-south1" in message
    assert "compute_catalogue.json, read 2026-12-03" in message


def test_the_local_cloud_fails_a_job_on_an_uncertain_problem(
    batch_client: batch_v1.BatchServiceClient, local_cloud: LocalCloud
) -> None:
    # us-east4 has T4s but, per the catalogue, no V100s: the executor would only warn.
    problem = catalogue().check(
        region="us-east4",
        machine_type="n1-standard-4",
        accelerator_type="nvidia-tesla-v100",
        accelerator_count=1,
    )
    assert problem is not None and not problem.certain
    job = script_job("true")
    job.allocation_policy = batch_v1.AllocationPolicy(
        instances=[
            {
                "policy": {
                    "machine_type": "n1-standard-4",
                    "accelerators": [{"type_": "nvidia-tesla-v100", "count": 1}],
                }
            }
        ]
    )
    created = batch_client.create_job(
        parent=f"projects/{local_cloud.project_id}/locations/us-east4", job=job, job_id="c-v100"
    )
    done = job_reached(batch_client, created.name)
    batch_client.delete_job(name=created.name)
    assert done.status.state == JobState.FAILED
    assert "policy.accelerators[0].type" in done.status.status_events[-1].description
