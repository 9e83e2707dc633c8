"""Every limit gmi enforces on numbers, sizes and uploads, checked here once for every front end.

Front ends (CLI, ComfyUI routes and nodes, A1111 API and tab) call these checks; the engine calls them
again, so no path reaches the generator or the ranker with a value these functions would refuse.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import InvalidInput

if TYPE_CHECKING:  # annotations only: families (the settings' defaults) imports this module
    from .families import GenerationSettings


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
MAX_FORM_FIELDS = 1000  # parts of one multipart body (ComfyUI's own upload refuses more than 1,000 fields too)
MAX_JSON_DEPTH = 32  # nesting of a JSON body, checked before it is parsed (a deep one is a RecursionError)
MAX_PROMPT_SET_BYTES = 8 * 1024 * 1024
MAX_PROMPT_SET_PROMPTS = 100_000  # prompts a prompt set may hold (and the max_prompts inputs that cut one)
MAX_BUDGET_PROMPTS = 10_000  # prompts a spec budget may name (budgets.parse_budget)
MIN_SIZE, MAX_SIZE, SIZE_STEP = 64, 4096, 8
MAX_STEPS = 500
MAX_CFG = 100.0
LATENT_CHANNELS = (4, 16, 32, 64, 128)  # SD, SD3/Flux, and the wider latents of newer families
MAX_IMAGES_PER_PROMPT = 64
MAX_TOP_K = 100_000
MAX_SEED = 2**31 - 1  # base seed of spec images (ComfyUI's INT widgets and the WebUI's seeds fit it)
DEFAULT_TOP_K = 5  # ranking rows shown by the node, the tab and the API
MAX_LORA_STRENGTH = 4.0  # |strength| of a LoRA spec (gmi_core.loras); hosts accept more, no LoRA is used so
DEFAULT_LORA_STRENGTH = 1.0
MIN_HASH_PREFIX = 10  # hex digits of a sha256 prefix that may name a checkpoint (the WebUI's short hash)
DOWNLOAD_PROBE_TIMEOUT_S = 5.0  # an unreachable hub fails a download within this, not after the client's retries
READ_ROUTE_WAIT_S = 0.5  # a status poll waits at most this for an encoder load, then answers "loading"
# From this many complete specs (one encoder and prompt set) identify prefilters with the two-tier index
# (gmi_core.index) and re-ranks its candidates exactly, instead of reading every spec.
INDEX_MIN_SPECS = _env_int("GMI_INDEX_MIN_SPECS", 5000)
# Confidence (gmi_core.confidence, docs/confidence.md): a runner-up is a contender while the winner's margin over
# it is below CONFIDENCE_Z standard errors; the top CONFIDENCE_ROWS rows are examined. Refine renders the missing
# images of at most REFINE_MAX_CONTENDERS contenders' specs (the best-ranked first).
CONFIDENCE_Z = 3.0
CONFIDENCE_ROWS = 8
REFINE_MAX_CONTENDERS = 4


MIN_TAU, MAX_TAU = 1e-3, 100.0  # prompt-weight temperature: below 1e-3 the softmax is one-hot within float noise
MIN_GAMMA, MAX_GAMMA = 1e-6, 1e6  # kernel width: outside it every kernel value is 0 or 1
MAX_THRESHOLD = 10.0  # near-duplicate threshold (relative distance)


@dataclass(frozen=True)
class Range:
    """One number's validation: its bounds, whether it is whole, and its step."""

    low: float
    high: float
    whole: bool = True
    step: int = 1

    def describe(self) -> str:
        kind = "a whole number" if self.whole else "a number"
        step = f" in steps of {self.step}" if self.step > 1 else ""
        low, high = (f"{int(v)}" if self.whole else f"{v:g}" for v in (self.low, self.high))
        return f"{kind} between {low} and {high}{step}"


# The validation table: every number a request, a node, the tab or the CLI gives gmi, with its own range.
NUMBERS: dict[str, Range] = {
    "steps": Range(1, MAX_STEPS),
    "width": Range(MIN_SIZE, MAX_SIZE, step=SIZE_STEP),
    "height": Range(MIN_SIZE, MAX_SIZE, step=SIZE_STEP),
    "cfg": Range(0, MAX_CFG, whole=False),
    "guidance": Range(0, MAX_CFG, whole=False),  # distilled guidance (Flux dev)
    "shift": Range(0, MAX_CFG, whole=False),  # flow-matching sampling shift
    "seed": Range(0, MAX_SEED),
    "top_k": Range(1, MAX_TOP_K),
    "pick_rank": Range(1, MAX_TOP_K),
    "refine_max_images": Range(1, MAX_TOP_K),  # 0 (no cap: up to the refine budget) is allowed where it is asked
    "max_prompts": Range(0, MAX_PROMPT_SET_PROMPTS),
    "images_per_prompt": Range(1, MAX_IMAGES_PER_PROMPT),
    "gamma": Range(MIN_GAMMA, MAX_GAMMA, whole=False),
    "tau": Range(MIN_TAU, MAX_TAU, whole=False),
    "threshold": Range(0, MAX_THRESHOLD, whole=False),
}


