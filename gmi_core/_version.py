"""The version has one source, pyproject.toml's [project] version (the Comfy Registry reads it there too).

A clone (ComfyUI custom_nodes, A1111 extensions, an editable install) reads the file beside the package;
an installed wheel, which has no pyproject.toml, reads its own metadata.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def version_in_pyproject(text: str) -> str | None:
    """The ``version = "..."`` line of the [project] table (Python 3.10 has no tomllib)."""
    project = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, flags=re.M | re.S)
    found = project and re.search(r'^version\s*=\s*"([^"]+)"', project.group(1), flags=re.M)
    return found.group(1) if found else None


def read_version() -> str:
    if PYPROJECT.is_file():
        found = version_in_pyproject(PYPROJECT.read_text(encoding="utf-8"))
        if found:
            return found
    try:
        return metadata.version("gmi")
    except metadata.PackageNotFoundError:
        return "0+unknown"
