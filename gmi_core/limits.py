"""Every limit gmi enforces on numbers, sizes and uploads, checked here once for every front end.

Front ends (CLI, ComfyUI routes and nodes, A1111 API and tab) call these checks; the engine calls them
again, so no path reaches the generator or the ranker with a value these functions would refuse.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from .errors import InvalidInput
from .protocols import GenerationSettings


def _env_int(name: str, default: int) -> int:
    try:
        value = int(os.environ.get(name, default))
    except ValueError:
        return default
    return value if value > 0 else default


MAX_IMAGE_PIXELS = _env_int("GMI_MAX_IMAGE_PIXELS", 40_000_000)  # checked from the header, before decoding
MAX_UPLOAD_BYTES = _env_int("GMI_MAX_UPLOAD_BYTES", 32 * 1024 * 1024)  # one request, counted while reading
MAX_IMAGES_PER_REQUEST = 16
MAX_TEXT_FIELD = 2000  # characters of a prompt or other text field
MAX_PROMPT_SET_BYTES = 8 * 1024 * 1024
MAX_PROMPTS = 100_000
MIN_SIZE, MAX_SIZE, SIZE_STEP = 64, 4096, 8
MAX_STEPS = 500
MAX_CFG = 100.0
MAX_IMAGES_PER_PROMPT = 64
MAX_TOP_K = 100_000
MAX_SEED = 2**31 - 1  # base seed of spec images (ComfyUI's INT widgets and the WebUI's seeds fit it)
DEFAULT_TOP_K = 5  # ranking rows shown by the node, the tab and the API
MAX_LORA_STRENGTH = 4.0  # |strength| of a LoRA spec (gmi_core.loras); hosts accept more, no LoRA is used so
DEFAULT_LORA_STRENGTH = 1.0
# From this many complete specs (one encoder and prompt set) identify prefilters with the two-tier index
# (gmi_core.index) and re-ranks its candidates exactly, instead of reading every spec.
INDEX_MIN_SPECS = _env_int("GMI_INDEX_MIN_SPECS", 5000)


def positive_int(name: str, value, upper: int | None = None) -> int:
    """An int >= 1 (and <= upper); bools and non-integral numbers are refused."""
    if isinstance(value, bool):
        raise InvalidInput(f"{name} must be a whole number >= 1, not {value!r}")
    try:
        number = int(value)
        if isinstance(value, float) and number != value:
            raise ValueError
        if isinstance(value, str) and value.strip() != str(number):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise InvalidInput(f"{name} must be a whole number >= 1, not {str(value)[:40]!r}") from None
    if number < 1 or (upper is not None and number > upper):
        raise InvalidInput(
            f"{name} must be between 1 and {upper}, not {number}" if upper else f"{name} must be >= 1, not {number}"
        )
    return number


def positive_finite(name: str, value) -> float | None:
    """None stays None (use the default); else a finite float > 0."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidInput(f"{name} must be a number > 0, not {str(value)[:40]!r}") from None
    if isinstance(value, bool) or not math.isfinite(number) or number <= 0:
        raise InvalidInput(f"{name} must be a finite number > 0, not {str(value)[:40]}")
    return number


def check_size(name: str, value) -> int:
    number = positive_int(name, value)
    if not MIN_SIZE <= number <= MAX_SIZE or number % SIZE_STEP:
        raise InvalidInput(f"{name} must be a multiple of {SIZE_STEP} between {MIN_SIZE} and {MAX_SIZE}, not {number}")
    return number


def check_settings(
    settings: GenerationSettings, samplers: Sequence[str] | None = None, schedulers: Sequence[str] | None = None
) -> GenerationSettings:
    """The generation settings of a build, or InvalidInput saying which value is wrong and why."""
    positive_int("steps", settings.steps, MAX_STEPS)
    check_size("width", settings.width)
    check_size("height", settings.height)
    try:
        cfg = float(settings.cfg)
    except (TypeError, ValueError):
        raise InvalidInput(f"cfg must be a number, not {str(settings.cfg)[:40]!r}") from None
    if isinstance(settings.cfg, bool) or not math.isfinite(cfg) or not 0 <= cfg <= MAX_CFG:
        raise InvalidInput(f"cfg must be a finite number between 0 and {MAX_CFG:g}, not {settings.cfg}")
    for name, value, known in (("sampler", settings.sampler, samplers), ("scheduler", settings.scheduler, schedulers)):
        if not isinstance(value, str) or not value or len(value) > 100:
            raise InvalidInput(f"{name} must be a name")
        if known is not None and value not in known:
            raise InvalidInput(f"unknown {name} {value!r}; the host knows {', '.join(list(known)[:30])}")
    if not isinstance(settings.negative_prompt, str) or len(settings.negative_prompt) > MAX_TEXT_FIELD:
        raise InvalidInput(f"negative prompt must be text of at most {MAX_TEXT_FIELD} characters")
    return settings


def check_identify(top_k=None, gamma=None, tau=None) -> tuple[int | None, float | None, float | None]:
    """(top_k, gamma, tau) for a ranking; None means the default (all rows, median heuristic, clipped cosine)."""
    k = None if top_k is None else positive_int("top_k", top_k, MAX_TOP_K)
    return k, positive_finite("gamma", gamma), positive_finite("tau", tau)


def check_image_count(count: int) -> int:
    if count < 1:
        raise InvalidInput("send at least one image")
    if count > MAX_IMAGES_PER_REQUEST:
        raise InvalidInput(f"at most {MAX_IMAGES_PER_REQUEST} images per request, got {count}")
    return count


def check_pixels(width: int, height: int, label: str = "image") -> None:
    """Refuses an image by its header size, before any pixel is decoded."""
    if width <= 0 or height <= 0:
        raise InvalidInput(f"{label}: empty image ({width}x{height})")
    if width * height > MAX_IMAGE_PIXELS:
        raise InvalidInput(
            f"{label}: image too large: {width}x{height} is {width * height / 1e6:.1f} MP, over the limit of "
            f"{MAX_IMAGE_PIXELS / 1e6:.1f} MP (GMI_MAX_IMAGE_PIXELS)"
        )


class ByteCounter:
    """Counts bytes of an upload as they arrive, also when no Content-Length was sent (chunked)."""

    def __init__(self, limit: int = MAX_UPLOAD_BYTES):
        self.limit, self.count = limit, 0

    def add(self, chunk: bytes) -> bytes:
        self.count += len(chunk)
        if self.count > self.limit:
            raise UploadTooLarge(f"upload larger than {self.limit // (1024 * 1024)} MiB (GMI_MAX_UPLOAD_BYTES)")
        return chunk


class UploadTooLarge(InvalidInput):
    """The request body passed the byte limit (front ends answer 413)."""


def json_safe(value):
    """The same structure with NaN and infinities replaced by None: JSON output never holds them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
