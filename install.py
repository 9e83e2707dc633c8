"""Installs what the host lacks, never torch: run by A1111 / Forge on launch and by ComfyUI-Manager.

Each requirement in requirements.txt is checked first; missing ones are installed with the host's
current torch pinned, so pip cannot swap the host's torch build. Silent when nothing is missing (it runs
on every WebUI start). `--skip-install` (given to this script, or the WebUI's own flag) installs nothing.
"""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

REQUIREMENTS = Path(__file__).with_name("requirements.txt")


def missing_requirements() -> list[str]:
    missing = []
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        try:
            if not requirement.specifier.contains(metadata.version(requirement.name), prereleases=True):
                missing.append(line)
        except metadata.PackageNotFoundError:
            missing.append(line)
    return missing


def torch_pin() -> list[str]:
    try:
        return [f"torch=={metadata.version('torch')}"]
    except metadata.PackageNotFoundError:
        return []


def webui_launch():
    """A1111 / Forge's ``launch`` module (their pip wrapper and parsed command line), or None elsewhere."""
    try:
        import launch
    except ImportError:
        return None
    return launch


def install(argv: list[str] | None = None) -> None:
    needed = missing_requirements()
    if not needed:
        return
    launch = webui_launch()
    skip = "--skip-install" in (sys.argv[1:] if argv is None else argv)
    if skip or getattr(getattr(launch, "args", None), "skip_install", False):
        print(f"gmi: --skip-install, not installing: {', '.join(needed)}")
        return
    if launch is None:
        subprocess.check_call([sys.executable, "-m", "pip", "install", *needed, *torch_pin()])
        return
    args = " ".join(f'"{r}"' for r in needed + torch_pin())
    launch.run_pip(f"install {args}", f"gmi requirements: {', '.join(needed)}")


if __name__ == "__main__":
    install()
