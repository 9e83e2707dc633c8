"""Start the real Forge (stable-diffusion-webui-forge) on CPU with gmi linked in as an extension.

The same server helper as the A1111 tests (tests/a1111_support/server.py) with Forge's launch flags and Python:
``GMI_FORGE_PYTHON``, else ``<forge>/venv/bin/python`` (see docs/forge.md for how that venv is made).
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.a1111_support.server import WebuiServer

FORGE_FLAGS = [
    "--skip-prepare-environment",
    "--skip-python-version-check",
    "--skip-torch-cuda-test",
    "--skip-version-check",
    "--always-cpu",
    "--use-cpu",
    "all",
    "--no-half",
    "--no-download-sd-model",
    "--api",
    "--server-name",
    "127.0.0.1",
]


def forge_python(forge: Path) -> Path:
    explicit = os.environ.get("GMI_FORGE_PYTHON")
    for candidate in ([Path(explicit)] if explicit else []) + [forge / "venv" / "bin" / "python"]:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no Python for Forge: set GMI_FORGE_PYTHON or make {forge / 'venv'} (docs/forge.md)")


def forge_server(forge: Path, data_dir: Path, extension_root: Path, api_auth: str | None = None) -> WebuiServer:
    # Gradio 4 serves /file= only from allowed paths, which default to the data folder: with a private --data-dir,
    # Forge's own script.js and javascript/*.js answer 403 unless its root is allowed too
    flags = [*FORGE_FLAGS, "--gradio-allowed-path", str(forge)]
    return WebuiServer(
        forge,
        data_dir,
        extension_root,
        data_dir / "forge.log",
        api_auth=api_auth,
        launch_flags=flags,
        python=forge_python(forge),
    )
