"""What ``covalent deploy up gcpbatch_array`` needs from the plugin: two pydantic models.

Covalent's cloud resource manager (``covalent/cloud_resource_manager/core.py``) looks both up
as attributes of the plugin module ``covalent_gcpbatch_array.gcpbatch_array`` and runs the
Terraform in ``covalent_gcpbatch_array/assets/infra``:

- :class:`ExecutorInfraDefaults` are the Terraform variables. Covalent writes their defaults,
  or the ``--name=value`` options given to ``covalent deploy up``, into ``terraform.tfvars``;
  ``covalent deploy up gcpbatch_array --help`` lists them.
- :class:`ExecutorPluginDefaults` are the executor keys the deployment sets. After ``terraform
  apply``, Covalent validates ``assets/infra/gcpbatch_array.conf`` (written by Terraform) with
  it and copies every field into ``[executors.gcpbatch_array]`` of its config file.

``ExecutorPluginDefaults`` holds only the keys the deployment provisions: Covalent writes
*every* field of it into the config file, so a field for a tuning key (``batch_window``,
``vcpus``, ...) would reset the user's own setting to its default on each deployment.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from covalent_gcpbatch_array import __version__
from covalent_gcpbatch_array.config import DEFAULTS, ExecutorConfig
from covalent_gcpbatch_array.exceptions import ConfigError

__all__ = ["DEPLOYED_KEYS", "ExecutorInfraDefaults", "ExecutorPluginDefaults"]

#: The executor keys a deployment sets (the Terraform outputs have these names).
DEPLOYED_KEYS = (
    "project_id",
    "region",
    "bucket_name",
    "bucket_prefix",
    "container_image_uri",
    "service_account_email",
)

# Valid stand-ins for the required keys, so one key can be checked by the executor's own rules
# without the others.
_STAND_INS = {
    "project_id": "stand-in-project",
    "bucket_name": "stand-in-bucket",
    "container_image_uri": "stand-in-image",
}


def _check_executor_key(key: str, value: Any) -> Any:
    """Validate one executor key as the executor does; empty means "not set" and passes.

    :raises ConfigError: (a ValueError, which pydantic reports) naming the key
    """
    if value in ("", None):
        return value
    try:
        ExecutorConfig.from_values({**DEFAULTS, **_STAND_INS, key: value})
    except ConfigError as exc:
        hint = f"pass --{key}=VALUE to `covalent deploy up gcpbatch_array`"
        raise ConfigError(exc.key, exc.problem, hint) from None
    return value


class ExecutorPluginDefaults(BaseModel):
    """The executor keys ``covalent deploy up`` writes into the Covalent config file."""

    model_config = ConfigDict(extra="forbid")

    project_id: str = DEFAULTS["project_id"]
    region: str = DEFAULTS["region"]
    bucket_name: str = DEFAULTS["bucket_name"]
    bucket_prefix: str = DEFAULTS["bucket_prefix"]
    container_image_uri: str = DEFAULTS["container_image_uri"]
    service_account_email: str = DEFAULTS["service_account_email"]

    @field_validator(*DEPLOYED_KEYS)
    @classmethod
    def _executor_rules(cls, value: Any, info: Any) -> Any:
        return _check_executor_key(info.field_name, value)


_RESOURCE_ID = r"^[a-z]([a-z0-9-]*[a-z0-9])?$"
_MEMBER = re.compile(r"^(user|serviceAccount|group):[^@\s]+@[^@\s]+$")


class ExecutorInfraDefaults(BaseModel):
    """The Terraform variables of ``assets/infra/variables.tf``, with the same defaults.

    Every executor key the deployment sets is a variable too, so an option such as
    ``--container_image_uri=...`` (an image built elsewhere) is used, never silently dropped.
    """

    model_config = ConfigDict(extra="forbid")

    project_id: str = Field(description="Google Cloud project to deploy into")
    region: str = Field(default=DEFAULTS["region"], description="region of every resource")
    bucket_name: str = Field(
        default="",
        description="bucket for task objects ('' : <project_id>-covalent-gcpbatch-array)",
    )
    bucket_prefix: str = Field(
        default=DEFAULTS["bucket_prefix"], description="the executor's folder"
    )
    object_retention_days: int = Field(
        default=7, ge=1, description="days before task objects expire"
    )
    force_destroy: bool = Field(
        default=True, description="`deploy down` may delete a non-empty bucket"
    )
    repository_id: str = Field(
        default="covalent-gcpbatch-array",
        pattern=_RESOURCE_ID,
        max_length=63,
        description="image repo",
    )
    container_image_uri: str = Field(
        default="", description="an existing task image ('': the repository's image_name:image_tag)"
    )
    image_name: str = Field(default="covalent-gcpbatch-array", description="task image name")
    image_tag: str = Field(
        default=__version__, description="task image tag: this package's version"
    )
    service_account_id: str = Field(
        default="covalent-gcpbatch-array",
        pattern=r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$",
        description="account id of the tasks' service account",
    )
    service_account_email: str = Field(
        default="", description="an existing service account for the tasks ('': create one)"
    )
    dispatcher_member: str = Field(
        default="", description="IAM member running the Covalent server, granted what it needs"
    )
    credentials_file: str = Field(default="", description="credentials JSON for Terraform")

    @field_validator(*DEPLOYED_KEYS)
    @classmethod
    def _executor_rules(cls, value: Any, info: Any) -> Any:
        return _check_executor_key(info.field_name, value)

    @field_validator("dispatcher_member")
    @classmethod
    def _member(cls, value: str) -> str:
        if value and not _MEMBER.match(value):
            raise ValueError(
                f"{value!r} is not an IAM member: use user:me@example.com or "
                f"serviceAccount:name@project.iam.gserviceaccount.com"
            )
        return value
