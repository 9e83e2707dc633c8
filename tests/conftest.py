"""Shared fixtures: a tiny world of random SD checkpoints, a tiny CLIP encoder, and built specs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # 2 shared cores: small ops run far slower with more threads

TINY_CHECKPOINTS = 4


@dataclass
class TinyWorld:
    root: Path
    models: Path
    config: Path
    encoder_file: Path
    settings: object
    prompt_set: object
    budget: str

    def source(self):
        from gmi_core.checkpoints import FolderCheckpointSource

        return FolderCheckpointSource(self.models, hash_cache=self.root / "hashes.json")

    def generator(self):
        from gmi_core.diffusers_generator import DiffusersGenerator

        return DiffusersGenerator(config=self.config, device="cpu")

    def gmi(self, spec_root: Path | None = None, encoder=None, prompt_set=None):
        from gmi_core.encoders import load_encoder
        from gmi_core.engine import Gmi

        return Gmi(
            spec_root or self.root / "specs",
            encoder or load_encoder(str(self.encoder_file)),
            prompt_set or self.prompt_set,
            budget=self.budget,
            settings=self.settings,
        )


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> TinyWorld:
    """Four tiny checkpoints with specs built for 10 platform prompts x 2 images (64x64, 4 steps)."""
    from gmi_core.demo import DEMO_SETTINGS, prepare_demo_models
    from gmi_core.prompts import load_prompt_set

    root = tmp_path_factory.mktemp("tiny_world")
    models, config, encoder_file = prepare_demo_models(root, TINY_CHECKPOINTS)
    world = TinyWorld(root, models, config, encoder_file, DEMO_SETTINGS, load_prompt_set("platform").head(10), "allx2")
    report = world.gmi().build(world.source(), world.generator())
    assert len(report.built) == TINY_CHECKPOINTS and not report.failed
    return world
