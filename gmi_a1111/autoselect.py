"""The auto-select logic behind scripts/gmi_autoselect.py (kept free of gradio for unit tests)."""

from __future__ import annotations

import base64
import logging

import numpy as np
from PIL import Image

from gmi_core.errors import GmiError
from gmi_core.images import load_image, to_rgb

from . import loras, runtime

log = logging.getLogger("gmi")
INFOTEXT_KEY = "GMI auto-select"


def as_image(value) -> Image.Image | None:
    """A reference image from what the UI (PIL / numpy) or the API (base64, data URI) passes."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, dict):  # gradio image editor payloads
        value = value.get("image") or value.get("composite") or value.get("background")
        return as_image(value)
    if isinstance(value, Image.Image):
        return to_rgb(value)
    if isinstance(value, np.ndarray):
        return to_rgb(Image.fromarray(value.astype(np.uint8)))
    if isinstance(value, str):
        text = value.split(",", 1)[1] if value.startswith("data:") else value
        return load_image(base64.b64decode(text), name="reference image")
    if isinstance(value, (bytes, bytearray)):
        return load_image(bytes(value), name="reference image")
    raise GmiError(f"unsupported reference image type {type(value).__name__}")


def apply(p, enabled, image, prompt: str | None = None) -> str | None:
    """Identify the best checkpoint for ``image`` and make ``p`` render with it.

    Sets ``p.override_settings['sd_model_checkpoint']`` (applied by process_images right after
    before_process) and records the choice in the infotext. Returns the chosen title, or None.
    A failure leaves the checkpoint as it is and says why in the console and the generation comments.
    """
    if not enabled:
        return None
    try:
        reference = as_image(image)
        if reference is None:
            raise GmiError("no reference image given")
        with runtime.holding_queue_lock():  # before_process runs inside the generation's queue lock
            result, data = runtime.identify([reference], prompt=prompt or None, top_k=1)
        if data["chosen"] is None:
            raise GmiError("no installed checkpoint has a spec")
    except (GmiError, OSError, ValueError) as exc:
        message = f"gmi auto-select skipped: {exc}"
        log.warning(message)
        print(message)
        comment = getattr(p, "comment", None)
        if callable(comment):
            comment(message)
        return None
    best = next(row for row in data["ranking"] if row["name"] == data["chosen"])  # the first installed one
    if p.override_settings is None:
        p.override_settings = {}
    title = loras.apply_to_generation(p, best, runtime.titles_by_sha())  # a LoRA row: its base, its tag in the prompt
    p.override_settings["sd_model_checkpoint"] = title
    if p.extra_generation_params is None:
        p.extra_generation_params = {}
    p.extra_generation_params[INFOTEXT_KEY] = f"{best['name']} [{best['short_hash']}]"
    print(f"gmi auto-select: {best['name']} (method {result.method}, prompt: {result.pseudo_prompt!r})")
    return title
