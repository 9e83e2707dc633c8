"""Shared helpers of the fault suite: a small, fast core (header-valid fake checkpoints, a generator that paints each
checkpoint's colour), the CLI in a child process, a query image and the no-server-path check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from gmi_core.checkpoints import FolderCheckpointSource
from gmi_core.encoders import tiny_encoder
from gmi_core.engine import Gmi
from gmi_core.prompts import load_prompt_set
from gmi_core.protocols import GenerationSettings
from tests.test_comfyui_nodes import fake_image, write_fake_checkpoint

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]
SETTINGS = GenerationSettings(steps=3, width=64, height=64)


# -- a small, fast core: header-valid fake checkpoints, a generator that paints each checkpoint's colour ----------
class PaintingGenerator:
    """Renders checkpoint i's colour plus seed noise; records every call (duplicate rendering shows up here)."""

    def __init__(self, fail_with: BaseException | None = None, fail_after: int = 0):
        self.calls: list[tuple[str, str]] = []
        self.fail_with, self.fail_after = fail_with, fail_after

    def generate(self, checkpoint, prompt, seeds, settings):
        from safetensors import safe_open

        if self.fail_with is not None and len(self.calls) >= self.fail_after:
            raise self.fail_with
        self.calls.append((checkpoint.name, prompt))
        with safe_open(str(checkpoint.path), "pt") as f:
            index = int(f.metadata()["index"])
        return [fake_image(index, prompt, s, settings.width) for s in seeds]

    def release(self):
        pass


class World:
    def __init__(self, root: Path, count: int = 3):
        self.root, self.models, self.home = root, root / "models", root / "home"
        self.paths = [write_fake_checkpoint(self.models / f"m{i}.safetensors", i) for i in range(count)]
        self.encoder = tiny_encoder(0)
        self.prompts = load_prompt_set("platform").head(3)

    def source(self):
        return FolderCheckpointSource(self.models, hash_cache=self.home / "hashes.json")

    def gmi(self, **kw) -> Gmi:
        return Gmi(self.home / "specs", self.encoder, self.prompts, budget="allx2", settings=SETTINGS, **kw)

    def states(self) -> dict[str, str]:
        return {s.name: s.state for s in self.gmi().status(self.source())[0]}

    def spec_path(self, name: str) -> Path:
        gmi = self.gmi()
        ckpt = next(c for c in self.source().list_checkpoints().checkpoints if c.name == name)
        return gmi.store.path_for(gmi.key(ckpt))


@pytest.fixture
def core(tmp_path) -> World:
    w = World(tmp_path)
    report = w.gmi().build(w.source(), PaintingGenerator())
    assert sorted(report.built) == ["m0.safetensors", "m1.safetensors", "m2.safetensors"] and not report.failed
    return w


def run_gmi(*args) -> subprocess.CompletedProcess:
    """``python -m gmi_core ARGS`` from this checkout in a child process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "gmi_core", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"),
    )


def query(index: int = 1) -> Image.Image:
    return fake_image(index, "a lighthouse in a storm", 987_654)


def no_server_path(text: str, *roots: Path) -> bool:
    return all(str(r) not in text for r in roots) and "/tmp/" not in text


def raise_enospc(*args, **kwargs):
    raise OSError(28, "No space left on device", "/srv/private/gmi/specs/x.tmp")


HOLD_LOCK = """
import sys, time
from pathlib import Path
from gmi_core.locks import spec_lock
with spec_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(120)
"""


def hold_lock_in_another_process(spec_path: Path):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(spec_path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc
