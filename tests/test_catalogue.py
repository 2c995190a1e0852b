"""The compute catalogue: data from Google's documentation, used by the config and the emulator."""

from __future__ import annotations

import pytest

from covalent_gcpbatch_array._core.catalogue import catalogue
from covalent_gcpbatch_array.config import DEFAULTS, ExecutorConfig
from covalent_gcpbatch_array.exceptions import ConfigError


def test_the_catalogue_names_its_sources_and_date() -> None:
    data = catalogue()
    assert data.retrieved and all(url.startswith("https://") for url in data.sources.values())
    assert data.regions["us-central1"] == (
        "us-central1-a",
        "us-central1-b",
        "us-central1-c",
        "us-central1-f",
    )


@pytest.mark.parametrize(
    ("shape", "part"),
    [
        ({"machine_type": "n2-standard-3"}, "machine_type"),
        ({"accelerator_type": "nvidia-tesla-t4", "accelerator_count": 3}, "accelerator_count"),
        ({"accelerator_type": "nvidia-l4", "accelerator_count": 1}, "machine_type"),
        (
            {
                "accelerator_type": "nvidia-tesla-v100",
                "accelerator_count": 1,
                "region": "africa-south1",
            },
            "accelerator_type",
        ),
        ({"machine_type": "e2-standard-2", "vcpus": 4}, "vcpus"),
        ({"region": "us-east9"}, "region"),
    ],
)
def test_impossible_shapes_are_named(shape: dict[str, object], part: str) -> None:
    args = {"region": "us-east1", **shape}
    problem = catalogue().check(**args)  # type: ignore[arg-type]
    assert problem is not None and problem.part == part


def test_real_shapes_pass() -> None:
    check = catalogue().check
    assert (
        check(
            region="us-east1",
            machine_type="n1-standard-4",
            accelerator_type="nvidia-tesla-t4",
            accelerator_count=1,
        )
        is None
    )
    assert check(region="us-central1", machine_type="g2-standard-8") is None
    assert check(region="us-east1", machine_type="n2-custom-6-24576") is None


def test_the_config_refuses_an_impossible_shape_naming_the_key() -> None:
    values = {
        **DEFAULTS,
        "project_id": "my-project",
        "bucket_name": "bucket",
        "container_image_uri": "image",
        "machine_type": "n9-standard-4",
    }
    with pytest.raises(ConfigError) as refused:
        ExecutorConfig.from_values(values)
    assert refused.value.key == "machine_type"
