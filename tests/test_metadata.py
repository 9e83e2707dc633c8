"""Registry and index metadata: the Comfy Registry's [tool.comfy], one version everywhere, the changelog, and the
A1111 extension index entry in the README."""

import json
import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
# The WebUI index's tags (index.json of the extensions index repository).
A1111_INDEX_TAGS = {
    "script",
    "localization",
    "tab",
    "dropdown",
    "ads",
    "installed",
    "training",
    "models",
    "UI related",
    "prompting",
    "editing",
    "manipulations",
    "online",
    "animation",
    "query",
    "science",
}


def test_registry_metadata_is_complete():
    project, comfy = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
    assert re.fullmatch(r"[a-z][a-z0-9._-]*", project["name"]) and "comfyui" not in project["name"].lower()
    assert project["description"] and project["license"]
    repository = project["urls"]["Repository"]
    assert repository.startswith("https://github.com/")
    assert comfy["PublisherId"] and comfy["DisplayName"] and isinstance(comfy["includes"], list)
    # the icon is this repository's web/icon.svg, served raw from the default branch
    owner_repo = repository.removeprefix("https://github.com/")
    icon = comfy["Icon"]
    prefix = f"https://raw.githubusercontent.com/{owner_repo}/main/"
    assert icon.startswith(prefix) and (ROOT / icon.removeprefix(prefix)).is_file(), icon


def test_one_version_everywhere():
    import gmi_core

    version = PYPROJECT["project"]["version"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), "the registry wants X.Y.Z"
    assert gmi_core.__version__ == version
    releases = re.findall(
        r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", (ROOT / "CHANGELOG.md").read_text(), flags=re.M
    )
    assert releases and releases[0] == version, f"CHANGELOG.md's newest entry {releases[:1]} is not {version}"
    assert len(set(releases)) == len(releases)


def test_version_reader_takes_the_project_table():
    from gmi_core._version import version_in_pyproject

    text = '[build-system]\nversion = "9.9.9"\n[project]\nname = "x"\nversion = "1.2.3"\n[tool.x]\nversion = "0.0.1"\n'
    assert version_in_pyproject(text) == "1.2.3"
    assert version_in_pyproject('[project]\nname = "x"\n') is None


def test_a1111_index_entry_in_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = [json.loads(b) for b in re.findall(r"```json\n(.*?)```", readme, flags=re.S)]
    (entry,) = [b for b in blocks if isinstance(b, dict) and "tags" in b]
    assert set(entry) == {"name", "url", "description", "tags"}
    assert entry["url"] == PYPROJECT["project"]["urls"]["Repository"] + ".git"
    assert entry["name"] and 40 < len(entry["description"]) < 300
    assert entry["tags"] and set(entry["tags"]) <= A1111_INDEX_TAGS - {"installed", "ads", "online"}


def test_readme_measured_section_is_the_benchmarks_json():
    """README's numbers come from the committed benchmark JSON (python -m gmi_core.bench.report prints them)."""
    from gmi_core.bench.report import README_JSON, readme_summary

    data = [json.loads((ROOT / path).read_text(encoding="utf-8")) for path in README_JSON]
    assert readme_summary(*data) in (ROOT / "README.md").read_text(encoding="utf-8")
