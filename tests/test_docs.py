"""The documentation in docs/ and CHANGELOG.md stays true to the code it describes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from covalent_gcpbatch_array.config import DEFAULTS
from covalent_gcpbatch_array.deploy import ExecutorInfraDefaults

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {
        _slug(line.lstrip("#"))
        for line in page.read_text().splitlines()
        if re.match(r"#{1,6} ", line)
    }


class TestConfigurationPage:
    def test_every_key_is_documented_with_its_default(self) -> None:
        text = (DOCS / "configuration.md").read_text()
        rows = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", text, flags=re.M))
        assert set(rows) == set(DEFAULTS)
        for key, default in DEFAULTS.items():
            assert rows[key] == json.dumps(default), key

    def test_required_keys_are_named(self) -> None:
        text = (DOCS / "configuration.md").read_text()
        assert "Required: `project_id`, `bucket_name` and `container_image_uri`." in text


class TestDeployPage:
    def test_every_deploy_setting_is_documented(self) -> None:
        text = (DOCS / "deploy.md").read_text()
        documented = set(re.findall(r"^\| `(\w+)`(?:, `(\w+)`)? \|", text, flags=re.M))
        names = {name for pair in documented for name in pair if name}
        assert set(ExecutorInfraDefaults.model_fields) <= names


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_links_between_pages_resolve(page: Path) -> None:
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"https?://", target):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        assert linked.exists(), f"{page.name} links to missing {target}"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked), f"{page.name} links to missing anchor {target}"


def test_the_changelog_has_an_unreleased_section() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in text
    assert "keepachangelog.com" in text


class TestReadmeLayout:
    """The README's layout section names every module of the package, and nothing else."""

    @staticmethod
    def _listed_paths() -> set[str]:
        text = (ROOT / "README.md").read_text()
        block = text.split("## Layout", 1)[1].split("```", 2)[1]
        parents: list[tuple[int, str]] = []
        paths = set()
        for line in block.splitlines():
            if not line.strip():
                continue
            indent = len(line) - len(line.lstrip())
            name = line.split()[0]
            while parents and parents[-1][0] >= indent:
                parents.pop()
            path = "".join(parent for _, parent in parents) + name
            paths.add(path.rstrip("/"))
            if name.endswith("/"):
                parents.append((indent, name))
        return paths

    def test_every_module_and_package_is_listed(self) -> None:
        package = ROOT / "covalent_gcpbatch_array"
        actual = {
            str(path.relative_to(ROOT))
            for path in package.rglob("*.py")
            if path.name != "__init__.py" and "__pycache__" not in path.parts
        }
        actual |= {
            str(path.parent.relative_to(ROOT))
            for path in package.rglob("__init__.py")
            if path.parent != package
        }
        listed = {p for p in self._listed_paths() if p.startswith("covalent_gcpbatch_array/")}
        assert sorted(actual - listed) == [], "modules missing from the README's layout"
        assert sorted(p for p in listed - actual if p.endswith(".py")) == [], "listed, not there"

    def test_every_listed_path_exists(self) -> None:
        missing = sorted(p for p in self._listed_paths() if not (ROOT / p).exists())
        assert missing == []


class TestReadmeHeadline:
    """The README's numbers against the original plugin are those of the committed results."""

    def _result(self, arrival: str, mode: str) -> dict[str, object]:
        path = ROOT / "benchmarks" / "results" / f"original-{arrival}-{mode}-1000.json"
        loaded: dict[str, object] = json.loads(path.read_text())
        return loaded

    def test_jobs_calls_and_time_come_from_the_1000_electron_run(self) -> None:
        text = " ".join((ROOT / "README.md").read_text().split())
        ours, theirs = self._result("burst", "batched"), self._result("burst", "original")
        assert f"**jobs:** {ours['jobs_created']:,} instead of {theirs['jobs_created']:,}" in text
        assert (
            f"**Batch API calls:** {ours['api_calls_total']:,} instead of "
            f"{theirs['api_calls_total']:,}"
        ) in text
        assert (
            f"**time to the last result:** {ours['time_to_last_result_s']:.1f} s instead of "
            f"{theirs['time_to_last_result_s']:.1f} s"
        ) in text
        served, seed = self._result("covalent", "batched"), self._result("covalent", "original")
        assert (
            f"through a Covalent server: {served['time_to_last_result_s']:.1f} s in "
            f"{served['jobs_created']} jobs, instead of {seed['time_to_last_result_s']:,.0f} s"
        ) in text
