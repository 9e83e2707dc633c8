"""Static checks for the whole project: ruff, and the ComfyUI community's pack lint (comfy-test)."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean():
    """One formatter for the whole tree (`ruff format`, configured in pyproject.toml)."""
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "--no-cache", str(ROOT)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _pack_copy(target: Path) -> Path:
    """The pack as it is published: the checkout without virtual environments, caches and git data
    (comfy-test would otherwise read every .py file of a .venv inside the checkout)."""
    shutil.copytree(ROOT, target, ignore=shutil.ignore_patterns(".*", "__pycache__", "*.egg-info", "build", "dist"))
    return target


def test_comfy_pack_lint_strict_passes(tmp_path):
    """`comfy-test lint --strict`: cp1252-safe Python sources, no forbidden device/autocast patterns, and front end
    JavaScript that stays in its namespace (registerExtension names, scoped CSS, nothing appended to the shared
    document); --strict fails on JavaScript warnings too."""
    pack = _pack_copy(tmp_path / "gmi")
    result = subprocess.run(
        [sys.executable, "-m", "comfy_test", "lint", "--strict", str(pack)], capture_output=True, text=True, timeout=300
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "[SYNTAX] PASSED" in out and "[JAVASCRIPT] PASSED" in out, out
    assert "enforcing DisplayName namespace 'gmi'" in out, out


def test_comfy_pack_lint_catches_a_shared_document_append(tmp_path):
    """The lint really reads web/: the old way of adding a stylesheet fails it."""
    pack = _pack_copy(tmp_path / "gmi")
    js = pack / "web" / "gmi.js"
    js.write_text(
        js.read_text(encoding="utf-8") + '\ndocument.head.append(document.createElement("style"));\n', encoding="utf-8"
    )
    result = subprocess.run(
        [sys.executable, "-m", "comfy_test", "lint", "--strict", str(pack)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0 and "shared-dom-injection" in result.stdout, result.stdout + result.stderr
