"""The no-weights demo: tiny random checkpoints, specs, one unseen query, identification, a report."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from .budgets import Budget
from .checkpoints import FolderCheckpointSource
from .diffusers_generator import DiffusersGenerator
from .encoders import load_encoder, save_encoder, tiny_encoder
from .engine import Gmi
from .hashing import HASH_CACHE_FILE
from .prompts import load_prompt_set
from .protocols import GenerationSettings, ProgressCallback
from .report import write_report
from .results import IdentifyResult
from .tiny import tiny_pipeline_config, write_tiny_checkpoint

DEMO_SETTINGS = GenerationSettings(steps=4, cfg=5.0, width=64, height=64)
QUERY_SEED_BASE = 1_000_000  # far from every spec seed


@dataclass
class DemoResult:
    result: IdentifyResult
    true_checkpoint: str
    query_prompt: str
    query_seed: int
    report: Path

    def to_dict(self) -> dict:
        return {
            **self.result.to_dict(),
            "true_checkpoint": self.true_checkpoint,
            "query_prompt": self.query_prompt,
            "query_seed": self.query_seed,
            "report": str(self.report),
        }


def prepare_demo_models(workdir: Path, checkpoints: int) -> tuple[Path, Path, Path]:
    """(models folder, diffusers config folder, encoder file), created once and reused."""
    models = workdir / "models"
    for i in range(checkpoints):
        path = models / f"tiny-sd-{i + 1}.safetensors"
        if not path.exists():
            write_tiny_checkpoint(path, seed=1000 + i)
    encoder_file = workdir / "encoders" / "gmi-tiny-clip.safetensors"
    if not encoder_file.exists():
        save_encoder(tiny_encoder(seed=0), encoder_file)
    return models, tiny_pipeline_config(workdir / "tiny-sd-config"), encoder_file


def run_demo(
    workdir: Path,
    checkpoints: int = 4,
    seed: int = 0,
    images_per_prompt: int = 2,
    progress: ProgressCallback | None = None,
) -> DemoResult:
    workdir = Path(workdir)
    models, config, encoder_file = prepare_demo_models(workdir, checkpoints)
    source = FolderCheckpointSource(models, hash_cache=workdir / HASH_CACHE_FILE)
    generator = DiffusersGenerator(config=config, device="cpu")
    gmi = Gmi(
        workdir / "specs",
        load_encoder(str(encoder_file)),
        load_prompt_set(),
        budget=Budget(None, images_per_prompt),
        settings=DEMO_SETTINGS,
    )
    gmi.build(source, generator, progress=progress)

    rng = random.Random(seed)
    truth = rng.choice(source.list_checkpoints().checkpoints)
    query_prompt = rng.choice(load_prompt_set("evaluation").prompts)
    query_seed = QUERY_SEED_BASE + seed
    query = generator.generate(truth, query_prompt, [query_seed], DEMO_SETTINGS)
    result = gmi.identify(query, source=source)
    report = write_report(workdir / "report.html", result, query, gmi.library.thumbnail, true_checkpoint=truth.name)
    return DemoResult(result, truth.name, query_prompt, query_seed, report)
