"""The deployment: Terraform for `covalent deploy up gcpbatch_array`, its pydantic models, the
task image's build files.

No Google provider can be downloaded here, so `terraform validate` and `plan` cannot run: the
Terraform is checked with `terraform fmt -check`, parsed with python-hcl2, and its references,
variables, outputs and IAM roles are checked against the executor's keys.
"""

from __future__ import annotations

import configparser
import fnmatch
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import covalent  # noqa: F401  (before the plugin module, as the server does: see FACTS)
import hcl2
import pytest
import yaml

import covalent_gcpbatch_array
from covalent_gcpbatch_array import deploy
from covalent_gcpbatch_array.config import DEFAULTS, ExecutorConfig
from covalent_gcpbatch_array.deploy import (
    DEPLOYED_KEYS,
    ExecutorInfraDefaults,
    ExecutorPluginDefaults,
)

PACKAGE = Path(covalent_gcpbatch_array.__file__).parent
INFRA = PACKAGE / "assets" / "infra"
ROOT = PACKAGE.parent
RUNNER_IMAGE = ROOT / "runner_image"
TF_FILES = ("main.tf", "variables.tf", "outputs.tf")

#: The task service account's roles: (role, where it is granted). See docs/deploy.md.
TASK_ROLES = {
    ("roles/batch.agentReporter", "project"),
    ("roles/logging.logWriter", "project"),
    # Create and read, never replace or delete (issue 12): attempt-named output objects.
    ("roles/storage.objectCreator", "bucket"),
    ("roles/storage.objectViewer", "bucket"),
    ("roles/artifactregistry.reader", "repository"),
}


def _unquote(text: Any) -> Any:
    if isinstance(text, str) and len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1]
    return text


def _load(name: str) -> dict[str, Any]:
    with (INFRA / name).open() as file:
        document: dict[str, Any] = hcl2.load(file)
    return document


