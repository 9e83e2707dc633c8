"""The build settings the side panel reuses: the inputs of the last GMI Build Specs run, stored as JSON."""

from __future__ import annotations

import json
import math
import re

from ..gmi_core.budgets import DEFAULT_BUDGET
from ..gmi_core.encoder_registry import DEFAULT_ENCODER
from ..gmi_core.families import FamilySettings, parse_overrides
from ..gmi_core.hashing import HASH_CACHE_FILE
from ..gmi_core.paths import write_json_atomic
from ..gmi_core.prompts import DEFAULT_PROMPT_SET
from ..gmi_core.protocols import GenerationSettings
from . import host, split_models

DEFAULTS = {  # every value from its one place in gmi_core
    "encoder": DEFAULT_ENCODER,
    "prompt_set": DEFAULT_PROMPT_SET,
    "max_prompts": 0,
    "budget": DEFAULT_BUDGET,
    "family_settings": "",
    "sampler_name": GenerationSettings.sampler,
    "scheduler": GenerationSettings.scheduler,
    "seed": 0,
    "lora_strengths": "1",  # LoRA specs (gmi_core.loras): strengths, and bases per family or LoRA
    "lora_bases": "",
    "models": "both",  # the panel's rows and its "Build missing": checkpoints, loras or both (gmi_core.loras)
}


def path():
    return host.gmi_user_dir() / "panel.json"


def load() -> dict:
    try:
        saved = json.loads(path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        saved = {}
    if not isinstance(saved, dict):
        saved = {}
    values = {}
    for key, default in DEFAULTS.items():  # a hand-edited or broken value falls back to its default
        try:
            value = type(default)(saved.get(key, default))
            values[key] = value if not isinstance(value, float) or math.isfinite(value) else default
        except (TypeError, ValueError, OverflowError):
            values[key] = default
    return values


def save(values: dict) -> None:
    current = load()
    current.update({k: values[k] for k in DEFAULTS if k in values})
    write_json_atomic(path(), current)


def family_settings(text: str, sampler: str, scheduler: str, negative_prompt: str = "") -> FamilySettings:
    """Per-family settings from the Build node's text (``sdxl.steps=30, sd1.width=640``; empty: the defaults), with
    the text encoders and VAE the folders hold per family for split models (``flux-dev.vae=ae.safetensors``)."""
    items = [item for item in re.split(r"[\s,;]+", text or "") if item]
    base = GenerationSettings(sampler=sampler, scheduler=scheduler, negative_prompt=negative_prompt or "")
    components = split_models.family_components(host.gmi_user_dir() / HASH_CACHE_FILE)
    return FamilySettings.defaults(base, parse_overrides(items), components)
