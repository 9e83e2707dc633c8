"""The build settings the side panel reuses: the inputs of the last GMI Build Specs run, stored as JSON."""

from __future__ import annotations

import json
import math

from ..gmi_core.store import write_json_atomic
from . import host

DEFAULTS = {
    "encoder": "ViT-L-14/openai",
    "prompt_set": "platform",
    "max_prompts": 0,
    "images_per_prompt": 4,
    "steps": 20,
    "cfg": 7.0,
    "sampler_name": "euler",
    "scheduler": "normal",
    "width": 512,
    "height": 512,
    "seed": 0,
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