def check_number(name: str, value, field: str | None = None):
    """``value`` parsed and checked against its row of :data:`NUMBERS` (``field``, default ``name``): an int for
    whole numbers (``1e12`` is a whole number, out of range), a float otherwise; else InvalidInput that says the
    range. Bools, NaN and infinities are refused."""
    rule = NUMBERS[field or name]
    shown_value = str(value)[:40]
    try:
        if isinstance(value, bool) or value is None:
            raise ValueError
        number = float(value.strip() if isinstance(value, str) else value)
        if isinstance(value, int):
            number = value
    except (TypeError, ValueError, OverflowError):
        raise InvalidInput(f"{name} must be {rule.describe()}, not {shown_value!r}") from None
    if isinstance(number, float) and not math.isfinite(number):
        raise InvalidInput(f"{name} must be {rule.describe()}, not {shown_value}")
    if rule.whole:
        if number != int(number):
            raise InvalidInput(f"{name} must be {rule.describe()}, not {shown_value}")
        number = int(number)
    if not rule.low <= number <= rule.high or (rule.step > 1 and number % rule.step):
        raise InvalidInput(f"{name} must be {rule.describe()}, not {shown_value}")
    return number


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


def check_size(name: str, value) -> int:
    return check_number(name, value, "width")


def check_settings(
    settings: GenerationSettings, samplers: Sequence[str] | None = None, schedulers: Sequence[str] | None = None
) -> GenerationSettings:
    """The generation settings of a build, or InvalidInput saying which value is wrong and why."""
    for name in ("steps", "width", "height", "cfg"):
        check_number(name, getattr(settings, name))
    for name, value, known in (("sampler", settings.sampler, samplers), ("scheduler", settings.scheduler, schedulers)):
        if not isinstance(value, str) or not value or len(value) > 100:
            raise InvalidInput(f"{name} must be a name")
        if known is not None and value not in known:
            raise InvalidInput(f"unknown {name} {value!r}; the host knows {', '.join(list(known)[:30])}")
    if not isinstance(settings.negative_prompt, str) or len(settings.negative_prompt) > MAX_TEXT_FIELD:
        raise InvalidInput(f"negative prompt must be text of at most {MAX_TEXT_FIELD} characters")
    for name in ("guidance", "shift"):
        value = getattr(settings, name)
        if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or not 0 <= value <= MAX_CFG
        ):
            raise InvalidInput(f"{name} must be empty or a number between 0 and {MAX_CFG:g}, not {str(value)[:40]}")
    if settings.latent_channels not in LATENT_CHANNELS:
        raise InvalidInput(f"latent channels must be one of {LATENT_CHANNELS}, not {settings.latent_channels!r}")
    for name in ("text_encoders", "vae", "workflow"):
        if not isinstance(getattr(settings, name), str) or len(getattr(settings, name)) > MAX_TEXT_FIELD:
            raise InvalidInput(f"{name} must be file names of at most {MAX_TEXT_FIELD} characters")
    return settings


def check_identify(top_k=None, gamma=None, tau=None) -> tuple[int | None, float | None, float | None]:
    """(top_k, gamma, tau) for a ranking; None means the default (all rows, median heuristic, clipped cosine)."""
    k = None if top_k is None else check_number("top_k", top_k)
    return k, *(None if v is None else float(check_number(n, v)) for n, v in (("gamma", gamma), ("tau", tau)))


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


def check_json_depth(body: bytes | str) -> None:
    """Refuses a JSON body nested deeper than :data:`MAX_JSON_DEPTH` before any parser recurses into it: one scan
    over the brackets, quotes and escapes only (brackets inside strings do not count)."""
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return
    depth, in_string, escaped_at = 0, False, -2
    for match in _JSON_STRUCTURE.finditer(text):
        char, at = match.group(), match.start()
        if in_string:
            if char == "\\" and escaped_at != at - 1:
                escaped_at = at
            elif char == '"' and escaped_at != at - 1:
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise InvalidInput(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        elif char in "]}":
            depth -= 1


_JSON_STRUCTURE = re.compile(r'[\[\]{}"\\]')


class FieldCounter:
    """Counts the parts of a multipart body as they arrive; refuses the one over :data:`MAX_FORM_FIELDS`."""

    def __init__(self, limit: int = MAX_FORM_FIELDS):
        self.limit, self.count = limit, 0

    def add(self) -> None:
        self.count += 1
        if self.count > self.limit:
            raise InvalidInput(f"more than {self.limit} fields in one multipart body")


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