def _named(blocks: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``[{'"name"': body}, ...]`` -> ``{name: body}``."""
    return {_unquote(name): body for block in blocks for name, body in block.items()}


def _resources() -> dict[str, dict[str, Any]]:
    """``{"google_x.name": body}`` of main.tf."""
    found = {}
    for block in _load("main.tf")["resource"]:
        for kind, named in block.items():
            for name, body in named.items():
                found[f"{_unquote(kind)}.{_unquote(name)}"] = body
    return found


def _locals() -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for block in _load("main.tf")["locals"]:
        merged.update({k: v for k, v in block.items() if not k.startswith("__")})
    return merged


def _quoted_items(expression: str) -> set[str]:
    return set(re.findall(r'"([^"]+)"', expression))


def _variables() -> dict[str, dict[str, Any]]:
    return _named(_load("variables.tf")["variable"])


def _template_keys() -> list[str]:
    parser = configparser.ConfigParser()
    parser.read_string((INFRA / "gcpbatch_array.conf.tftpl").read_text())
    return list(parser["gcpbatch_array"])


class TestTerraform:
    @pytest.mark.skipif(shutil.which("terraform") is None, reason="terraform is not on PATH")
    def test_fmt_check(self) -> None:
        result = subprocess.run(
            ["terraform", "fmt", "-check", "-diff", str(INFRA)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stdout + result.stderr

    def test_every_file_parses(self) -> None:
        for name in TF_FILES:
            assert _load(name), name

    def test_every_reference_is_declared(self) -> None:
        text = "\n".join((INFRA / name).read_text() for name in TF_FILES)
        code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
        variables, local_names, resources = set(_variables()), set(_locals()), set(_resources())
        assert set(re.findall(r"\bvar\.(\w+)", code)) <= variables
        assert set(re.findall(r"\blocal\.(\w+)", code)) <= local_names
        referenced = set(re.findall(r"\b((?:google|local)_\w+\.\w+)(?:\[\d+\])?\.\w+", code))
        referenced |= set(re.findall(r"depends_on\s*=\s*\[([\w.]+)\]", code))
        assert referenced <= resources

    def test_the_providers_are_pinned(self) -> None:
        (settings,) = _load("main.tf")["terraform"]
        (providers,) = settings["required_providers"]
        assert _unquote(providers["google"]["source"]) == "hashicorp/google"
        assert _unquote(providers["google"]["version"]).startswith(">= 5")
        # Covalent refuses terraform older than 1.4 (see docs/troubleshooting.md).
        assert _unquote(settings["required_version"]) == ">= 1.3"

    def test_the_apis_a_deployment_needs_are_enabled(self) -> None:
        apis = _quoted_items(_locals()["apis"])
        required = {"batch", "compute", "logging", "storage", "artifactregistry", "iam"}
        assert {f"{api}.googleapis.com" for api in required} <= apis
        service = _resources()["google_project_service.apis"]
        assert service["disable_on_destroy"] is False

    def test_the_bucket_is_private_and_expires_old_task_objects(self) -> None:
        bucket = _resources()["google_storage_bucket.tasks"]
        assert bucket["uniform_bucket_level_access"] is True
        assert _unquote(bucket["public_access_prevention"]) == "enforced"
        (rule,) = bucket["lifecycle_rule"]
        (condition,) = rule["condition"]
        assert condition["age"] == "${var.object_retention_days}"
        assert [_unquote(p) for p in condition["matches_prefix"]] == ["${var.bucket_prefix}/"]
        assert _unquote(rule["action"][0]["type"]) == "Delete"

    def test_the_task_service_account_gets_exactly_the_roles_a_task_needs(self) -> None:
        resources = _resources()
        sa_member = "${local.task_member}"
        assert _unquote(_locals()["task_member"]) == "serviceAccount:${local.task_service_account}"
        granted = set()
        for address, body in resources.items():
            if _unquote(body.get("member")) != sa_member:
                continue
            where = {
                "google_project_iam_member": "project",
                "google_storage_bucket_iam_member": "bucket",
                "google_artifact_registry_repository_iam_member": "repository",
            }[address.split(".")[0]]
            role = _unquote(body["role"])
            if role == "${each.value}":
                roles = _quoted_items(_locals()[body["for_each"].split("local.")[1].rstrip("}")])
            else:
                roles = {role}
            granted |= {(r, where) for r in roles}
        assert granted == TASK_ROLES
        # The seed plugin's logging.viewer is for people reading logs, not for tasks.
        assert all(role != "roles/logging.viewer" for role, _ in granted)

    def test_the_dispatcher_grants_are_optional(self) -> None:
        resources = _resources()
        dispatcher = {k: v for k, v in resources.items() if "dispatcher" in k}
        assert len(dispatcher) == 3
        for body in dispatcher.values():
            assert "var.dispatcher_member" in str(body.get("count", body.get("for_each")))
        roles = _quoted_items(_locals()["dispatcher_project_roles"])
        assert roles == {"roles/batch.jobsEditor", "roles/logging.viewer"}
        acts_as = resources["google_service_account_iam_member.dispatcher_acts_as_tasks"]
        assert _unquote(acts_as["role"]) == "roles/iam.serviceAccountUser"

    def test_terraform_writes_the_conf_file_covalent_reads(self) -> None:
        conf = _resources()["local_file.executor_config"]
        # Covalent reads assets/infra/<executor short name>.conf, section [<short name>].
        assert _unquote(conf["filename"]) == "${path.module}/gcpbatch_array.conf"
        template_args = set(re.findall(r"(\w+)\s*=", conf["content"].split("{", 2)[2]))
        assert template_args == set(_template_keys())


class TestOutputsAndKeys:
    def test_every_output_is_an_executor_key_the_deployment_sets(self) -> None:
        outputs = set(_named(_load("outputs.tf")["output"]))
        assert outputs == set(DEPLOYED_KEYS) == set(_template_keys())
        assert outputs <= set(DEFAULTS)
        assert set(ExecutorPluginDefaults.model_fields) == outputs

    def test_every_setting_deploy_up_lists_is_a_terraform_variable(self) -> None:
        # Covalent writes every --name=value into terraform.tfvars; one that is no variable
        # would only draw a warning and be ignored.
        assert set(ExecutorPluginDefaults.model_fields) <= set(_variables())

    def test_the_conf_file_covalent_reads_validates_as_the_executor_config(self) -> None:
        rendered = (INFRA / "gcpbatch_array.conf.tftpl").read_text()
        values = {
            "project_id": "my-project-1",
            "region": "europe-west4",
            "bucket_name": "my-project-1-covalent-gcpbatch-array",
            "bucket_prefix": "covalent-gcpbatch-array",
            "container_image_uri": "europe-west4-docker.pkg.dev/my-project-1/covalent-gcpbatch-"
            "array/covalent-gcpbatch-array:0.1.0",
            "service_account_email": "covalent-gcpbatch-array@my-project-1.iam.gserviceaccount.com",
        }
        for key, value in values.items():
            rendered = rendered.replace("${" + key + "}", value)
        assert "${" not in rendered
        parser = configparser.ConfigParser()
        parser.read_string(rendered)
        # What covalent's CloudResourceManager._update_config does with it:
        section = {k: None if v == "null" else v for k, v in parser["gcpbatch_array"].items()}
        written = ExecutorPluginDefaults.model_validate(section).model_dump()
        assert written == values
        ExecutorConfig.from_values({**DEFAULTS, **written})


class TestInfraDefaults:
    def test_the_models_variables_and_defaults_match_variables_tf(self) -> None:
        variables = _variables()
        assert set(ExecutorInfraDefaults.model_fields) == set(variables)
        for name, field in ExecutorInfraDefaults.model_fields.items():
            declared = variables[name]
            if field.is_required():
                assert _unquote(declared["default"]) == "", name  # the validation says what to set
            else:
                assert _unquote(declared["default"]) == field.default, name

    def test_the_image_tag_is_the_package_version(self) -> None:
        assert ExecutorInfraDefaults.model_fields["image_tag"].default == (
            covalent_gcpbatch_array.__version__
        )

    def test_values_are_checked_by_the_executors_rules(self) -> None:
        with pytest.raises(ValueError, match="--region=VALUE"):
            ExecutorInfraDefaults.model_validate({"project_id": "my-project-1", "region": "Mars"})
        with pytest.raises(ValueError, match="project_id"):
            ExecutorInfraDefaults.model_validate({"project_id": "X"})
        with pytest.raises(ValueError, match="IAM member"):
            ExecutorInfraDefaults.model_validate(
                {"project_id": "my-project-1", "dispatcher_member": "me@example.com"}
            )
        defaults = ExecutorInfraDefaults.model_validate({"project_id": "my-project-1"})
        assert defaults.region == "us-east1"

    def test_plugin_defaults_accept_unset_keys_but_not_bad_ones(self) -> None:
        assert ExecutorPluginDefaults().project_id == ""
        with pytest.raises(ValueError, match="service account email"):
            ExecutorPluginDefaults(service_account_email="nobody")
        with pytest.raises(ValueError, match="extra"):
            ExecutorPluginDefaults.model_validate({"vcpus": 4})


class TestCovalentDeploy:
    """`covalent deploy up gcpbatch_array --help` runs offline: no Terraform is started."""

    @pytest.fixture
    def plugin_module(self, monkeypatch: pytest.MonkeyPatch) -> Any:
        from covalent_gcpbatch_array import gcpbatch_array

        # The plugin module re-exports the models (the lead wires the import); make sure.
        monkeypatch.setattr(
            gcpbatch_array, "ExecutorPluginDefaults", ExecutorPluginDefaults, raising=False
        )
        monkeypatch.setattr(
            gcpbatch_array, "ExecutorInfraDefaults", ExecutorInfraDefaults, raising=False
        )
        return gcpbatch_array

    def _up(self, *args: str) -> Any:
        from click.testing import CliRunner
        from covalent_dispatcher._cli.groups.deploy_group import deploy as deploy_group

        # A wide console, so rich does not wrap the setting names.
        return CliRunner().invoke(
            deploy_group, ["up", "gcpbatch_array", *args], env={"COLUMNS": "200"}
        )

    def test_help_lists_every_setting(self, plugin_module: Any) -> None:
        result = self._up("--help")
        assert result.exit_code == 0, result.output
        for name in set(ExecutorInfraDefaults.model_fields) | set(DEPLOYED_KEYS):
            assert name in result.output
        assert "Yes" in result.output  # project_id is required

    def test_covalent_finds_the_terraform_in_the_package(self, plugin_module: Any) -> None:
        from covalent_dispatcher._cli.groups.deploy_group import get_crm_object

        crm = get_crm_object("gcpbatch_array", {"project_id": "my-project-1"})
        assert Path(crm.executor_tf_path) == INFRA
        assert crm.plugin_settings["project_id"]["value"] == "my-project-1"

    def test_a_bad_option_is_refused_before_terraform(self, plugin_module: Any) -> None:
        result = self._up("--project_id=my-project-1", "--region=Mars", "--help")
        assert result.exit_code != 0
        assert "region" in str(result.exception)

    def test_the_plugin_module_exports_the_models(self, plugin_module: Any) -> None:
        assert plugin_module.ExecutorPluginDefaults is deploy.ExecutorPluginDefaults
        assert plugin_module.ExecutorInfraDefaults is deploy.ExecutorInfraDefaults


def _dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Whether ``path`` is left out of the build context (last matching pattern wins; a
    pattern matching a folder covers what is inside it)."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        regex = fnmatch.translate(body).replace(".*", "[^/]*").replace("[^/]*[^/]*", ".*")
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            excluded = not negate
    return excluded


class TestImageBuild:
    def test_cloud_build_builds_the_dockerfile_with_the_servers_versions(self) -> None:
        config = yaml.safe_load((RUNNER_IMAGE / "cloudbuild.yaml").read_text())
        (step,) = config["steps"]
        assert step["name"] == "gcr.io/cloud-builders/docker"
        assert "DOCKER_BUILDKIT=1" in step["env"]
        assert "--file=runner_image/Dockerfile" in step["args"]
        assert "--build-arg=PYTHON_VERSION=${_PYTHON_VERSION}" in step["args"]
        assert "--build-arg=COVALENT_VERSION=${_COVALENT_VERSION}" in step["args"]
        assert config["images"] == ["${_IMAGE}"]
        assert config["substitutions"]["_COVALENT_VERSION"] == "0.240.0"

    @pytest.mark.skipif(shutil.which("make") is None, reason="make is not on PATH")
    def test_make_cloud_build_passes_the_servers_versions(self) -> None:
        import importlib.metadata
        import sys

        image = "us-east1-docker.pkg.dev/my-project-1/repo/covalent-gcpbatch-array:0.1.0"
        result = subprocess.run(
            ["make", "-s", "-n", "-C", str(RUNNER_IMAGE), "cloud-build", f"IMAGE={image}"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        versions = (
            f"_PYTHON_VERSION={sys.version_info[0]}.{sys.version_info[1]},"
            f"_COVALENT_VERSION={importlib.metadata.version('covalent')}"
        )
        assert f'--substitutions="_IMAGE={image},{versions}"' in result.stdout
        assert '--project="my-project-1"' in result.stdout
        assert "--ignore-file=runner_image/.gcloudignore" in result.stdout

    @pytest.mark.skipif(shutil.which("make") is None, reason="make is not on PATH")
    def test_make_without_an_image_says_how_to_set_it(self, tmp_path: Path) -> None:
        result = subprocess.run(
            ["make", "-s", "-C", str(RUNNER_IMAGE), "show", "IMAGE="],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode != 0
        assert "pass IMAGE=" in result.stderr

    def test_the_build_context_holds_what_the_dockerfile_copies_and_no_terraform_state(
        self,
    ) -> None:
        lines = (RUNNER_IMAGE / "Dockerfile.dockerignore").read_text().splitlines()
        patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
        dockerfile = (RUNNER_IMAGE / "Dockerfile").read_text()
        copied = [
            source
            for line in dockerfile.splitlines()
            if line.startswith("COPY ")
            for source in line.split()[1:-1]
        ]
        assert copied
        for source in copied:
            assert not _dockerignore_excludes(patterns, source), source
        assert not _dockerignore_excludes(patterns, "covalent_gcpbatch_array/runner.py")
        for secret in (
            "covalent_gcpbatch_array/assets/infra/terraform.tfstate",
            "covalent_gcpbatch_array/assets/infra/terraform.tfstate.backup",
            "covalent_gcpbatch_array/assets/infra/.terraform/providers/google",
            "covalent_gcpbatch_array/__pycache__/x.pyc",
            ".venv/bin/python",
            "tests/test_infra.py",
        ):
            assert _dockerignore_excludes(patterns, secret), secret

    @pytest.mark.skipif(shutil.which("gcloud") is None, reason="gcloud is not on PATH")
    def test_cloud_build_uploads_only_the_image_sources(self, tmp_path: Path) -> None:
        for name in ("pyproject.toml", "README.md", "tests/x.py", ".venv/bin/python"):
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text("x")
        infra = tmp_path / "covalent_gcpbatch_array/assets/infra"
        (infra / ".terraform").mkdir(parents=True)
        for name in ("main.tf", "terraform.tfstate", ".terraform/provider", "gcpbatch_array.conf"):
            (infra / name).write_text("x")
        (tmp_path / "runner_image").mkdir()
        (tmp_path / "runner_image/Dockerfile").write_text("x")
        # `gcloud meta list-files-for-upload` has no --ignore-file: use the file in place.
        shutil.copy(RUNNER_IMAGE / ".gcloudignore", tmp_path / ".gcloudignore")
        result = subprocess.run(
            ["gcloud", "meta", "list-files-for-upload", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        assert sorted(result.stdout.split()) == [
            "README.md",
            "covalent_gcpbatch_array/assets/infra/main.tf",
            "pyproject.toml",
            "runner_image/Dockerfile",
        ]


@pytest.mark.skipif(shutil.which("terraform") is None, reason="terraform is not on PATH")
def test_covalent_refuses_terraform_1_10_and_later() -> None:
    """Covalent 0.240 reads the version as float(version[:3]): 1.11 looks like 1.1 < 1.4.

    docs/troubleshooting.md tells users to run `covalent deploy` with terraform 1.4 to 1.9;
    this test fails when a covalent upgrade fixes it, so the advice can be dropped.
    """
    version = subprocess.run(
        ["terraform", "version"], capture_output=True, text=True, timeout=60
    ).stdout.split("v", 1)[1]
    if not re.match(r"1\.\d\d", version):
        pytest.skip(f"terraform {version.split()[0]} is not 1.10 or later")
    from covalent.cloud_resource_manager.core import CloudResourceManager

    with pytest.raises(SystemExit):
        CloudResourceManager._get_tf_path(None)  # type: ignore[arg-type]
